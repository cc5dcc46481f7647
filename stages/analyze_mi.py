"""The mutual-information analysis stage: I(X; Z) per backbone block, per regime's model (paper Fig. 5).

Joined to a study by `analyses.mutual_information.enabled`: one node per seed, reading P1's model
(= disjoint's backbone), mixed's and joint's. The estimators (Kawaguchi et al. 2023's `jensen`, the
paper's, and `mc`; exitflow's earlier `relative_noise`) are `stages.core.analysis.mutual_information`.
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator

from exitflow.pipeline.dag import Node
from exitflow.pipeline.spec_types import AnalysisSection, Float, Int, with_settings
from exitflow.pipeline.stage import FILES, File, StageContext, StageInput, StageResult, Table, TableKind, register_stage
from exitflow.stages.analysis_inputs import ComparisonAnalysis, ComparisonConfig, Split, load_model
from exitflow.stages.core.allowed import MAX_GRID, MAX_SAMPLES
from exitflow.stages.core.analysis.mutual_information import (  # torch-free at import
    DEFAULTS,
    MIEstimator,
    block_mutual_information,
    estimator_setting,
    plot_mutual_information,
)


class MutualInformationAnalysis(AnalysisSection):
    """`analyses.mutual_information`: I(X; Z) between the input and every block's noisy representation
    (paper Fig. 5, D.6)."""

    name = "mutual_information"
    split: Split = "test"
    samples: Int = Field(500, ge=2, le=MAX_SAMPLES)  # N: X is uniform over these images (I <= log N)
    # jensen (the paper's), mc: Kawaguchi et al. 2023's fixed-noise estimator; relative_noise: noise
    # scaled to each block's median pairwise distance (exitflow's earlier estimator)
    estimator: Literal["jensen", "mc", "relative_noise"] = "jensen"
    # Each estimator's own settings. Unset (null): the estimator's default (in parentheses; the stage
    # fills it in, so a spec's dump carries no default another estimator would refuse, e.g. in
    # `compare`); set for an estimator that does not read it: refused, never silently ignored.
    noise_std: Float | None = Field(None, gt=0.0)  # jensen, mc: the noise's std, absolute (1.0)
    noise: Float | None = Field(None, gt=0.0)  # relative_noise: std as a share of the median distance (0.25)
    draws: Int | None = Field(None, ge=1, le=MAX_GRID)  # mc, relative_noise: noise draws per sample (4)

    @field_validator("noise_std", "noise", "draws")
    @classmethod
    def _read_by_the_estimator(cls, v: float | int | None, info: ValidationInfo) -> float | int | None:
        if "estimator" in info.data:  # absent: the estimator itself is invalid, and its own error says so
            estimator_setting(info.data["estimator"], info.field_name or "", v)
        return v


@with_settings(MutualInformationAnalysis)
class MutualInformationConfig(ComparisonConfig):
    """A mutual-information node's config: the compared models, and the section's settings: their batch,
    the estimator and its settings (`stages.core.analysis.mutual_information.MIEstimator`): the ones it
    reads, its defaults filled in (so an explicit default keys as the unset one), the others None."""

    def __post_init__(self) -> None:
        for name in DEFAULTS:  # frozen: fill through object.__setattr__, as dataclasses do
            object.__setattr__(self, name, estimator_setting(self.estimator, name, getattr(self, name)))


MUTUAL_INFORMATION = TableKind("mutual_information", "mutual_information.parquet",
                               ("model", "index", "mi", "lower", "upper", "noise_std", "dims"))


@register_stage
class MutualInformation(ComparisonAnalysis):
    kind = "analyze.mutual_information"
    section = MutualInformationAnalysis
    config_type = MutualInformationConfig
    plan_order = 32
    writes = (MUTUAL_INFORMATION, FILES)
    code = ("exitflow.stages.analyze_mi", "exitflow.stages.analysis_inputs", "exitflow.stages.core.analysis.mutual_information",
            "exitflow.stages.core.analysis.batch")

    def describe(self, summary: dict[str, Any]) -> str:
        return f" blocks={summary.get('blocks')}"

    def run(self, node: Node, inputs: list[StageInput], ctx: StageContext) -> StageResult:
        from exitflow.stages.core.analysis.batch import analysis_batch
        from exitflow.stages.core.data import load_splits

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
