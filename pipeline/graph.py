"""Spec -> DAG of stage nodes, with content-addressed cache keys.

Per seed: one P1 node feeds both disjoint (P3) and mixed (P2), so the backbone is never
trained twice; joint is a P2 node from scratch; every final model feeds an evaluate node;
one report node joins all regimes and seeds. Each node's config is one frozen dataclass of its
stage kind (made of the core's own configs: DataSpec, NetChoice, loop.PhaseConfig...), and its
key hashes exactly that config, its inputs' keys, the package version and a fingerprint of the
code that computes it (`pipeline/fingerprint.py`).
"""

from __future__ import annotations

import dataclasses
import graphlib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pipeline import __version__
from pipeline.fingerprint import fingerprint
from pipeline.spec import StudySpec
from pipeline.stage import get_stage, stages


# Which phase produces a regime's final model, and which phase it starts from.
FINAL_PHASE = {"joint": "P2", "disjoint": "P3", "mixed": "P2"}
STARTS_FROM_P1 = {"joint": False, "disjoint": True, "mixed": True}


@dataclass(frozen=True)
class Node:
    """One stage of the study. `config` is everything that changes its result: a frozen dataclass
    of its stage kind, handed as it is to the stage's Ray task."""

    id: str  # human-readable and unique, e.g. "seed0/P1", "seed0/mixed/P2", "report"
    kind: str  # a registered stage kind (pipeline/stage.py)
    config: Any
    inputs: tuple[str, ...] = ()
    phase: str | None = None  # P1 | P2 | P3
    regime: str | None = None  # joint | disjoint | mixed | shared
    seed: int | None = None
    key: str = ""  # filled in by build_graph once the inputs' keys are known

    def tags(self) -> dict[str, str]:
        """The MLflow tags on the stage's run (see the README's MLflow section). A kind `family.name`
        (`analyze.rank`) is tagged by family (`exitflow.stage=analyze`) and name (`exitflow.analysis=rank`)."""
        family, _, name = self.kind.partition(".")
        tags = {"exitflow.stage": family, "exitflow.key": self.key, "exitflow.node": self.id}
        if name:
            tags["exitflow.analysis"] = name
        if self.phase:
            tags["exitflow.phase"] = self.phase
        if self.regime:
            tags["exitflow.regime"] = self.regime
        if self.seed is not None:
            tags["exitflow.seed"] = str(self.seed)
        return tags


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)

    def order(self) -> list[str]:
        """Topological order (inputs first); raises graphlib.CycleError on a cycle."""
        ts = graphlib.TopologicalSorter({n.id: set(n.inputs) for n in self.nodes.values()})
        return list(ts.static_order())

    def edges(self) -> list[tuple[str, str]]:
        return [(src, n.id) for n in self.nodes.values() for src in n.inputs]

    def add(self, node: Node) -> None:
        if node.id in self.nodes:
            raise ValueError(f"graph: two nodes named {node.id!r}")
        self.nodes[node.id] = node

    def phase_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind in ("train", "tune")]


def _keyed(kind: str, config: Any) -> dict[str, Any]:
    """The config as plain values, less the fields its stage kind declares `unkeyed` (received, but
    never changing the result)."""
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type) and config.__dataclass_params__.frozen):  # type: ignore[attr-defined]
        raise TypeError(f"a {kind} node's config must be a frozen dataclass, got {type(config).__name__}")
    out = dataclasses.asdict(config)
    for section, name in get_stage(kind).unkeyed:
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != name}
    return out


def cache_key(kind: str, config: Any, input_keys: list[str]) -> str:
    """Content hash of a stage: kind, config (less its unkeyed fields), inputs' keys, the code that computes it."""
    blob = json.dumps(
        {"kind": kind, "config": _keyed(kind, config), "inputs": input_keys, "version": __version__,
         "code": fingerprint(get_stage(kind).code)},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _phase_config(spec: StudySpec, phase: str, seed: int) -> Any:
    """A train or tune node's config; a tune node's `search` holds the learning rates to try."""
    from pipeline import resolve
    from stages.phase import PhaseNodeConfig
    from stages.tune import SearchPlan

    pc = getattr(spec.phases, phase)
    search = None
    if pc.is_search():
        values = pc.lr_values()  # a grid (a list or a preset), or None for a log-uniform range
        asha = spec.search.scheduler == "asha"  # ASHA's settings change nothing without ASHA: defaults then
        search = SearchPlan(
            grid=tuple(values) if values is not None else None,
            loguniform=tuple(pc.lr.loguniform) if values is None else None,  # type: ignore[union-attr]
            num_samples=1 if values is not None else pc.lr.num_samples,  # type: ignore[union-attr]
            scheduler=spec.search.scheduler,
            **({"grace_period": spec.search.grace_period, "reduction_factor": spec.search.reduction_factor} if asha else {}),
        )
    return PhaseNodeConfig(phase=phase, seed=seed, data=resolve.data_spec(spec), net=resolve.net_choice(spec),
                           train=resolve.phase_config(spec, phase), selection=resolve.selection(spec, phase), search=search)


def build_graph(spec: StudySpec) -> Graph:
    """The whole study as a DAG; validated (acyclic, inputs present) before anything runs."""
    from pipeline.resolve import data_spec
    from stages.evaluate import EvaluateConfig
    from stages.report import ReportConfig

    g = Graph()
    regimes = list(spec.regimes)
    ev = spec.evaluation
    p1_users = [r for r in regimes if STARTS_FROM_P1[r]]

    add = g.add
    for seed in spec.seeds:
        s = f"seed{seed}"
        if p1_users:
            add(_phase_node(spec, f"{s}/P1", "P1", "shared" if len(p1_users) > 1 else p1_users[0], seed, ()))
        for regime in regimes:
            phase = FINAL_PHASE[regime]
            inputs = (f"{s}/P1",) if STARTS_FROM_P1[regime] else ()
            add(_phase_node(spec, f"{s}/{regime}/{phase}", phase, regime, seed, inputs))
            add(
                Node(
                    id=f"{s}/{regime}/evaluate",
                    kind="evaluate",
                    config=EvaluateConfig(seed=seed, data=data_spec(spec), criteria=tuple(ev.criteria),
                                          thresholds=ev.thresholds, threshold_spacing=ev.threshold_spacing,
                                          batch_size=ev.batch_size),
                    inputs=(f"{s}/{regime}/{phase}",),
                    phase=phase,
                    regime=regime,
                    seed=seed,
                )
            )
    add(
        Node(
            id="report",
            kind="report",
            config=ReportConfig(budgets=tuple(ev.budgets), criteria=tuple(ev.criteria), regimes=tuple(regimes),
                                seeds=tuple(spec.seeds)),
            inputs=tuple(f"seed{s}/{r}/evaluate" for s in spec.seeds for r in regimes),
        )
    )
    for stage in stages():  # registered stages that join a study on their own (analyses, say)
        for node in stage.plan(spec, g):
            add(node)
    return _with_keys(g)


def _phase_node(spec: StudySpec, node_id: str, phase: str, regime: str, seed: int, inputs: tuple[str, ...]) -> Node:
    from pipeline.resolve import start_weights

    cfg = _phase_config(spec, phase, seed)
    if not inputs:  # trains from scratch: net.init, when set, is where its backbone starts
        cfg = dataclasses.replace(cfg, start=start_weights(spec))
    kind = "tune" if cfg.search is not None else "train"
    return Node(id=node_id, kind=kind, config=cfg, inputs=inputs, phase=phase, regime=regime, seed=seed)


def _with_keys(g: Graph) -> Graph:
    missing = [(n.id, i) for n in g.nodes.values() for i in n.inputs if i not in g.nodes]
    if missing:
        raise ValueError(f"graph: inputs not produced by any node: {missing}")
    keyed: dict[str, Node] = {}
    for nid in g.order():
        n = g.nodes[nid]
        key = cache_key(n.kind, n.config, [keyed[i].key for i in n.inputs])
        keyed[nid] = Node(**{**n.__dict__, "key": key})
    return Graph(nodes={nid: keyed[nid] for nid in g.nodes})
