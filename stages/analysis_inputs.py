"""What the analysis stages share: which models a study compares, and loading one from its input."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.graph import Graph
    from pipeline.stage import StageInput

# The models a per-seed analysis compares, by the node that trains each (P1's backbone is disjoint's
# as well: P3 freezes it).
MODELS = {"P1 (= disjoint backbone)": "P1", "mixed": "mixed/P2", "joint": "joint/P2"}


def compared_models(graph: Graph, seed: int) -> dict[str, str]:
    """Label -> node id of the models the study trains for `seed`, among MODELS."""
    return {label: f"seed{seed}/{suffix}" for label, suffix in MODELS.items() if f"seed{seed}/{suffix}" in graph.nodes}


def load_model(model: StageInput, device: str) -> Any:
    """The input's trained net, on `device`, in eval mode."""
    from stages.core.nets import NetSpec, create_net

    state, spec = model.checkpoint()
    net = create_net(NetSpec.from_dict(spec["net"]))
    net.load_state_dict(state)
    return net.to(device).eval()

