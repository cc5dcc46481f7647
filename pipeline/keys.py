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
from exitflow.pipeline.user_code import backbone_code


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


def _user_code(config: Any) -> list[str]:
    """`module@digest` of the user's own code that builds each net the config holds (`net.backbone:
    module:builder` or an entry point): editing a builder re-trains what it builds."""
    from exitflow.stages.core.nets import NetChoice, list_nets

    nets = [getattr(config, f.name) for f in dataclasses.fields(config)]
    codes = [backbone_code(n.backbone) for n in nets if isinstance(n, NetChoice) and n.backbone not in list_nets()]
    return [c for c in codes if c is not None]


def _libraries(config: Any) -> dict[str, str]:
    """The version of each library whose model a net of the config is (timm's, for `timm:NAME`): exitflow's
    fingerprint covers its own code, not the library's, whose next version may build another net."""
    from exitflow.stages.core.nets import NetChoice
    from exitflow.stages.core.nets.timm_backbone import TIMM_PREFIX, timm_version

    nets = [getattr(config, f.name) for f in dataclasses.fields(config)]
    timm = any(isinstance(n, NetChoice) and n.backbone.startswith(TIMM_PREFIX) for n in nets)
    return {"timm": timm_version()} if timm else {}


def cache_key(kind: str, config: Any, input_keys: list[str]) -> str:
    """Content hash of a stage: kind, config (less its unkeyed fields), inputs' keys, the code that computes it
    (and the user's, for a net of the user's own: only then is it in the hash, so no other key changed)."""
    keyed = _keyed(kind, config)  # first: it refuses a config that is no frozen dataclass
    user = _user_code(config)
    used = _libraries(config)
    blob = json.dumps(
        {"kind": kind, "config": keyed, "inputs": input_keys, "version": __version__,
         "code": fingerprint(get_stage(kind).code), **({"user_code": user} if user else {}),
         **({"libraries": used} if used else {})},
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
