"""Starting points: a phase that trains from scratch (P1, joint's P2) starts from given backbone weights.

The weights are a state dict: a whole exitflow net's (a checkpoint's `model.pt`, keys `backbone.*`,
`ics.*` and the method's own modules: `aggregator.*`, `ensemble.*`, `gates.*`) or its backbone's alone (the keys `net.backbone.state_dict()` has). Only the backbone
is taken: the ICs stay freshly initialised, as in the paper's pretrained-backbone runs (Fig. 11, 27).
Every backbone key must be present with its shape, except that the backbone's final classifier may
be left out as a whole (pretrained weights for other classes: `stages.core.nets.pretrained`), then
it starts fresh too; a key that is neither the backbone's nor an IC's is refused, so weights of
another architecture never half-load silently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from exitflow.stages.core.allowed import RUN_PREFIX, pretrained_source
from exitflow.stages.core.nets.pretrained import PretrainedStart
from exitflow.stages.core.tensor_file import load_tensors

BACKBONE = "backbone."
# A whole net's parts other than its backbone: the ICs and the method's own modules (GPF's aggregator,
# ZTW's ensemble, JEI-DNN's gates) start fresh with the phase's ICs
NOT_BACKBONE = ("ics.", "aggregator.", "ensemble.", "gates.")


@dataclass(frozen=True)
class StartWeights:
    """Where a phase's backbone starts: `identity` names the weights' content (a file's sha256, or
    an MLflow run id, whose artifacts never change), `source` where to read them (a file path or
    `runs:/RUN_ID`). The cache key holds the identity alone: a moved file is the same start."""

    identity: str
    source: str


def backbone_weights(net: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state`'s backbone entries under the net's own names (`backbone.*`), checked against `net`;
    a ValueError naming the first missing, unknown or mis-shaped key."""
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError("expected a state dict (parameter names -> tensors)")
    own = net.state_dict()
    mine = {k: v for k, v in own.items() if k.startswith(BACKBONE)}
    prefixed = any(k.startswith(BACKBONE) for k in state)
    weights: dict[str, Tensor] = {}
    for key, value in state.items():
        if prefixed and key.startswith(NOT_BACKBONE):
            continue  # a whole net's ICs (and method modules): the phase's own start fresh
        name = key if prefixed else BACKBONE + key
        if name not in mine:
            raise ValueError(f"key {key!r} is not in this net's backbone ({len(state)} keys given, {len(mine)} expected)")
        if tuple(value.shape) != tuple(mine[name].shape):
            raise ValueError(f"key {key!r} has shape {tuple(value.shape)}, this net's {tuple(mine[name].shape)}")
        weights[name] = value
    missing = [k for k in mine if k not in weights]
    classifier = f"{BACKBONE}{net.backbone.classifier}."
    if missing and {k for k in mine if k.startswith(classifier)} == set(missing):
        missing = []  # the classifier left out as a whole: it starts fresh
    if missing:
        raise ValueError(f"{len(missing)} backbone key(s) missing, e.g. {missing[0].removeprefix(BACKBONE)!r}")
    return weights


def load_start(net: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Load `state`'s backbone into `net` (see `backbone_weights`); returns what the net now holds
    under those names, to hash as the phase's proven start."""
    weights = backbone_weights(net, state)
    with torch.no_grad():
        net.load_state_dict(weights, strict=False)
    now = net.state_dict()
    return {k: now[k] for k in weights}


def read_state_file(path: str) -> dict[str, Tensor]:
    """A state dict saved with `torch.save` (tensors and plain values only: nothing in it can run code);
    UnreadableTensors when the file is not one."""
    state = load_tensors(path)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # a training checkpoint that wraps its weights
    if not isinstance(state, Mapping):
        raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    return dict(state)


@dataclass(frozen=True)
class StateFile:
    """Reads a state-dict file when called (on the Train worker, where the file must be visible)."""

    path: str

    def __call__(self) -> dict[str, Tensor]:
        return read_state_file(self.path)


def start_reader(source: str, run_reader: Callable[[str], Callable[[], dict[str, Tensor]]],
                 onto_timm: bool = False) -> Callable[[], dict[str, Tensor]]:
    """What reads a starting point's state dict when called: `runs:/RUN_ID` through `run_reader`
    (given the run id; the tracking store is the caller's), LIBRARY:NAME from that library's local
    cache (`onto_timm`: for a `timm:NAME` backbone, in the library's own layout), anything else as a
    state-dict file."""
    if source.startswith(RUN_PREFIX):
        return run_reader(source.removeprefix(RUN_PREFIX))
    if pretrained_source(source) is not None:
        return PretrainedStart(source, onto_timm)
    return StateFile(source)
