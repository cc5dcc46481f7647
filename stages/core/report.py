"""The report stage: join every regime and seed into the budget table and the trade-off plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from stages.core.evaluation import Budget, budget_table
from stages.core.report_plots import format_budget_table, plot_tradeoff


@dataclass
class ReportOutput:
    budgets: pa.Table  # criterion, regime, budget, accuracy_mean, accuracy_std, n_seeds
    plots: list[Path]  # tradeoff.png (first criterion), tradeoff_<criterion>.png for the others
    text: str  # the readable budget tables, one per criterion, and the notes


def run(
    curves: Mapping[tuple[str, int], pa.Table],
    exits: Mapping[tuple[str, int], pa.Table],
    backbone_flops: float,
    budgets: Sequence[Budget],
    criteria: Sequence[str],
    out_dir: Path,
    title: str,
    chosen_lrs: Mapping[str, Mapping[str, float]] | None = None,
    notes: Sequence[str] = (),
) -> ReportOutput:
    """`curves`/`exits` are keyed by (regime, seed), as the evaluate stage wrote them; `notes`
    (diverged learning rates, say) are printed under the table."""
    regimes = list(dict.fromkeys(r for r, _ in curves))
    fixed = {r: [_columns(exits[k], "flops", "accuracy") for k in exits if k[0] == r] for r in regimes}
    tables, plots, texts = [], [], []
    for i, criterion in enumerate(criteria):
        by_regime = {
            r: [_columns(_where(curves[k], criterion), "flops", "accuracy") for k in curves if k[0] == r] for r in regimes
        }
        rows = budget_table(by_regime, backbone_flops, budgets)
        tables.append(pa.Table.from_pylist([{"criterion": criterion, **row} for row in rows]))
        name = "tradeoff.png" if i == 0 else f"tradeoff_{criterion}.png"
        plots.append(plot_tradeoff(by_regime, fixed, backbone_flops, out_dir / name, f"{title} ({criterion})"))
        texts.append(format_budget_table(rows, chosen_lrs, criterion))
    text = "\n\n".join(texts) + "".join(f"\nnote: {n}" for n in notes)
    return ReportOutput(budgets=pa.concat_tables(tables), plots=plots, text=text)


def _where(table: pa.Table, criterion: str) -> pa.Table:
    mask = np.asarray(table.column("criterion").to_pylist()) == criterion
    return table.filter(pa.array(mask))


def _columns(table: pa.Table, *names: str) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(table.column(n).to_pylist(), dtype=np.float64) for n in names)
