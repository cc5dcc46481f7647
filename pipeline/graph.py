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
from pipeline.spec import StudySpec, axis_label, variants
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
    variant: str = ""  # the comparison axes' values this node belongs to ("" = all of them): see build_graph

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
        if self.variant:
            tags["exitflow.variant"] = self.variant
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
    data = out.get("data")
    if isinstance(data, dict) and data.get("identity") == "":  # its root is unkeyed: the content must be keyed
        raise ValueError(f"a {kind} node's data has no identity: build its DataSpec with pipeline.resolve.data_spec")
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
    """The whole study as a DAG; validated (acyclic, inputs present) before anything runs.

    With comparison axes (`compare:`), each combination of their values is a study of its own
    (`spec.variants`); their nodes are merged by key, so a node that no axis changes (a P1 that a
    P2-only axis leaves alone, its analyses) is one node serving every variant. A merged node's id
    is prefixed with the axis values its variants share (`phases.P2.loss_weighting=kaya/seed0/joint/P2`;
    none when every value of the axes uses it). One report joins every variant.
    """
    from stages.core.nets.methods import method_curves
    from stages.report import ReportConfig

    ev = spec.evaluation
    merged, rows = _merged_variants(spec)
    # the criteria's curves, then the methods' own (JEI-DNN's gates), which every evaluate node of that method writes
    criteria = tuple(ev.criteria) + method_curves(v.net.method for _, v in variants(spec))
    merged.add(
        Node(
            id="report",
            kind="report",
            config=ReportConfig(budgets=tuple(ev.budgets), budget_rule=ev.budget_rule, seed_averaging=ev.seed_averaging,
                                thresholds=ev.thresholds, threshold_spacing=ev.threshold_spacing, criteria=criteria,
                                regimes=tuple(spec.regimes), seeds=tuple(spec.seeds), rows=rows,
                                axes=tuple((axis, tuple(axis_label(((axis, v),)) for v in values)) for axis, values in spec.compare.items())),
            inputs=tuple(dict.fromkeys(row[0] for row in rows)),
        )
    )
    return _with_keys(merged)


def _merged_variants(spec: StudySpec) -> tuple[Graph, tuple[tuple[str, str, int, tuple[str, ...]], ...]]:
    """Every variant's nodes merged by key, and the report's rows: (evaluate node, regime, seed, the
    variant's value of each axis as `axis=value`)."""
    built = []
    for assignment, vspec in variants(spec):
        g = _with_keys(_study_nodes(vspec))
        built.append((assignment, g))
    users: dict[str, list[tuple[tuple[str, Any], ...]]] = {}  # key -> the variants that use the node
    for assignment, g in built:
        for n in g.nodes.values():
            users.setdefault(n.key, []).append(assignment)
    axes = [axis for axis, values in spec.compare.items() if len(values) > 1]
    merged, ids, rows = Graph(), {}, []  # ids: key -> merged id
    for assignment, g in built:
        local: dict[str, str] = {}
        for nid in g.order():
            n = g.nodes[nid]
            if n.key not in ids:
                common = [(a, v) for a, v in assignment if a in axes and all(dict(u)[a] == v for u in users[n.key])]
                label = axis_label(tuple(common))
                new_id = f"{label}/{n.id}" if label else n.id
                if new_id in merged.nodes:  # two nodes that differ only upstream of every label: name them fully
                    label = axis_label(tuple((a, v) for a, v in assignment if a in axes))
                    new_id = f"{label}/{n.id}"
                ids[n.key] = new_id
                merged.add(dataclasses.replace(n, id=new_id, inputs=tuple(local[i] for i in n.inputs), variant=label, key=""))
            local[nid] = ids[n.key]
        parts = tuple(axis_label((pair,)) for pair in assignment)
        rows += [(local[n.id], n.regime, n.seed, parts) for n in g.nodes.values() if n.kind == "evaluate"]
    return merged, tuple(rows)


def _study_nodes(spec: StudySpec) -> Graph:
    """One study's nodes, less the report: per seed a P1 for the regimes that start from it, each
    regime's final phase and its evaluation, and the nodes registered stages plan (analyses)."""
    from pipeline.resolve import data_spec
    from stages.evaluate import EvaluateConfig

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
    for stage in stages():  # registered stages that join a study on their own (analyses, say)
        for node in stage.plan(spec, g):
            add(node)
    return g


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
