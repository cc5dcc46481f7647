"""The mutual-information analysis stage: I(X; Z) per backbone block, per regime's model (paper Fig. 5).

Joined to a study by `analyses.mutual_information.enabled`: one node per seed, reading P1's model
(= disjoint's backbone), mixed's and joint's. The estimators (Kawaguchi et al. 2023's `jensen`, the
paper's, and `mc`; exitflow's earlier `relative_noise`) are `stages.core.analysis.mutual_information`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.stage import FILES, File, StageContext, StageInput, StageResult, Table, TableKind, register_stage
from stages.analysis_inputs import ComparisonAnalysis, ComparisonConfig, load_model
from stages.core.analysis.mutual_information import (  # torch-free at import
    DEFAULTS,
    MIEstimator,
    block_mutual_information,
    estimator_setting,
    plot_mutual_information,
)

if TYPE_CHECKING:
    from pipeline.graph import Node


@dataclass(frozen=True)
class MutualInformationConfig(ComparisonConfig):
    """A mutual-information node's config: the compared models and their batch, the estimator and
    its settings (`stages.core.analysis.mutual_information.MIEstimator`): the ones it reads, its
    defaults filled in (so an explicit default keys as the unset one), the others None."""

    estimator: str  # jensen | mc | relative_noise
    noise_std: float | None  # jensen, mc: the noise's std, absolute
    noise: float | None  # relative_noise: the noise's std as a share of the median pairwise distance
    draws: int | None  # mc, relative_noise: noise draws per sample

    def __post_init__(self) -> None:
        for name in DEFAULTS:  # frozen: fill through object.__setattr__, as dataclasses do
            object.__setattr__(self, name, estimator_setting(self.estimator, name, getattr(self, name)))


MUTUAL_INFORMATION = TableKind("mutual_information", "mutual_information.parquet",
                               ("model", "index", "mi", "lower", "upper", "noise_std", "dims"))


@register_stage
class MutualInformation(ComparisonAnalysis):
    kind = "analyze.mutual_information"
    section = "mutual_information"
    config_type = MutualInformationConfig
    writes = (MUTUAL_INFORMATION, FILES)
    code = ("stages.analyze_mi", "stages.analysis_inputs", "stages.core.analysis.mutual_information",
            "stages.core.analysis.batch")

    def describe(self, summary: dict[str, Any]) -> str:
        return f" blocks={summary.get('blocks')}"

    def run(self, node: Node, inputs: list[StageInput], ctx: StageContext) -> StageResult:
        from stages.core.analysis.batch import analysis_batch
        from stages.core.data import load_splits

        cfg: MutualInformationConfig = node.config
        seed = cfg.seed
        device = ctx.settings.device()
        estimator = MIEstimator(cfg.estimator, cfg.noise_std, cfg.noise, cfg.draws)
        x, _ = analysis_batch(load_splits(cfg.data, seed), cfg.split, cfg.samples, seed)
        mi = {label: block_mutual_information(load_model(model, device), x.to(device), estimator, seed)
              for label, model in zip(cfg.models, inputs, strict=True)}
        rows = [{"model": label, **r.__dict__} for label, rs in mi.items() for r in rs]
        plot = plot_mutual_information(mi, ctx.workdir / "mutual_information.png",
                                       f"I(X; Z) per block, seed {seed}\n{estimator.describe()}", x.shape[0])
        return StageResult(artifacts=[Table(MUTUAL_INFORMATION.name, pa.Table.from_pylist(rows)), File(plot)],
                           summary={"blocks": len(next(iter(mi.values())))})
