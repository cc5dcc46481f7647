"""The mode-connectivity analysis stage: the loss between the regimes' final models (paper Fig. 2, D.8).

Joined to a study by `analyses.connectivity.enabled`: one node per seed, reading the final model of
every regime the study trains (the models its evaluate nodes read), or, with `analyses.connectivity.seeds`,
one node reading each regime's model from the seed named for it (the paper's D.8 takes disjoint's and
mixed's backbones from different seeds). Every pair of regimes gets the linear path after weight
matching; three regimes also get the plane through the three models. The maths is
`stages.core.analysis.connectivity` and `stages.core.analysis.permutation`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
from pydantic import Field, field_validator

from exitflow.pipeline.dag import Graph, Node
from exitflow.pipeline.resolve import data_spec
from exitflow.pipeline.spec import StudySpec
from exitflow.pipeline.spec_types import AnalysisSection, Int, Regime, Seed, with_settings
from exitflow.pipeline.stage import FILES, File, StageContext, StageInput, StageResult, Table, TableKind, register_stage
from exitflow.stages.analysis_inputs import ModelAnalysis, Split, load_model
from exitflow.stages.core.allowed import MAX_GRID, MAX_SAMPLES
from exitflow.stages.core.data import DataSpec

# The reference order: pairs are (earlier, later) and the later model is aligned to the earlier one;
# the plane is anchored at disjoint's model (the paper's Fig. 2 compares disjoint with mixed and joint).
ORDER = ("disjoint", "mixed", "joint")


class ConnectivityAnalysis(AnalysisSection):
    """`analyses.connectivity`: mode connectivity between the regimes' final models after weight matching
    (paper Fig. 2, D.8): the loss along the line between every pair, and over the plane through three."""

    name = "connectivity"
    split: Split = "test"  # the images every point is evaluated on
    samples: Int = Field(500, ge=1, le=MAX_SAMPLES)
    train_samples: Int = Field(500, ge=2, le=MAX_SAMPLES)  # training images each point's BatchNorm statistics are recomputed on
    bn_repair: bool = True  # recompute BatchNorm statistics at every point (false: interpolate them as weights)
    points: Int = Field(11, ge=2, le=MAX_GRID)  # points along each line, both models included
    plane_steps: Int = Field(11, ge=2, le=MAX_GRID)  # points per axis of the plane's grid; the paper: 150 x 150
    iterations: Int = Field(100, ge=1, le=MAX_SAMPLES)  # weight matching: most passes over the permutation groups
    # Regime -> the seed whose model it contributes, e.g. {disjoint: 0, mixed: 1, joint: 2}: one node
    # across seeds (the paper's D.8 takes disjoint's and mixed's backbones from different seeds, so
    # matching has real permutations to find). None: one node per seed, its regimes' models.
    seeds: dict[Regime, Seed] | None = None

    @field_validator("seeds")
    @classmethod
    def _two_models(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is not None and len(v) < 2:
            raise ValueError(f"name at least two regimes, each with the seed of its model; got {v}")
        return v

    def check_study(self, regimes: Sequence[str], seeds: Sequence[int]) -> None:
        """Each regime named in `seeds` is one the study trains, with a seed it trains."""
        for regime, seed in (self.seeds or {}).items():
            if regime not in regimes:
                raise ValueError(f"analyses.connectivity.seeds: {regime!r} is not among the study's regimes {list(regimes)}")
            if seed not in seeds:
                raise ValueError(f"analyses.connectivity.seeds: {regime}'s seed {seed} is not among the study's seeds {list(seeds)}")


@with_settings(ConnectivityAnalysis, exclude=("seeds",))  # `seeds` is planned into regimes and model_seeds
class ConnectivityConfig:
    """A connectivity node's config: the regimes compared (in input order) and the seed of each one's
    model, and the section's settings: the batches, BatchNorm repair, the grids, weight matching's cap."""

    seed: int  # the batches' and matching's seed (the first model's seed)
    data: DataSpec
    regimes: tuple[str, ...]
    model_seeds: tuple[int, ...]  # per regime: the seed its model was trained with


CONNECTIVITY = TableKind("connectivity", "connectivity.parquet",
                         ("kind", "models", "a", "b", "x", "y", "exit", "loss", "accuracy"))


def final_models(graph: Graph, seed: int) -> dict[str, str]:
    """Regime -> the node of its final model for `seed`, in ORDER: what its evaluate node reads."""
    found = {n.regime: n.inputs[0] for n in graph.nodes.values() if n.kind == "evaluate" and n.seed == seed}
    return {r: found[r] for r in ORDER if r in found}


def which_models(cfg: ConnectivityConfig) -> str:
    """The plots' note of the models' seeds: "seed 0", or each regime's where they differ."""
    if len(set(cfg.model_seeds)) == 1:
        return f"seed {cfg.model_seeds[0]}"
    return ", ".join(f"{r} seed {s}" for r, s in zip(cfg.regimes, cfg.model_seeds, strict=True))


@register_stage
class Connectivity(ModelAnalysis):
    kind = "analyze.connectivity"
    section = ConnectivityAnalysis
    plan_order = 33
    writes = (CONNECTIVITY, FILES)
    code = ("exitflow.stages.analyze_connectivity", "exitflow.stages.analysis_inputs", "exitflow.stages.core.analysis.connectivity",
            "exitflow.stages.core.analysis.permutation", "exitflow.stages.core.analysis.batch")

    def plan(self, spec: StudySpec, graph: Graph) -> list[Node]:
        cfg = self.spec_section(spec)
        if cfg is None or not cfg.enabled:
            return []
        settings = {k: v for k, v in cfg.settings().items() if k != "seeds"}

        def node(node_id: str, models: dict[str, tuple[int, str]], seed: int | None) -> Node:
            seeds = tuple(s for s, _ in models.values())
            config = ConnectivityConfig(seed=seeds[0], data=data_spec(spec), regimes=tuple(models),
                                        model_seeds=seeds, **settings)
            return Node(id=node_id, kind=self.kind, config=config, inputs=tuple(m for _, m in models.values()),
                        seed=seed)

        if cfg.seeds:  # one node across seeds (the spec checked every regime and seed is in the study)
            chosen = {r: (cfg.seeds[r], final_models(graph, cfg.seeds[r])[r]) for r in ORDER if r in cfg.seeds}
            return [node("analyze/connectivity", chosen, None)]
        nodes = []
        for seed in spec.seeds:
            models = final_models(graph, seed)
            if len(models) >= 2:  # a path needs two models
                nodes.append(node(f"seed{seed}/analyze/connectivity", {r: (seed, m) for r, m in models.items()}, seed))
        return nodes

    def describe(self, summary: dict[str, Any]) -> str:
        return " " + " ".join(f"{k}={v:.3f}" for k, v in summary.items() if k.startswith("barrier_"))

    def run(self, node: Node, inputs: list[StageInput], ctx: StageContext) -> StageResult:
        import torch

        from exitflow.stages.core.analysis import connectivity as mc
        from exitflow.stages.core.analysis.batch import analysis_batch
        from exitflow.stages.core.analysis.permutation import permutation_spec, permute_state, weight_matching
        from exitflow.stages.core.data import load_splits

        cfg: ConnectivityConfig = node.config
        device = ctx.settings.device()
        splits = load_splits(cfg.data, cfg.seed)
        x, y = analysis_batch(splits, cfg.split, cfg.samples, cfg.seed)
        x, y = x.to(device), y.to(device)
        repair = mc.repair_batch(splits.train, cfg.train_samples, cfg.seed).to(device) if cfg.bn_repair else None
        nets = [load_model(m, device) for m in inputs]
        states = {r: {k: v.detach().clone() for k, v in n.state_dict().items()} for r, n in zip(cfg.regimes, nets, strict=True)}
        net = nets[0]  # every point is loaded into this one net
        perm_spec = permutation_spec(net)

        done: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        metrics: dict[str, float] = {}

        def aligned(ref: str, other: str) -> dict[str, torch.Tensor]:
            """`other`'s state with its units matched to `ref`'s (computed once per pair)."""
            if (ref, other) not in done:
                perms, passes = weight_matching(perm_spec, states[ref], states[other], cfg.seed, cfg.iterations)
                done[ref, other] = permute_state(perm_spec, states[other], perms)
                metrics[f"matching_passes_{ref}_{other}"] = passes  # == iterations: matching was cut short
            return done[ref, other]

        rows: list[dict[str, Any]] = []
        lines = {}
        for ref, other in itertools.combinations(cfg.regimes, 2):
            pair = f"{ref}-{other}"
            path = mc.line(net, states[ref], aligned(ref, other), x, y, cfg.points, repair)
            lines[pair] = path
            rows += [{"kind": "line", "models": pair, **r} for r in path]
            metrics[f"barrier_{ref}_{other}"] = mc.barrier(path)
            metrics[f"accuracy_dip_{ref}_{other}"] = mc.barrier(path, key="accuracy", sign=-1.0)
        files = [File(mc.plot_lines(lines, ctx.workdir / "connectivity_line.png",
                                    f"linear paths after weight matching\n{which_models(cfg)}"))]
        if len(cfg.regimes) >= 3:
            a, b, c = cfg.regimes[:3]
            grid = mc.plane(net, states[a], aligned(a, b), aligned(a, c), x, y, cfg.plane_steps, repair)
            rows += [{"kind": "plane", "models": f"{a}-{b}-{c}", **r} for r in grid]
            files.append(File(mc.plot_plane(grid, (a, b, c), ctx.workdir / "connectivity_plane.png",
                                            f"total loss over the plane {a}, {b}, {c}\n{which_models(cfg)}")))
        return StageResult(artifacts=[Table(CONNECTIVITY.name, pa.Table.from_pylist(rows)), *files],
                           metrics=metrics, summary={k: v for k, v in metrics.items() if k.startswith("barrier_")})
