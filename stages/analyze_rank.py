"""The rank analysis stage: numerical rank of every backbone layer, per regime's model (paper Fig. 3).

Joined to a study by `analyses.rank.enabled`: one node per seed, reading P1's model (whose backbone
is disjoint's: P3 freezes it), mixed's and joint's final models, whichever the study trains. The
maths is `stages.core.analysis.rank`.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from exitflow.pipeline.dag import Node
from exitflow.pipeline.spec_types import AnalysisSection, Float, Int, with_settings
from exitflow.pipeline.stage import FILES, File, StageContext, StageInput, StageResult, Table, TableKind, register_stage
from exitflow.stages.analysis_inputs import ComparisonAnalysis, ComparisonConfig, Split, load_model
from exitflow.stages.core.allowed import MAX_SAMPLES


class RankAnalysis(AnalysisSection):
    """`analyses.rank`: numerical rank of every backbone layer's output (paper Fig. 3): P1's backbone
    (= disjoint's), mixed, joint."""

    name = "rank"
    split: Split = "test"
    samples: Int = Field(1000, ge=2, le=MAX_SAMPLES)  # the batch: rows of each layer's matrix (the paper: the test set)
    features: Int = Field(6000, ge=1, le=MAX_SAMPLES)  # columns kept per layer, the same random subset across models
    rtol: Float | None = Field(None, gt=0.0)  # None: s_max * max(m, n) * float32 eps (numpy's rule)


@with_settings(RankAnalysis)
class RankConfig(ComparisonConfig):
    """A rank node's config: the compared models, and the section's settings: their batch (split,
    samples) and how rank is measured (features, rtol)."""


RANK = TableKind("rank", "rank.parquet", ("model", "index", "layer", "rank", "rows", "columns", "full_columns"))


@register_stage
class Rank(ComparisonAnalysis):
    kind = "analyze.rank"
    section = RankAnalysis
    config_type = RankConfig
    plan_order = 30  # the analyses list in this order: rank, landscape, mutual information, connectivity
    writes = (RANK, FILES)
    code = ("exitflow.stages.analyze_rank", "exitflow.stages.analysis_inputs", "exitflow.stages.core.analysis.rank", "exitflow.stages.core.analysis.batch")

    def describe(self, summary: dict[str, Any]) -> str:
        return f" layers={summary.get('layers')}"

    def run(self, node: Node, inputs: list[StageInput], ctx: StageContext) -> StageResult:
        from exitflow.stages.core.analysis.batch import analysis_batch
        from exitflow.stages.core.analysis.rank import layer_ranks, plot_ranks
        from exitflow.stages.core.data import load_splits

        cfg: RankConfig = node.config
        device = ctx.settings.device()
        x, _ = analysis_batch(load_splits(cfg.data, cfg.seed), cfg.split, cfg.samples, cfg.seed)
        ranks = {}
        for label, model in zip(cfg.models, inputs, strict=True):
            ranks[label] = layer_ranks(load_model(model, device), x.to(device), cfg.features, cfg.rtol)
        rows = [{"model": label, **r.__dict__} for label, rs in ranks.items() for r in rs]
        plot = plot_ranks(ranks, ctx.workdir / "rank.png", f"numerical rank per layer (seed {cfg.seed}, {x.shape[0]} samples)")
        return StageResult(artifacts=[Table(RANK.name, pa.Table.from_pylist(rows)), File(plot)],
                           metrics={f"mean_rank_share_{label.split()[0]}": sum(r.rank / min(r.rows, r.columns) for r in rs) / len(rs)
                                    for label, rs in ranks.items()},
                           summary={"layers": len(next(iter(ranks.values())))})

