"""Report rendering: the FLOPs-accuracy trade-off plot and the fixed-width budget table.

Uses matplotlib's object API on an Agg canvas (no pyplot): no global figure state, safe in Ray workers.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from exitflow.stages.core.budgets import DEFAULT_BUDGETS, NAMED_BUDGETS, Readout, budget_label

Curve = tuple[Sequence[float], Sequence[float]]  # (flops, accuracy) of one seed
GRID_POINTS = 200
REGIME_ORDER = ("joint", "disjoint", "mixed")


def ordered(labels: Sequence[str]) -> list[str]:
    """Rows in the paper's regime order; a regime's variants ("joint phases.P2.lr=0.01") in the
    order given (the axis's order); anything else after them, alphabetically."""
    def rank(item: tuple[int, str]) -> tuple[int, int, str]:
        i, label = item
        regime = label.split(" ")[0]
        return (REGIME_ORDER.index(regime), i, "") if regime in REGIME_ORDER else (len(REGIME_ORDER), 0, label)

    return [label for _, label in sorted(enumerate(dict.fromkeys(labels)), key=rank)]


def _monotone(flops: Sequence[float], accuracy: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """A curve as strictly increasing FLOPs (ties averaged), as np.interp requires."""
    x = np.asarray(flops, dtype=np.float64)
    y = np.asarray(accuracy, dtype=np.float64)
    xs, inverse = np.unique(x, return_inverse=True)
    ys = np.bincount(inverse, weights=y) / np.bincount(inverse)
    return xs, ys


def interpolate_curves(curves: Sequence[Curve], num_points: int = GRID_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Put every seed's curve on one FLOPs grid: (grid [G], accuracy [S, G]).

    The grid spans the FLOPs range all seeds cover, so no seed is extrapolated; if the ranges
    do not overlap it spans their union and np.interp holds the end values.
    """
    mono = [_monotone(f, a) for f, a in curves]
    lo = max(x[0] for x, _ in mono)
    hi = min(x[-1] for x, _ in mono)
    if lo >= hi:
        lo, hi = min(x[0] for x, _ in mono), max(x[-1] for x, _ in mono)
    grid = np.linspace(lo, hi, num_points) if hi > lo else np.array([lo])
    return grid, np.stack([np.interp(grid, x, y) for x, y in mono])


def plot_tradeoff(
    curves_by_regime: Mapping[str, Sequence[Curve]],
    fixed_points_by_regime: Mapping[str, Sequence[Curve]],
    backbone_flops: float,
    path: str | Path,
    title: str,
) -> Path:
    """Write the FLOPs-accuracy PNG: per regime, mean curve over seeds +- std band and the fixed-exit points.

    `curves_by_regime[regime]`: one (flops, accuracy) threshold curve per seed;
    `fixed_points_by_regime[regime]`: one (exit_flops, exit_accuracy) per seed. FLOPs are plotted
    relative to the plain backbone; accuracy in percent.
    """
    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    regimes = ordered(list(dict.fromkeys([*curves_by_regime, *fixed_points_by_regime])))
    palette = {r: f"C{i}" for i, r in enumerate(regimes)}  # a regime keeps its colour across curve and points
    for regime in ordered(list(curves_by_regime)):
        curves = curves_by_regime[regime]
        if not curves:
            continue
        grid, acc = interpolate_curves(curves)
        mean = acc.mean(axis=0) * 100
        std = (acc.std(axis=0, ddof=1) if len(acc) > 1 else np.zeros_like(mean)) * 100
        x = grid / backbone_flops
        ax.plot(x, mean, color=palette[regime], label=f"{regime} (n={len(curves)})")
        ax.fill_between(x, mean - std, mean + std, color=palette[regime], alpha=0.2, linewidth=0)
    for regime in ordered(list(fixed_points_by_regime)):
        points = fixed_points_by_regime[regime]
        if not points:
            continue
        flops = np.mean([np.asarray(f, dtype=np.float64) for f, _ in points], axis=0)
        accs = np.stack([np.asarray(a, dtype=np.float64) for _, a in points]) * 100
        err = accs.std(axis=0, ddof=1) if len(accs) > 1 else None
        ax.errorbar(
            flops / backbone_flops,
            accs.mean(axis=0),
            yerr=err,
            fmt="o",
            color=palette[regime],
            markersize=4,
            capsize=2,
            label=f"{regime} fixed exits",
        )
    ax.axvline(1.0, color="0.6", linestyle=":", linewidth=1)  # the plain backbone's cost: budget 1.0
    ax.set_xlabel(f"mean FLOPs per sample / backbone FLOPs (backbone = {backbone_flops / 1e6:.3g} MFLOPs)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def plot_lr_search(lrs: Sequence[float], best_val: Sequence[float], chosen: float, path: str | Path, title: str) -> Path:
    """Best validation score of every trial against its learning rate (log x), the winner marked."""
    fig = Figure(figsize=(5.5, 3.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    order = np.argsort(np.asarray(lrs, dtype=np.float64))
    x = np.asarray(lrs, dtype=np.float64)[order]
    y = np.asarray(best_val, dtype=np.float64)[order] * 100
    ax.plot(x, y, "o-", color="C0")
    ax.plot([chosen], [y[np.argmin(np.abs(x - chosen))]], "*", color="C3", markersize=14, label=f"chosen lr={chosen:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("best validation accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _format_lrs(lrs: Any) -> str:
    """A regime's chosen learning rates: {"P1": 5e-4, "P3": 1.5e-3} -> "P1=0.0005 P3=0.0015".

    Three significant digits: sampled (log-uniform) rates keep what distinguishes them. Seeds
    that chose differently show as a list.
    """
    if isinstance(lrs, Mapping):
        return " ".join(f"{k}={_format_lrs(v)}" for k, v in lrs.items())
    if isinstance(lrs, float):
        return f"{lrs:.3g}"
    if isinstance(lrs, list):
        return "[" + ",".join(_format_lrs(v) for v in lrs) + "]"
    return str(lrs)


def format_budget_table(rows: Sequence[Mapping[str, Any]], chosen_lrs: Mapping[str, Any] | None = None,
                        criterion: str | None = None, budget_rule: str = "costliest") -> str:
    """Fixed-width text: one line per regime, one "mean ± std" column per budget (accuracy in %).

    `chosen_lrs` (regime -> lr, or regime -> {phase: lr}) adds a column with each regime's learning rates;
    `criterion` names the exit criterion in the title.
    """
    budgets: list[str] = []
    cells: dict[str, dict[str, str]] = {}
    seeds: dict[str, int] = {}
    for row in rows:
        regime, budget = str(row["regime"]), str(row["budget"])
        if budget not in budgets:
            budgets.append(budget)
        mean, std = float(row["accuracy_mean"]), float(row["accuracy_std"])
        cells.setdefault(regime, {})[budget] = "-" if math.isnan(mean) else f"{100 * mean:.2f} ± {100 * std:.2f}"
        seeds[regime] = int(row["n_seeds"])
    canonical = [*dict.fromkeys([*map(budget_label, DEFAULT_BUDGETS), *NAMED_BUDGETS])]
    budgets.sort(key=lambda b: canonical.index(b) if b in canonical else len(canonical))
    header = ["regime", "seeds", *(b if b in NAMED_BUDGETS else f"{b}x" for b in budgets)]
    if chosen_lrs is not None:
        header.append("lr")
    lines = []
    for regime in ordered(list(cells)):
        line = [regime, str(seeds[regime]), *(cells[regime].get(b, "") for b in budgets)]
        if chosen_lrs is not None:
            line.append(_format_lrs(chosen_lrs.get(regime, "")))
        lines.append(line)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    # Text columns (regime, lr) read left-aligned; numbers right-aligned so the decimals line up.
    left = {0, len(header) - 1} if chosen_lrs is not None else {0}

    def render(cols: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))).rstrip()

    rule = "-" * len(render(header))
    title = "test accuracy (%) at FLOPs budget (x backbone), mean ± std over seeds"
    if criterion is not None:
        title += f"; exit criterion: {criterion}"
    if budget_rule != "costliest":  # the paper's rule goes unsaid; another is named
        title += f"; budget rule: {budget_rule}"
    return "\n".join([title, render(header), rule, *(render(line) for line in lines)])


def format_readout(readout: Readout, budgets: Sequence[str]) -> str:
    """The lines under a budget table that say how it was read (`Readout.describe`), wrapped to 100 columns."""
    shown = Readout(readout.thresholds, readout.spacing, readout.rule, readout.averaging, tuple(budgets))
    return "\n".join(textwrap.wrap("read: " + "; ".join(shown.describe()), 100, subsequent_indent="  "))
