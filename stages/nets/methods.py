"""Early-exit methods: how a multi-exit net turns its exits' raw outputs into the logits each exit emits.

A method is one registration. `combine(raw)` gets the raw logits of exits 0..k (every IC up to
k, or the final head when k is the last exit) and returns exit k's logits: SDN (Kaya et al. 2019)
lets every IC answer alone; an ensembling method averages the exits so far. `head` is the IC
head kind the method defaults to (None: the family's default). When a sample leaves is the exit
criterion's business (`stages.evaluation`), whatever the method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class ExitMethod:
    name: str
    combine: Callable[[Sequence[Tensor]], Tensor]  # raw logits of exits 0..k -> exit k's logits
    independent: bool = False  # exit k's logits are its own raw output: exit k needs no earlier IC
    head: str | None = None


METHODS: dict[str, ExitMethod] = {}


def register_method(method: ExitMethod) -> ExitMethod:
    if method.name in METHODS:
        raise ValueError(f"early-exit method {method.name!r} is registered already")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> ExitMethod:
    if name not in METHODS:
        raise ValueError(f"net spec field `method`: unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


register_method(ExitMethod("sdn", combine=lambda raw: raw[-1], independent=True))
