"""Multi-exit nets: one registry (`create_net`, `list_nets`), one family per module, all imported here."""

from exitflow.stages.core.nets import efficientnet, msdnet, resnet_cifar, resnet_tv, vit  # noqa: F401  (each family registers its nets)
from exitflow.stages.core.nets.multi_exit import ExitBackbone, MultiExitNet
from exitflow.stages.core.nets.registry import create_net, list_nets, register_net
from exitflow.stages.core.nets.spec import NetChoice, NetSpec

__all__ = ["ExitBackbone", "MultiExitNet", "NetChoice", "NetSpec", "create_net", "list_nets", "register_net"]
