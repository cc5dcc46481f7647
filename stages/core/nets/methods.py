"""Early-exit methods: how a multi-exit net turns its exits' raw outputs into the logits each exit emits.

A method is one registration. `combine(raw)` gets the raw logits of exits 0..k (every IC up to
k, or the final head when k is the last exit) and returns exit k's logits: SDN (Kaya et al. 2019)
lets every IC answer alone; an ensembling method averages the exits so far. `head` is the IC
head kind the method defaults to (None: the family's default). When a sample leaves is the exit
criterion's business (`stages.core.evaluation`), whatever the method. `losses` gives each
exit's training loss (SDN: each exit against the labels alone); the phase weights and sums them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from stages.core.registry import Registry


ExitLosses = Callable[[Sequence[Tensor], Tensor, Callable[[Tensor, Tensor], Tensor]], list[Tensor]]


def each_exit_alone(logits: Sequence[Tensor], target: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> list[Tensor]:
    """Every exit's loss against the labels (SDN's): the phase weights and sums them."""
    return [loss_fn(z, target) for z in logits]


@dataclass(frozen=True)
class ExitMethod:
    name: str
    combine: Callable[[Sequence[Tensor]], Tensor]  # raw logits of exits 0..k -> exit k's logits
    independent: bool = False  # exit k's logits are its own raw output: exit k needs no earlier IC
    head: str | None = None
    # (exits' logits, labels, the phase's loss function) -> each exit's training loss; the phase
    # decides which exits count and weights them (stages.core.phases.phase_loss)
    losses: ExitLosses = each_exit_alone
    # The method's own weights on its exits' losses (number of exits -> [E]), multiplied into the
    # phase's `loss_weighting` in P2 and P3; None: all 1. P1 trains the plain backbone: unweighted.
    loss_weights: Callable[[int], Tensor] | None = None


METHODS: Registry[ExitMethod] = Registry("method")


def register_method(method: ExitMethod) -> ExitMethod:
    return METHODS.register(method.name, method)


def get_method(name: str) -> ExitMethod:
    try:
        return METHODS.get(name)
    except ValueError as e:
        raise ValueError(f"net spec field `method`: {e}") from None


def depth_weights(num_exits: int) -> Tensor:
    """PABEE's training loss (Zhou et al. 2020): exit j (1-based) weighs j / sum(1..E), so the
    loss is the depth-weighted average of the exits' losses."""
    j = torch.arange(1, num_exits + 1, dtype=torch.float32)
    return j / j.sum()


register_method(ExitMethod("sdn", combine=lambda raw: raw[-1], independent=True))
# PABEE: independent ICs (as SDN's) and the depth-weighted loss; its exit rule is the `patience`
# criterion (stages.core.evaluation), which works with every method.
register_method(ExitMethod("pabee", combine=lambda raw: raw[-1], independent=True, loss_weights=depth_weights))
