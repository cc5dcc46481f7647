"""Which phases a study trains, and what each phase node holds: the train and tune kinds' planning.

Per seed: one P1 node feeds both disjoint (P3) and mixed (P2), so the backbone is never trained
twice; joint is a P2 node from scratch. A phase whose learning rate is searched is a tune node,
any other a train node: both kinds' nodes are planned here, in one pass, so a study lists its
phases seed by seed whatever their kinds. Imports no Ray: `exitflow plan` plans without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pydantic import Field

from exitflow.pipeline import resolve
from exitflow.pipeline.dag import Graph, Node
from exitflow.pipeline.spec import StudySpec
from exitflow.pipeline.spec_types import AnalysisSection, Int
from exitflow.stages.core.allowed import MAX_SAMPLES
from exitflow.stages.core.data import DataSpec
from exitflow.stages.core.nets import NetChoice
from exitflow.stages.core.nets.start import StartWeights
from exitflow.stages.core.phase_config import PhaseConfig

TRAIN, TUNE = "train", "tune"  # the kinds of a phase node: a fixed learning rate, a searched one
# Which phase produces a regime's final model, and which phase it starts from.
FINAL_PHASE = {"joint": "P2", "disjoint": "P3", "mixed": "P2"}
STARTS_FROM_P1 = {"joint": False, "disjoint": True, "mixed": True}


class GradientDominanceAnalysis(AnalysisSection):
    """During P2 (joint, mixed): each exit's gradient on the backbone against the total (paper Fig. 4).
    Measured inside training: switching it on re-trains those P2 phases."""

    name = "gradient_dominance"
    every: Int = Field(10, ge=1, le=MAX_SAMPLES)  # measure every N training steps of an epoch (the epoch's mean is logged)


@dataclass(frozen=True)
class SearchPlan:
    """What to search: a tune node's `search`."""

    grid: tuple[float, ...] | None = None  # explicit learning rates (grid search) ...
    loguniform: tuple[float, float] | None = None  # ... or a log-uniform range
    num_samples: int = 1  # samples of the range (grid: 1)
    scheduler: str = "none"  # none | asha
    grace_period: int = 2  # ASHA only (without it, the defaults: they change nothing)
    reduction_factor: float = 2.0

    @property
    def trials(self) -> int:
        """How many trials the search runs."""
        return len(self.grid) if self.grid is not None else self.num_samples


@dataclass(frozen=True)
class PhaseNodeConfig:
    """A train or tune node's config: everything that changes the phase's result, as the core's own
    types. Its key hashes exactly this; the Ray task gets it in the node, the Train worker in its job
    (`stages.phase_kind.PhaseJob`: this object itself)."""

    phase: str  # P1 | P2 | P3
    seed: int
    data: DataSpec
    net: NetChoice  # sized for the dataset on the worker, where the data is
    # train.lr is None when `search` is set: each trial trains with its own; train.selection: the score
    # that picks the kept epoch (P1: final)
    train: PhaseConfig
    search: SearchPlan | None = None  # a tune node's learning rates and scheduler
    start: StartWeights | None = None  # the backbone a from-scratch phase (P1, joint P2) starts from


def plan_phases(spec: StudySpec) -> list[Node]:
    """Per seed a P1 for the regimes that start from it, then each regime's final phase."""
    regimes = list(spec.regimes)
    p1_users = [r for r in regimes if STARTS_FROM_P1[r]]
    nodes = []
    for seed in spec.seeds:
        s = f"seed{seed}"
        if p1_users:
            nodes.append(_phase_node(spec, f"{s}/P1", "P1", "shared" if len(p1_users) > 1 else p1_users[0], seed, ()))
        for regime in regimes:
            phase = FINAL_PHASE[regime]
            inputs = (f"{s}/P1",) if STARTS_FROM_P1[regime] else ()
            nodes.append(_phase_node(spec, f"{s}/{regime}/{phase}", phase, regime, seed, inputs))
    return nodes


def final_models(graph: Graph) -> list[Node]:
    """The phase node of each regime's final model (per seed and variant), in graph order."""
    return [n for n in graph.nodes.values()
            if n.kind in (TRAIN, TUNE) and n.regime in FINAL_PHASE and n.phase == FINAL_PHASE[n.regime]]


def _phase_node(spec: StudySpec, node_id: str, phase: str, regime: str, seed: int, inputs: tuple[str, ...]) -> Node:
    cfg = phase_config(spec, phase, seed)
    if not inputs:  # trains from scratch: net.init, when set, is where its backbone starts
        cfg = dataclasses.replace(cfg, start=resolve.start_weights(spec))
    kind = TUNE if cfg.search is not None else TRAIN
    return Node(id=node_id, kind=kind, config=cfg, inputs=inputs, phase=phase, regime=regime, seed=seed)


def phase_config(spec: StudySpec, phase: str, seed: int) -> PhaseNodeConfig:
    """A train or tune node's config; a tune node's `search` holds the learning rates to try."""
    dominance: GradientDominanceAnalysis = spec.analyses.gradient_dominance
    train = getattr(spec.phases, phase).phase_config(  # `phases.<phase>`, and what other sections set in it:
        selection="final" if phase == "P1" else spec.search.selection,  # P1 trains the final exit alone
        # measured while P2 trains: part of what the phase computes
        gradient_dominance_every=dominance.every if phase == "P2" and dominance.enabled else 0)
    return PhaseNodeConfig(phase=phase, seed=seed, data=resolve.data_spec(spec), net=resolve.net_choice(spec), train=train,
                           search=search_plan(spec, phase))


def search_plan(spec: StudySpec, phase: str) -> SearchPlan | None:
    """The learning rates a phase searches (None: one fixed lr, a train node)."""
    pc = getattr(spec.phases, phase)
    if not pc.is_search():
        return None
    values = pc.lr_values()  # a grid (a list or a preset), or None for a log-uniform range
    asha = spec.search.scheduler == "asha"  # ASHA's settings change nothing without ASHA: defaults then
    return SearchPlan(
        grid=tuple(values) if values is not None else None,
        loguniform=tuple(pc.lr.loguniform) if values is None else None,  # type: ignore[union-attr]
        num_samples=1 if values is not None else pc.lr.num_samples,  # type: ignore[union-attr]
        scheduler=spec.search.scheduler,
        **({"grace_period": spec.search.grace_period, "reduction_factor": spec.search.reduction_factor} if asha else {}),
    )
