"""The loss-landscape analysis stage: every exit's loss around each regime's final model (paper App. A).

Joined to a study by `analyses.landscape.enabled`: one node per regime and seed, reading that
regime's final model. The maths is `stages.core.analysis.landscape`.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field, field_validator

from exitflow.pipeline.dag import Graph, Node
from exitflow.pipeline.resolve import data_spec
from exitflow.pipeline.spec import StudySpec
from exitflow.pipeline.spec_types import AnalysisSection, Float, Int, with_settings
from exitflow.pipeline.stage import FILES, File, StageContext, StageInput, StageResult, Table, TableKind, register_stage
from exitflow.stages.analysis_inputs import ModelAnalysis, Split, load_model
from exitflow.stages.core.allowed import MAX_GRID, MAX_SAMPLES
from exitflow.stages.core.data import DataSpec


class LandscapeAnalysis(AnalysisSection):
    """`analyses.landscape`: the loss of every exit (and their sum) around each regime's final model, on
    a plane of two filter-normalised random directions (paper App. A, Fig. 17)."""

    name = "landscape"
    split: Split = "test"
    samples: Int = Field(500, ge=1, le=MAX_SAMPLES)  # the images every grid point is evaluated on
    steps: Int = Field(21, ge=3, le=MAX_GRID)  # points per axis (odd: the centre is the model); the paper: 100 x 100
    span: Float = Field(1.0, gt=0.0)  # the grid covers [-span, span]^2 in units of the directions

    @field_validator("steps")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"steps must be odd, so the grid's centre is the model itself; got {v}")
        return v


@with_settings(LandscapeAnalysis)
class LandscapeConfig:
    """A landscape node's config: the regime's model, and the section's settings: the batch (split,
    samples) and the grid of points around the model (steps, span)."""

    seed: int
    regime: str
    data: DataSpec


LANDSCAPE = TableKind("landscape", "landscape.parquet", ("a", "b", "exit", "loss"))


@register_stage
class Landscape(ModelAnalysis):
    kind = "analyze.landscape"
    section = LandscapeAnalysis
    plan_order = 31
    writes = (LANDSCAPE, FILES)
    code = ("exitflow.stages.analyze_landscape", "exitflow.stages.analysis_inputs", "exitflow.stages.core.analysis.landscape", "exitflow.stages.core.analysis.batch")

    def plan(self, spec: StudySpec, graph: Graph) -> list[Node]:
        cfg = self.spec_section(spec)
        if cfg is None or not cfg.enabled:
            return []
        settings = cfg.settings()
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
        from exitflow.stages.core.analysis.batch import analysis_batch
        from exitflow.stages.core.analysis.landscape import loss_landscape, plot_landscape
        from exitflow.stages.core.data import load_splits

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
