"""Reading a FLOPs budget off threshold curves: the budget table, the paper's way by default.

The paper's table (its Table 1, and its code's `visualize/cost_vs_table.py`) reads the
accuracy at 25/50/75/100% of the plain backbone's FLOPs and "without any limit" (Max):
- a budget b reports the last curve point, in the order of the thresholds, before the first one
  whose mean FLOPs exceed b x the backbone's; on a curve whose FLOPs rise with the threshold (every
  criterion exitflow has: each sample's exit only moves later as the threshold tightens) that is
  the costliest point within the budget, which is what `budget_point` computes ("costliest");
- Max, with no budget, is the last point: the costliest one, where every sample reaches the final
  exit (the highest max-softmax threshold). It is not the best accuracy anywhere on the curve:
  a curve that peaks and dips reports its dip;
- over seeds, the curves are averaged threshold by threshold (every seed is swept with the same
  evenly spaced thresholds), the budget is read off the mean curve, and the std is that of the
  seeds' accuracies at that threshold (`seed_averaging: curve`).

exitflow's own variants have other names: `budget_rule: best` (the most accurate point within
each budget), the budget `best_on_test` (the most accurate point anywhere) and `seed_averaging:
budget` (each seed's curve read at the budget, then the readings averaged). The first two pick a
point by looking at test labels; the report says so under the table (`describe_readout`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Budget = float | Literal["max", "best_on_test"]
BudgetRule = Literal["costliest", "best"]
BUDGET_RULES: tuple[str, ...] = ("costliest", "best")
SeedAveraging = Literal["curve", "budget"]
SEED_AVERAGINGS: tuple[str, ...] = ("curve", "budget")
NAMED_BUDGETS: tuple[str, ...] = ("max", "best_on_test")
DEFAULT_BUDGETS: tuple[Budget, ...] = (0.25, 0.5, 0.75, 1.0, "max")
Curve = tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]  # (flops, accuracy), one point per threshold


def budget_point(
    flops: Sequence[float] | np.ndarray,
    accuracy: Sequence[float] | np.ndarray,
    backbone_flops: float,
    budget: Budget,
    rule: BudgetRule = "costliest",
) -> int | None:
    """The curve point a budget reports (its index), None if no point fits `budget` x backbone FLOPs.

    "costliest" (the paper's rule): the costliest point within the budget; of points equally
    costly, the last in the curve's order (the paper's code takes the last threshold before the
    budget is crossed; equally costly points of a monotone curve make the same predictions).
    "best": the most accurate point within the budget, the cheaper on a tie. "max": the costliest
    point of the whole curve, under either rule (the paper's Max). "best_on_test": the most
    accurate point anywhere, the cheaper on a tie.
    """
    flops = np.asarray(flops, dtype=np.float64)
    accuracy = np.asarray(accuracy, dtype=np.float64)
    if flops.shape != accuracy.shape:
        raise ValueError(f"flops {flops.shape} and accuracy {accuracy.shape} differ in shape")
    if rule not in BUDGET_RULES:
        raise ValueError(f"unknown budget rule {rule!r}; known: {list(BUDGET_RULES)}")
    if isinstance(budget, str) and budget not in NAMED_BUDGETS:
        raise ValueError(f"unknown budget {budget!r}: a fraction of the backbone's FLOPs or one of {list(NAMED_BUDGETS)}")
    if flops.size == 0:
        return None
    if budget == "max":
        return _last(flops == flops.max())
    if budget == "best_on_test":
        return _cheapest_best(np.ones(flops.shape, dtype=bool), flops, accuracy)
    fits = flops <= float(budget) * backbone_flops
    if not fits.any():
        return None
    if rule == "costliest":
        return _last(fits & (flops == flops[fits].max()))
    return _cheapest_best(fits, flops, accuracy)


def _last(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[-1])


def _cheapest_best(fits: np.ndarray, flops: np.ndarray, accuracy: np.ndarray) -> int:
    candidates = np.flatnonzero(fits & (accuracy == accuracy[fits].max()))
    return int(candidates[np.argmin(flops[candidates])])


def budget_accuracy(
    flops: Sequence[float] | np.ndarray,
    accuracy: Sequence[float] | np.ndarray,
    backbone_flops: float,
    budget: Budget,
    rule: BudgetRule = "costliest",
) -> float:
    """Accuracy at `budget` on one curve (NaN if no point fits): see `budget_point`."""
    point = budget_point(flops, accuracy, backbone_flops, budget, rule)
    return math.nan if point is None else float(np.asarray(accuracy, dtype=np.float64)[point])


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(mean, std) over seeds: sample std (ddof=1, as the paper's code) for n > 1, 0 for a single
    value, NaNs for none. NaNs propagate: a budget one seed cannot meet is not averaged over the others."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    if arr.size == 1:
        return float(arr[0]), 0.0 if np.isfinite(arr[0]) else math.nan
    return float(arr.mean()), float(arr.std(ddof=1))


@dataclass(frozen=True)
class Reading:
    """One budget read over seeds: the mean and std of the accuracy, and the point each seed reports."""

    mean: float
    std: float
    points: tuple[int | None, ...]  # per seed, the index of its curve point (None: the budget cannot be met)


def read_budget(curves: Sequence[Curve], backbone_flops: float, budget: Budget, rule: BudgetRule = "costliest",
                averaging: SeedAveraging = "curve") -> Reading:
    """`budget` read over the seeds' curves (one (flops, accuracy) pair per seed).

    "curve" (the paper's): the seeds' curves, which must have one point per threshold of the same
    grid, averaged point by point; the budget picks a point of the mean curve, and every seed
    reports that same point. "budget": each seed's own curve is read, then the readings averaged.
    """
    if averaging not in SEED_AVERAGINGS:
        raise ValueError(f"unknown seed averaging {averaging!r}; known: {list(SEED_AVERAGINGS)}")
    flops = [np.asarray(f, dtype=np.float64) for f, _ in curves]
    accuracy = [np.asarray(a, dtype=np.float64) for _, a in curves]
    if not curves:
        return Reading(math.nan, math.nan, ())
    if averaging == "curve":
        if len({f.shape for f in flops}) > 1:
            raise ValueError("seed_averaging 'curve' averages the seeds' curves threshold by threshold: they need the "
                             f"same thresholds, got curves of {sorted({len(f) for f in flops})} points")
        point = budget_point(np.mean(flops, axis=0), np.mean(accuracy, axis=0), backbone_flops, budget, rule)
        points: tuple[int | None, ...] = (point,) * len(curves)
    else:
        points = tuple(budget_point(f, a, backbone_flops, budget, rule) for f, a in zip(flops, accuracy))
    mean, std = mean_std([math.nan if p is None else a[p] for p, a in zip(points, accuracy)])
    return Reading(mean, std, points)


def budget_label(budget: Budget) -> str:
    """How a budget is named in tables: "0.25", "0.5", "0.75", "1.0", "max", "best_on_test"."""
    return budget if isinstance(budget, str) else str(float(budget))


def budget_table(
    curves_by_regime: Mapping[str, Sequence[Curve]],
    backbone_flops: float,
    budgets: Sequence[Budget] = DEFAULT_BUDGETS,
    rule: BudgetRule = "costliest",
    averaging: SeedAveraging = "curve",
) -> list[dict[str, object]]:
    """Rows (regime, budget, accuracy_mean, accuracy_std, n_seeds): one per regime and budget.

    `curves_by_regime[regime]` holds one (flops, accuracy) curve per seed.
    """
    rows: list[dict[str, object]] = []
    for regime, curves in curves_by_regime.items():
        for budget in budgets:
            reading = read_budget(curves, backbone_flops, budget, rule, averaging)
            rows.append({"regime": regime, "budget": budget_label(budget), "accuracy_mean": reading.mean,
                         "accuracy_std": reading.std, "n_seeds": len(curves)})
    return rows


@dataclass(frozen=True)
class Readout:
    """How a study's curves were swept and read: what the report states under each budget table."""

    thresholds: int = 100
    spacing: str = "uniform"  # stages.core.evaluation.Spacing
    rule: BudgetRule = "costliest"
    averaging: SeedAveraging = "curve"
    budgets: tuple[str, ...] = ()  # the labels of the budgets the table shows

    def describe(self) -> list[str]:
        """One line each: the thresholds, the budget rule, Max, the seeds; a variant of exitflow's own
        is named as such, and one that looks at test labels says so."""
        paper = " (the paper's)"
        if self.spacing == "uniform":
            lines = [f"thresholds: {self.thresholds}, evenly spaced over the criterion's range{paper}"]
        else:
            lines = [f"thresholds: {self.thresholds}, at quantiles of the ICs' confidences (exitflow's spacing, "
                     "not the paper's)"]
        if self.rule == "costliest":
            lines.append(f"budget b: the costliest curve point within b x the backbone's FLOPs{paper}")
        else:
            lines.append("budget b: the most accurate curve point within b x the backbone's FLOPs (budget_rule: best, "
                         "selected on test labels: optimistic, not the paper's)")
        if "max" in self.budgets:
            lines.append(f"max: the costliest point of the curve, every sample at the final exit{paper}")
        if "best_on_test" in self.budgets:
            lines.append("best_on_test: the most accurate point anywhere on the curve, selected on test labels "
                         "(optimistic, not the paper's Max)")
        if self.averaging == "curve":
            lines.append(f"seeds: curves averaged threshold by threshold, then read; std over seeds at that point{paper}")
        else:
            lines.append("seeds: each seed's curve read at the budget, then averaged (exitflow's, not the paper's)")
        return lines
