"""What a deployed early-exit model needs besides its weights: which threshold meets a FLOPs budget, and
what each sample's exit cost.

A budget is read off an evaluated model's own threshold curve exactly as the report reads it
(`budgets.budget_point`, the paper's rule, "costliest"): the costliest curve point whose mean FLOPs
are at most b x the plain backbone's; "max" is the costliest point of the whole curve. The point's
threshold, fed to dynamic inference (`stages.core.inference`), takes on the same test samples exactly
the exits the curve counts there. Plain NumPy and PyTorch: no Ray, no MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from exitflow.stages.core.budgets import Budget, budget_point
from exitflow.stages.core.inference import early_exit_forward
from exitflow.stages.core.nets.multi_exit import MultiExitNet

BUDGET_RULE = "costliest"  # the paper's: the costliest point within the budget


@dataclass(frozen=True)
class CurvePoints:
    """One criterion's threshold curve, in the order of its thresholds (a curve.parquet row set)."""

    threshold: tuple[float, ...]
    flops: tuple[float, ...]  # mean per-sample FLOPs at each threshold
    accuracy: tuple[float, ...]  # test accuracy at each threshold


@dataclass(frozen=True)
class BudgetThreshold:
    """The curve point a budget reads: its threshold and what it cost and scored on the test split."""

    criterion: str
    budget: str  # "0.5", "max"
    threshold: float | None  # None: no point of the curve fits the budget
    point: int | None
    flops: float | None
    flops_fraction: float | None  # of the plain backbone's
    accuracy: float | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def parse_budget(budget: Budget | str) -> Budget:
    """A budget as a number (a positive fraction of the backbone's FLOPs) or "max"; refuses anything else."""
    if isinstance(budget, str):
        text = budget.strip().lower()
        if text == "max":
            return "max"
        try:
            budget = float(text)
        except ValueError:
            raise ValueError(f"budget {budget!r}: a positive fraction of the backbone's FLOPs (e.g. 0.5) or 'max'") from None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget {budget!r}: a positive fraction of the backbone's FLOPs (e.g. 0.5) or 'max'")
    return float(budget)


def budget_name(budget: Budget) -> str:
    return budget if isinstance(budget, str) else repr(float(budget))


def threshold_at_budget(criterion: str, curve: CurvePoints, backbone_flops: float, budget: Budget | str) -> BudgetThreshold:
    """The threshold of `criterion` that meets `budget`, read the report's way (`BUDGET_RULE`)."""
    b = parse_budget(budget)
    point = budget_point(curve.flops, curve.accuracy, backbone_flops, b, BUDGET_RULE)
    if point is None:
        return BudgetThreshold(criterion, budget_name(b), None, None, None, None, None)
    flops = float(curve.flops[point])
    return BudgetThreshold(criterion, budget_name(b), float(curve.threshold[point]), point, flops,
                           flops / backbone_flops, float(curve.accuracy[point]))


def budget_thresholds(curves: Mapping[str, CurvePoints], backbone_flops: float,
                      budgets: Iterable[Budget | str]) -> list[BudgetThreshold]:
    """Every criterion's threshold at every budget (a row per pair; threshold None where unmet)."""
    budgets = list(budgets)
    return [threshold_at_budget(c, curve, backbone_flops, b) for c, curve in curves.items() for b in budgets]


@dataclass(frozen=True)
class PricedDecisions:
    """Per sample: the predicted class, the exit it left at (0-based, the final head last) and its cost."""

    predictions: np.ndarray  # [N] int64
    exits: np.ndarray  # [N] int64
    flops: np.ndarray  # [N] int64: the FLOPs of the exit taken (backbone up to it, its ICs)
    flops_fraction: np.ndarray  # [N] float64: flops / the plain backbone's


def priced_early_exit(net: MultiExitNet, x: torch.Tensor, threshold: float, criterion: str,
                      exit_flops: Sequence[int], backbone_flops: int, batch_size: int = 256) -> PricedDecisions:
    """Dynamic early-exit inference on `x` (in batches of `batch_size`), each sample priced by the exit it took."""
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images N x C x H x W, got shape {tuple(x.shape)}")
    if len(exit_flops) != net.num_exits:
        raise ValueError(f"{len(exit_flops)} exit costs for a net of {net.num_exits} exits")
    device = next(net.parameters()).device
    predictions, exits = [], []
    for start in range(0, x.shape[0], batch_size):
        out = early_exit_forward(net, x[start:start + batch_size].to(device), threshold, criterion)
        predictions.append(out.predictions.cpu())
        exits.append(out.exits.cpu())
    taken = torch.cat(exits).numpy() if exits else np.empty(0, np.int64)
    cost = np.asarray(exit_flops, dtype=np.int64)[taken]
    return PricedDecisions(torch.cat(predictions).numpy() if predictions else np.empty(0, np.int64), taken, cost,
                           cost / float(backbone_flops))
