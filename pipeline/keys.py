"""Content-addressed cache keys: a node's key hashes its kind, its config, its inputs' keys, the package
version and a fingerprint of the code that computes its kind (`pipeline/fingerprint.py`;
docs/cache-keys.md says what each node's config holds)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from exitflow.pipeline import __version__
from exitflow.pipeline.dag import Graph, Node
from exitflow.pipeline.fingerprint import fingerprint
from exitflow.pipeline.stage import get_stage


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


def with_keys(g: Graph) -> Graph:
    """The graph with every node keyed, inputs first; refused when a node's input is no node of it."""
    missing = [(n.id, i) for n in g.nodes.values() for i in n.inputs if i not in g.nodes]
    if missing:
        raise ValueError(f"graph: inputs not produced by any node: {missing}")
    keyed: dict[str, Node] = {}
    for nid in g.order():
        n = g.nodes[nid]
        keyed[nid] = dataclasses.replace(n, key=cache_key(n.kind, n.config, [keyed[i].key for i in n.inputs]))
    return Graph(nodes={nid: keyed[nid] for nid in g.nodes}, variants=g.variants)
