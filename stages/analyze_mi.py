"""The mutual-information analysis stage: I(X; Z) per backbone block, per regime's model (paper Fig. 5).

Joined to a study by `analyses.mutual_information.enabled`: one node per seed, reading P1's model
(= disjoint's backbone), mixed's and joint's. The estimator is `stages.core.analysis.mutual_information`.
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
class MutualInformationConfig:
    """A mutual-information node's config: the models compared (labels, in input order), the batch, the noise."""

    seed: int
    data: DataSpec
    models: tuple[str, ...]
    split: str  # test | val
    samples: int
    noise: float  # the noise's std as a share of each block's activation RMS
    draws: int


MUTUAL_INFORMATION = TableKind("mutual_information", "mutual_information.parquet",
                               ("model", "index", "mi", "lower", "upper", "noise_std", "dims"))


@register_stage
class MutualInformation(Stage):
    kind = "analyze.mutual_information"
    reads = (CHECKPOINT,)
    writes = (MUTUAL_INFORMATION, FILES)
    code = ("stages.analyze_mi", "stages.core.analysis.mutual_information", "stages.core.analysis.batch")
    unkeyed = (("data", "download"),)

    def plan(self, spec: StudySpec, graph: Graph) -> list[Node]:
        from pipeline.graph import Node

        cfg = spec.analyses.mutual_information
        if not cfg.enabled:
            return []
        nodes = []
        for seed in spec.seeds:
            models = compared_models(graph, seed)
            if models:
                config = MutualInformationConfig(seed=seed, data=data_spec(spec), models=tuple(models),
                                                 **cfg.model_dump(mode="json", exclude={"enabled"}))
                nodes.append(Node(id=f"seed{seed}/analyze/mutual_information", kind=self.kind, config=config,
                                  inputs=tuple(models.values()), seed=seed))
        return nodes

    def resources(self, node: Node, settings: RunSettings) -> Resources:
        return settings.net_task()

    def describe(self, summary: dict[str, Any]) -> str:
        return f" blocks={summary.get('blocks')}"

    def run(self, node: Node, inputs: list[StageInput], ctx: StageContext) -> StageResult:
        from stages.core.analysis.batch import analysis_batch
        from stages.core.analysis.mutual_information import block_mutual_information, plot_mutual_information
        from stages.core.data import load_splits

        cfg: MutualInformationConfig = node.config
        seed = cfg.seed
        device = ctx.settings.device()
        x, _ = analysis_batch(load_splits(cfg.data, seed), cfg.split, cfg.samples, seed)
        mi = {label: block_mutual_information(load_model(model, device), x.to(device), cfg.noise, cfg.draws, seed)
              for label, model in zip(cfg.models, inputs, strict=True)}
        rows = [{"model": label, **r.__dict__} for label, rs in mi.items() for r in rs]
        plot = plot_mutual_information(mi, ctx.workdir / "mutual_information.png",
                                       f"I(X; Z) per block (seed {seed}, noise {cfg.noise} x RMS)", x.shape[0])
        return StageResult(artifacts=[Table(MUTUAL_INFORMATION.name, pa.Table.from_pylist(rows)), File(plot)],
                           summary={"blocks": len(next(iter(mi.values())))})
