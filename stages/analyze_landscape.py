"""The loss-landscape analysis stage: every exit's loss around each regime's final model (paper App. A).

Joined to a study by `analyses.landscape.enabled`: one node per regime and seed, reading that
regime's final model. The maths is `stages.core.analysis.landscape`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.resolve import data_spec
from pipeline.stage import FILES, File, StageContext, StageInput, StageResult, Table, TableKind, register_stage
from stages.analysis_inputs import ModelAnalysis, load_model
from stages.core.data import DataSpec

if TYPE_CHECKING:
    from pipeline.graph import Graph, Node
    from pipeline.spec import StudySpec

@dataclass(frozen=True)
class LandscapeConfig:
    """A landscape node's config: the batch, and the grid of points around the regime's model."""

    seed: int
    regime: str
    data: DataSpec
    split: str  # train | test | val
    samples: int
    steps: int  # points per axis (odd: the centre is the model)
    span: float


LANDSCAPE = TableKind("landscape", "landscape.parquet", ("a", "b", "exit", "loss"))


@register_stage
class Landscape(ModelAnalysis):
    kind = "analyze.landscape"
    writes = (LANDSCAPE, FILES)
    code = ("stages.analyze_landscape", "stages.analysis_inputs", "stages.core.analysis.landscape", "stages.core.analysis.batch")

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
                config = LandscapeConfig(seed=n.seed, regime=n.regime, data=data_spec(spec), **settings)
                nodes.append(Node(id=n.id.replace("/evaluate", "/analyze/landscape"), kind=self.kind, config=config,
                                  inputs=(model,), phase=n.phase, regime=n.regime, seed=n.seed))
        return nodes

    def describe(self, summary: dict[str, Any]) -> str:
        return f" centre_loss={summary.get('centre_loss', float('nan')):.4f} points={summary.get('points')}"

    def run(self, node: Node, inputs: list[StageInput], ctx: StageContext) -> StageResult:
        from stages.core.analysis.batch import analysis_batch
        from stages.core.analysis.landscape import loss_landscape, plot_landscape
        from stages.core.data import load_splits

        cfg: LandscapeConfig = node.config
        seed = cfg.seed
        device = ctx.settings.device()
        x, y = analysis_batch(load_splits(cfg.data, seed), cfg.split, cfg.samples, seed)
        [model] = inputs
        rows = loss_landscape(load_model(model, device), x.to(device), y.to(device), cfg.steps, cfg.span, seed)
        centre = next(r["loss"] for r in rows if r["a"] == 0.0 and r["b"] == 0.0 and r["exit"] == -1)
        plot = plot_landscape(rows, ctx.workdir / "landscape.png", f"{cfg.regime}: loss around the model (seed {seed})")
        return StageResult(artifacts=[Table(LANDSCAPE.name, pa.Table.from_pylist(rows)), File(plot)],
                           metrics={"centre_loss": centre, "max_loss": max(r["loss"] for r in rows if r["exit"] == -1)},
                           summary={"centre_loss": centre, "points": cfg.steps ** 2})
