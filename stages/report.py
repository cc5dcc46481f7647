"""The report stage: every regime and seed joined into the budget table and the trade-off plots.

The compute is `stages.core.report.run`; this module gathers its inputs (each evaluate node's
tables and the learning rates its phases chose) and declares what the stage writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.stage import FILES, File, Stage, StageContext, StageInput, StageResult, Table, TableKind, register_stage
from stages.core import faults

if TYPE_CHECKING:
    from pipeline.graph import Node

EXITS, CURVE = "exits", "curve"  # read from each evaluate node (their writer, stages.evaluate, holds their schemas)
BUDGETS = TableKind("budgets", "budgets.parquet", ("regime", "budget", "accuracy_mean", "accuracy_std", "n_seeds"))


@dataclass(frozen=True)
class ReportConfig:
    """The report node's config: which budgets and criteria its table and plots show, over which regimes and seeds."""

    budgets: tuple[float | str, ...]  # fractions of the backbone's FLOPs, or "max"
    criteria: tuple[str, ...]
    regimes: tuple[str, ...]
    seeds: tuple[int, ...]


@register_stage
class Report(Stage):
    kind = "report"
    reads = (EXITS, CURVE)
    writes = (BUDGETS, FILES)
    code = ("stages.report", "stages.core.report")

    def run(self, node: Node, inputs: list[StageInput], ctx: StageContext) -> StageResult:
        from stages.core import report

        curves, exits, lrs, notes, backbone = {}, {}, {}, [], None
        for res in inputs:  # node ids: seed<S>/<regime>/evaluate
            regime, seed = res.node_id.split("/")[1], int(res.node_id.split("/")[0].removeprefix("seed"))
            curves[(regime, seed)] = res.table(CURVE)
            exits[(regime, seed)] = table = res.table(EXITS)
            backbone = float(table.schema.metadata[b"backbone_flops"])
            for phase, lr in res.summary.get("lrs", {}).items():
                lrs.setdefault(regime, {}).setdefault(phase, []).append(lr)
            for phase, bad in sorted(res.summary.get("diverged", {}).items()):
                node_id = f"seed{seed}/P1" if phase == "P1" else f"seed{seed}/{regime}/{phase}"  # P1 is shared
                line = f"{node_id} search: diverged, ranked last: {', '.join(bad)}"
                if line not in notes:
                    notes.append(line)
        assert backbone is not None, "a report needs at least one evaluated model"
        faults.hit(ctx.fault_plan, "report", node=node.id)
        chosen = {r: {p: _one_or_list(v) for p, v in sorted(ph.items())} for r, ph in lrs.items()}
        cfg: ReportConfig = node.config
        criteria = list(cfg.criteria)
        out = report.run(curves, exits, backbone, list(cfg.budgets), criteria, ctx.workdir, ctx.settings.study_name, chosen, notes)
        text = ctx.workdir / "budgets.txt"
        text.write_text(out.text + "\n")
        metrics = {f"acc_{row['regime']}_budget_{row['budget']}": row["accuracy_mean"] for row in out.budgets.to_pylist()
                   if row["criterion"] == criteria[0] and row["accuracy_mean"] == row["accuracy_mean"]}
        return StageResult(artifacts=[Table(BUDGETS.name, out.budgets), *map(File, out.plots), File(text)],
                           metrics=metrics, summary={"chosen_lrs": chosen})


def _one_or_list(values: list[float]) -> float | list[float]:
    uniq = sorted(set(values))
    return uniq[0] if len(uniq) == 1 else uniq
