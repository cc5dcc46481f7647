"""NetSpec: everything needed to rebuild a multi-exit net (stored as a checkpoint's spec.json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class NetSpec:
    """A multi-exit net, fully described. `create_net(spec)` builds it; `to_dict`/`from_dict` round-trip it."""

    backbone: str  # registry name, e.g. "resnet20", "vit_cifar", "efficientnet_b0"
    num_classes: int  # from the dataset
    in_chans: int = 3  # from the dataset (digits: 1)
    img_size: int = 32  # square input side, from the dataset (digits: 8)
    exits: tuple[int, ...] | None = None  # explicit IC positions: 1-based block numbers an IC follows
    exit_every: int | None = None  # or: an IC after every n-th block ...
    exit_start: int | None = None  # ... starting at this block (1-based); None with exit_every -> n
    head: str | None = None  # IC head kind: "sdn" (conv) | "linear" (ViT CLS token); None -> family default
    head_norm: bool = False  # LayerNorm before a linear head
    method: str = "sdn"  # early-exit method: "sdn" (independent ICs on backbone features)
    small_input: bool | None = None  # torchvision ResNets: 3x3 stem, no max-pool; None -> img_size <= 64
    width: int | None = None  # base width / embed dim override (None -> variant default); small nets for tests
    depth: int | None = None  # number of blocks override where the family allows it (ViT layers)

    def __post_init__(self) -> None:
        if self.exits is not None and not isinstance(self.exits, tuple):
            object.__setattr__(self, "exits", tuple(int(i) for i in self.exits))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["exits"] is not None:
            d["exits"] = list(d["exits"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NetSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"net spec: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
