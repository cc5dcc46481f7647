"""A study as data: its nodes, their edges, the order they run in.

A leaf: it imports nothing of exitflow's, so the stage kinds that plan nodes and the pipeline that
keys and runs them share one `Node` without importing each other.
"""

from __future__ import annotations

import graphlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
    key: str = ""  # filled in by the graph builder once the inputs' keys are known (pipeline/keys.py)
    variant: str = ""  # the comparison axes' values this node belongs to ("" = all of them): see pipeline/graph.py

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


def kind_from_tags(tags: Mapping[str, str]) -> str:
    """The stage kind of a run, read back from the tags `Node.tags` gave it ("" for no node's run)."""
    family, name = tags.get("exitflow.stage", ""), tags.get("exitflow.analysis", "")
    return f"{family}.{name}" if family and name else family


@dataclass(frozen=True)
class Variant:
    """One combination of the comparison axes' values, as the graph that merges them keeps it."""

    assignment: tuple[tuple[str, Any], ...]  # (axis, value) per axis; () when the study compares nothing
    spec: Any  # the variant's own study (a pipeline.spec.StudySpec: typed loosely, this module imports none)
    nodes: Mapping[str, str]  # the variant's node ids -> their ids in the merged graph, in planning order


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    # The variants a study's graph merges (pipeline/graph.py): what a kind that plans across them
    # (the report) reads; () while one variant's nodes are planned.
    variants: tuple[Variant, ...] = ()

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
