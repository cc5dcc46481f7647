"""Multi-exit nets: one registry (`create_net`, `list_nets`), one family per module, all imported here."""

from stages.nets import efficientnet, resnet_cifar, resnet_tv, vit  # noqa: F401  (each family registers its nets)
from stages.nets.multi_exit import ExitBackbone, MultiExitNet
from stages.nets.registry import create_net, list_nets, register_net
from stages.nets.spec import NetSpec

__all__ = ["ExitBackbone", "MultiExitNet", "NetSpec", "create_net", "list_nets", "register_net"]
