"""The rank analysis stage: numerical rank of every backbone layer, per regime's model (paper Fig. 3).

Joined to a study by `analyses.rank.enabled`: one node per seed, reading P1's model (whose backbone
is disjoint's: P3 freezes it), mixed's and joint's final models, whichever the study trains. The
maths is `stages.core.analysis.rank`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.resolve import data_spec
from pipeline.stage import (CHECKPOINT, FILES, File, Resources, RunSettings, Stage, StageContext, StageInput, StageResult,
                            Table, TableKind, register_stage)
from stages.analysis_inputs import compared_models, load_model
from stages.core.data import DataSpec

if TYPE_CHECKING:
    from pipeline.graph import Graph, Node
    from pipeline.spec import StudySpec

@dataclass(frozen=True)
class RankConfig:
    """A rank node's config: the models compared (labels, in input order) and the batch their layers see."""

    seed: int
    data: DataSpec
    models: tuple[str, ...]
    split: str  # test | val
    samples: int
    features: int
    rtol: float | None


RANK = TableKind("rank", "rank.parquet", ("model", "index", "layer", "rank", "rows", "columns", "full_columns"))


@register_stage
class Rank(Stage):
    kind = "analyze.rank"
    reads = (CHECKPOINT,)
    writes = (RANK, FILES)
    code = ("stages.analyze_rank", "stages.core.analysis.rank", "stages.core.analysis.batch")
    unkeyed = (("data", "download"),)

    def plan(self, spec: StudySpec, graph: Graph) -> list[Node]:
        from pipeline.graph import Node

        cfg = spec.analyses.rank
        if not cfg.enabled:
            return []
        nodes = []
        for seed in spec.seeds:
            models = compared_models(graph, seed)
            if not models:
                continue
            config = RankConfig(seed=seed, data=data_spec(spec), models=tuple(models),
                                **cfg.model_dump(mode="json", exclude={"enabled"}))
            nodes.append(Node(id=f"seed{seed}/analyze/rank", kind=self.kind, config=config, inputs=tuple(models.values()),
                              seed=seed))
        return nodes

    def resources(self, node: Node, settings: RunSettings) -> Resources:
        return settings.net_task()

    def describe(self, summary: dict[str, Any]) -> str:
        return f" layers={summary.get('layers')}"

    def run(self, node: Node, inputs: list[StageInput], ctx: StageContext) -> StageResult:
        from stages.core.analysis.batch import analysis_batch
        from stages.core.analysis.rank import layer_ranks, plot_ranks
        from stages.core.data import load_splits

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

