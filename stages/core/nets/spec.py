"""NetChoice: the net a study asks for; NetSpec: that net sized for a dataset, everything needed to
rebuild it (stored as a checkpoint's spec.json). One list of net fields: NetSpec extends NetChoice."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from exitflow.stages.core.fields import reject_unknown


@dataclass(frozen=True)
class NetChoice:
    """The net a study asks for, before any dataset sizes it: what a phase node's config (and key) holds.

    The dataset's classes, channels and image size join it on the worker (`sized`), where the data is:
    a study's graph never needs the dataset on the machine that plans it.
    """

    backbone: str  # registry name, e.g. "resnet20", "vit_cifar", "efficientnet_b0"
    exits: tuple[int, ...] | None = None  # explicit IC positions: 1-based block numbers an IC follows
    exit_every: int | None = None  # or: an IC after every n-th block ...
    exit_start: int | None = None  # ... starting at this block (1-based); None with exit_every -> n
    head: str | None = None  # IC head kind: "sdn" (conv) | "linear" | "mlp" (pooled conv or CLS token); None -> family default
    head_norm: bool = False  # LayerNorm before a linear or MLP head
    head_hidden: tuple[int, ...] = ()  # an "mlp" head's hidden widths (paper Table 2: 1024, 2048; one or two layers)
    method: str = "sdn"  # early-exit method (stages.core.nets.methods): "sdn", "pabee", "gpf", "ztw", "jei_dnn"
    small_input: bool | None = None  # torchvision ResNets: 3x3 stem, no max-pool; None -> img_size <= 64
    width: int | None = None  # base width / embed dim override (None -> variant default); small nets for tests
    depth: int | None = None  # number of blocks override where the family allows it (ViT layers)

    def __post_init__(self) -> None:
        _tuples(self)

    def sized(self, num_classes: int, in_chans: int, img_size: int) -> "NetSpec":
        return NetSpec(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **_own_fields(self, NetChoice))


@dataclass(frozen=True, kw_only=True)
class NetSpec(NetChoice):
    """A multi-exit net, fully described: the choice sized for a dataset. `create_net(spec)` builds it;
    `to_dict`/`from_dict` round-trip it (a checkpoint's spec.json)."""

    num_classes: int  # from the dataset
    in_chans: int = 3  # from the dataset (digits: 1)
    img_size: int = 32  # square input side, from the dataset (digits: 8)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("exits", "head_hidden"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NetSpec":
        reject_unknown(cls, d, "net spec")
        return cls(**d)


def _own_fields(obj: Any, cls: type) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)}


def _tuples(spec: NetSpec | NetChoice) -> None:
    """Lists from JSON or YAML become tuples: a frozen spec hashes and compares by value."""
    if spec.exits is not None and not isinstance(spec.exits, tuple):
        object.__setattr__(spec, "exits", tuple(int(i) for i in spec.exits))
    if not isinstance(spec.head_hidden, tuple):
        object.__setattr__(spec, "head_hidden", tuple(int(i) for i in spec.head_hidden))
