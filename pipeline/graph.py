"""Spec -> DAG of stage nodes, with content-addressed cache keys.

The stage kinds plan the nodes (`Stage.plan`, in `plan_order`: the phases of every regime and
seed, their evaluations, the analyses, then the report); this module only asks them, merges the
comparison axes' variants and keys the result (`pipeline/keys.py`). It names no kind.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from exitflow.pipeline.dag import Graph, Variant
from exitflow.pipeline.keys import with_keys
from exitflow.pipeline.spec import StudySpec, axis_label, variants
from exitflow.pipeline.stage import STUDY, VARIANT, Stage, planners


def build_graph(spec: StudySpec) -> Graph:
    """The whole study as a DAG; validated (acyclic, inputs present) before anything runs.

    With comparison axes (`compare:`), each combination of their values is a study of its own
    (`spec.variants`); their nodes are merged by key, so a node that no axis changes (a P1 that a
    P2-only axis leaves alone, its analyses) is one node serving every variant. A merged node's id
    is prefixed with the axis values its variants share (`phases.P2.loss_weighting=kaya/seed0/joint/P2`;
    none when every value of the axes uses it). The kinds that plan across variants (the report, one
    for every variant) then plan on the merged graph, which lists its variants (`Graph.variants`).
    """
    merged = _merged_variants(spec)
    for stage in planners(STUDY):
        _add_planned(merged, stage, spec)
    return with_keys(merged)


def plan_variant(spec: StudySpec) -> Graph:
    """One variant's nodes: every kind that plans per variant, in its `plan_order`."""
    g = Graph()
    for stage in planners(VARIANT):
        _add_planned(g, stage, spec)
    return g


def _add_planned(g: Graph, stage: Stage, spec: StudySpec) -> None:
    allowed = (stage.kind, *stage.also_plans)
    for node in stage.plan(spec, g):
        if node.kind not in allowed:
            raise TypeError(f"stage {stage.kind!r} planned a {node.kind!r} node ({node.id}); it plans {list(allowed)}")
        g.add(node)


def _merged_variants(spec: StudySpec) -> Graph:
    """Every variant's nodes merged by key, with the variants it merged (each one's node ids)."""
    built = []
    for assignment, vspec in variants(spec):
        built.append((assignment, vspec, with_keys(plan_variant(vspec))))
    users: dict[str, list[tuple[tuple[str, Any], ...]]] = {}  # key -> the variants that use the node
    for assignment, _, g in built:
        for n in g.nodes.values():
            users.setdefault(n.key, []).append(assignment)
    axes = [axis for axis, values in spec.compare.items() if len(values) > 1]
    merged, ids, merged_variants = Graph(), {}, []  # ids: key -> merged id
    for assignment, vspec, g in built:
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
        merged_variants.append(Variant(assignment, vspec, {nid: local[nid] for nid in g.nodes}))
    merged.variants = tuple(merged_variants)
    return merged

