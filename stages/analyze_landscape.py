"""The loss-landscape analysis stage: every exit's loss around each regime's final model (paper App. A).

Joined to a study by `analyses.landscape.enabled`: one node per regime and seed, reading that
regime's final model. The maths is `stages.core.analysis.landscape`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.resolve import data_spec
from pipeline.stage import (CHECKPOINT, FILES, File, Resources, RunSettings, Stage, StageContext, StageInput, StageResult,
                            Table, TableKind, register_stage)
from stages.analysis_inputs import load_model

if TYPE_CHECKING:
    from pipeline.graph import Graph, Node
    from pipeline.spec import StudySpec

LANDSCAPE = TableKind("landscape", "landscape.parquet", ("a", "b", "exit", "loss"))


@register_stage
class Landscape(Stage):
    kind = "analyze.landscape"
    reads = (CHECKPOINT,)
    writes = (LANDSCAPE, FILES)
    code = ("stages.analyze_landscape", "stages.core.analysis.landscape", "stages.core.analysis.batch", "pipeline.resolve")
    unkeyed = (("data", "download"),)

    def plan(self, spec: StudySpec, graph: Graph) -> list[Node]:
        from pipeline.graph import Node

        cfg = spec.analyses.landscape
        if not cfg.enabled:
            return []
        settings = cfg.model_dump(mode="json", exclude={"enabled"})
        nodes = []
        for n in list(graph.nodes.values()):
            if n.kind == "evaluate":  # one per regime's final model: the model its evaluation reads
                [model] = n.inputs
                config = {"seed": n.seed, "regime": n.regime, "data": spec.data.model_dump(mode="json"), **settings}
                nodes.append(Node(id=n.id.replace("/evaluate", "/analyze/landscape"), kind=self.kind, config=config,
                                  inputs=(model,), phase=n.phase, regime=n.regime, seed=n.seed))
        return nodes

    def resources(self, node: Node, settings: RunSettings) -> Resources:
        return settings.net_task()

    def describe(self, summary: dict[str, Any]) -> str:
        return f" centre_loss={summary.get('centre_loss', float('nan')):.4f} points={summary.get('points')}"

    def run(self, node: Node, inputs: list[StageInput], ctx: StageContext) -> StageResult:
        from stages.core.analysis.batch import analysis_batch
        from stages.core.analysis.landscape import loss_landscape, plot_landscape
        from stages.core.data import load_splits

        cfg = node.config
        seed = int(cfg["seed"])
        device = ctx.settings.device()
        x, y = analysis_batch(load_splits(data_spec(cfg["data"]), seed), cfg["split"], int(cfg["samples"]), seed)
        [model] = inputs
        rows = loss_landscape(load_model(model, device), x.to(device), y.to(device), int(cfg["steps"]), float(cfg["span"]), seed)
        centre = next(r["loss"] for r in rows if r["a"] == 0.0 and r["b"] == 0.0 and r["exit"] == -1)
        plot = plot_landscape(rows, ctx.workdir / "landscape.png", f"{cfg['regime']}: loss around the model (seed {seed})")
        return StageResult(artifacts=[Table(LANDSCAPE.name, pa.Table.from_pylist(rows)), File(plot)],
                           metrics={"centre_loss": centre, "max_loss": max(r["loss"] for r in rows if r["exit"] == -1)},
                           summary={"centre_loss": centre, "points": int(cfg["steps"]) ** 2})
