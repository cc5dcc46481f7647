"""What the analysis stages share: which models a study compares, loading one from its input, the
section fields every analysis has, and the stage shape of an analysis that compares the models per
seed (rank, mutual information)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from exitflow.pipeline.dag import Graph, Node
from exitflow.pipeline.resolve import data_spec
from exitflow.pipeline.spec import StudySpec
from exitflow.pipeline.spec_types import AnalysisSection
from exitflow.pipeline.stage import ANALYSIS, CHECKPOINT, Resources, RunSettings, Stage, StageInput
from exitflow.stages.core.data import DataSpec

# Which images an analysis reads, always with eval transforms: the test set, the validation share of
# the training set, or the training images the phases learn from (the paper's landscapes and connectivity).
Split = Literal["train", "test", "val"]

# The models a per-seed analysis compares, by the node that trains each (P1's backbone is disjoint's
# as well: P3 freezes it).
MODELS = {"P1 (= disjoint backbone)": "P1", "mixed": "mixed/P2", "joint": "joint/P2"}


def compared_models(graph: Graph, seed: int) -> dict[str, str]:
    """Label -> node id of the models the study trains for `seed`, among MODELS."""
    return {label: f"seed{seed}/{suffix}" for label, suffix in MODELS.items() if f"seed{seed}/{suffix}" in graph.nodes}


def load_model(model: StageInput, device: str) -> Any:
    """The input's trained net, on `device`, in eval mode."""
    from exitflow.stages.core.nets import NetSpec, create_net

    state, spec = model.checkpoint()
    net = create_net(NetSpec.from_dict(spec["net"]))
    net.load_state_dict(state)
    return net.to(device).eval()


class ModelAnalysis(Stage):
    """An analysis of trained models: reads their checkpoints, runs where a net runs (a GPU when
    the study trains on one); the data's download switch and its folder (data.identity keys its
    content) are not part of what it computes. It plans after the phases and their evaluations."""

    reads = (CHECKPOINT,)
    unkeyed = (("data", "download"), ("data", "root"))
    role = ANALYSIS
    data_context = "analysis"
    plan_order = 30

    def resources(self, node: Node, settings: RunSettings) -> Resources:
        return settings.net_task()


@dataclass(frozen=True)
class ComparisonConfig:
    """What every per-seed comparison's config holds: the models compared (labels, in input order), their
    seed and data; a kind's config adds its section's settings (`with_settings`: the batch their layers
    see, `split` and `samples`, and its own)."""

    seed: int
    data: DataSpec
    models: tuple[str, ...]


class ComparisonAnalysis(ModelAnalysis):
    """One node per seed comparing the regimes' models (`compared_models`), switched on by
    `analyses.<section>.enabled`; the section's other fields (`split`, `samples`, its own) complete
    `config_type` (declared `with_settings(section)`)."""

    section: ClassVar[type[AnalysisSection]]
    config_type: ClassVar[type[ComparisonConfig]]

    def plan(self, spec: StudySpec, graph: Graph) -> list[Node]:
        cfg = self.spec_section(spec)
        if cfg is None or not cfg.enabled:  # None: a kind that declares no section (never switched on)
            return []
        settings = cfg.settings()
        nodes = []
        for seed in spec.seeds:
            models = compared_models(graph, seed)
            if models:
                config = self.config_type(seed=seed, data=data_spec(spec), models=tuple(models), **settings)
                nodes.append(Node(id=f"seed{seed}/analyze/{self.section.name}", kind=self.kind, config=config,
                                  inputs=tuple(models.values()), seed=seed))
        return nodes
