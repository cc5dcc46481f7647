"""The one net registry: `register_net` fills a name -> builder dict; `create_net` builds from a NetSpec."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from exitflow.stages.core.nets.methods import get_method
from exitflow.stages.core.nets.spec import NetSpec
from exitflow.stages.core.allowed import TIMM_PREFIX
from exitflow.stages.core.registry import Registry
from exitflow.stages.core.user_backbone import ENTRY_POINT_GROUP, is_user_backbone

if TYPE_CHECKING:  # runtime import would be circular: families import this module and multi_exit
    from exitflow.stages.core.nets.multi_exit import MultiExitNet

log = logging.getLogger(__name__)

NetBuilder = Callable[[NetSpec], "MultiExitNet"]

_NETS: Registry[NetBuilder] = Registry("net")


def register_net(builder: NetBuilder) -> NetBuilder:
    """Register `builder` under its function name; a name may be registered once."""
    return _NETS.register(builder.__name__, builder)


def list_nets() -> list[str]:
    """Names of every registered net, sorted."""
    return _NETS.names()


FORMS = ("timm:NAME", "module.path:builder", f"an entry point in {ENTRY_POINT_GROUP}")


def _builder(backbone: str) -> NetBuilder | None:
    """What builds `backbone`: a registered net's builder, timm's adapter for `timm:NAME`, the custom
    builder loader for `module.path:builder` or an entry point's name; None for anything else."""
    if backbone in _NETS:
        return _NETS.get(backbone)
    if backbone.startswith(TIMM_PREFIX):
        from exitflow.stages.core.nets.timm_backbone import timm_net  # here: timm costs seconds to import

        return timm_net
    if is_user_backbone(backbone):
        from exitflow.stages.core.nets.custom_backbone import custom_net  # here: user code is imported only when named

        return custom_net
    return None


def _check_spec(spec: NetSpec) -> None:
    """Family-independent checks, before anything is built."""
    if not isinstance(spec.backbone, str) or _builder(spec.backbone) is None:
        raise ValueError(f"net spec field `backbone`: unknown net {spec.backbone!r}; known: {list_nets()}, "
                         f"or {', or '.join(FORMS)}")
    if spec.num_classes < 2:
        raise ValueError(f"net spec field `num_classes`: need at least 2 classes, got {spec.num_classes}")
    if spec.in_chans < 1:
        raise ValueError(f"net spec field `in_chans`: must be >= 1, got {spec.in_chans}")
    if spec.img_size < 1:
        raise ValueError(f"net spec field `img_size`: must be >= 1, got {spec.img_size}")
    get_method(spec.method)  # raises, naming the registered methods
    for field in ("width", "depth"):
        value = getattr(spec, field)
        if value is not None and value < 1:
            raise ValueError(f"net spec field `{field}`: must be >= 1, got {value}")


def create_net(spec: NetSpec) -> MultiExitNet:
    """Build the multi-exit net `spec` describes (fresh weights; nothing is ever downloaded)."""
    _check_spec(spec)
    builder = _builder(spec.backbone)
    assert builder is not None  # _check_spec refused the rest
    net = builder(spec)
    log.debug("built %s: %d blocks, exits after %s", spec.backbone, net.num_blocks, net.exit_blocks)
    return net
