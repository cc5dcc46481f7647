"""A state_dict's content hash, in a module of its own: Train workers and Tune trials hash the weights
they start from without importing MLflow (the artifact store's `pipeline.artifacts` re-exports it)."""

from __future__ import annotations

import hashlib

import torch


def state_dict_hash(state: dict[str, torch.Tensor]) -> str:
    """Hash of a state_dict's names and exact tensor bytes (independent of file format)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
