"""Numerical rank of a backbone's layer outputs (the paper's Fig. 3 and appendix D.5).

For each backbone layer (every Conv2d and Linear inside `net.backbone`, in execution order) we
take the tensor right after the layer's operation, before any normalisation or activation: a
forward hook on the layer itself sees exactly that. Rows are the samples of a batch, columns the
rest of the tensor flattened; the same random subset of columns (seeded by the layer's width, so
every model of the same architecture gets the same subset) is kept when a layer has more columns
than `features`. The rank is the number of singular values above

    tol = s_max * max(rows, columns) * eps,   eps = float32 machine epsilon (unless `rtol` is given:
                                               tol = s_max * rtol)

the rule of `numpy.linalg.matrix_rank`, with the epsilon of the precision the activations were
computed in (float32), not of the float64 the SVD runs in. Where that tolerance lies far above
float64's rounding (activation matrices), the singular values come from the eigenvalues of the
smaller Gram matrix, at a fraction of the SVD's cost; small matrices and tight `rtol` take the SVD.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager

import torch
from torch import Tensor, nn

from exitflow.stages.core.analysis.capture import capture_outputs

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
FLOAT64_EPS = float(torch.finfo(torch.float64).eps)
LAYER_TYPES = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LayerRank:
    index: int  # execution order among the captured layers
    layer: str  # module name inside the backbone
    rank: int
    rows: int
    columns: int  # columns the SVD saw (after the feature subset)
    full_columns: int  # the layer output's flattened width


def numerical_rank(matrix: Tensor, rtol: float | None = None) -> int:
    """Singular values above `s_max * max(m, n) * eps(float32)` (or `s_max * rtol`)."""
    if matrix.ndim != 2:
        raise ValueError(f"numerical_rank needs a matrix, got shape {tuple(matrix.shape)}")
    if matrix.numel() == 0:
        return 0
    m = matrix.detach().to(torch.float64)
    relative = rtol if rtol is not None else max(m.shape) * FLOAT32_EPS
    s = gram_singular_values(m) if gram_resolves(m.shape, relative) else torch.linalg.svdvals(m)
    if s[0] == 0:
        return 0
    return int((s > s[0] * relative).sum())


def gram_resolves(shape: tuple[int, ...] | torch.Size, relative: float) -> bool:
    """Whether the Gram matrix's eigenvalues place every singular value correctly against the
    tolerance `s_max * relative`. Forming G = M M^T in float64 errs by ~ n * eps64 * s_max^2 per
    entry, so a singular value s is known to ~ n * eps64 * s_max^2 / (2 s): at s near the
    tolerance that is a relative error of n * eps64 / (2 relative^2). A margin of 1e4 keeps it
    below 1e-4. The default tolerance passes from max(m, n) >= 156 on: activation matrices."""
    return relative * relative >= 1e4 * max(shape) * FLOAT64_EPS


def gram_singular_values(m: Tensor) -> Tensor:
    """Singular values of `m`, largest first, from the eigenvalues of its smaller Gram matrix:
    an (r x r) eigenproblem for r = min(rows, columns), 6-14x faster than the SVD of a 1000 x 6000
    activation matrix on CPU."""
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)


def capture_layer_outputs(module: nn.Module, types: tuple[type[nn.Module], ...] = LAYER_TYPES) -> ContextManager[dict[str, Tensor]]:
    """While inside, every `types` layer of `module` records its output (flattened per sample), by name, in call order."""
    return capture_outputs((name, layer) for name, layer in module.named_modules() if isinstance(layer, types))


def feature_subset(columns: int, features: int) -> Tensor | None:
    """The columns kept of a layer `columns` wide: all of them, or a fixed random `features`."""
    if columns <= features:
        return None
    g = torch.Generator().manual_seed(columns)  # the same subset for every model with this layer width
    return torch.randperm(columns, generator=g)[:features].sort().values


@torch.no_grad()
def layer_ranks(net: nn.Module, x: Tensor, features: int = 6000, rtol: float | None = None) -> list[LayerRank]:
    """The numerical rank of every backbone layer's output on the batch `x` (net in eval mode)."""
    backbone = getattr(net, "backbone", net)
    was_training = net.training
    net.eval()
    try:
        with capture_layer_outputs(backbone) as outputs:
            net(x)
    finally:
        net.train(was_training)
    ranks = []
    for i, (name, acts) in enumerate(outputs.items()):
        idx = feature_subset(acts.shape[1], features)
        m = acts if idx is None else acts[:, idx]
        ranks.append(LayerRank(i, name, numerical_rank(m, rtol), m.shape[0], m.shape[1], acts.shape[1]))
    return ranks


def plot_ranks(ranks: dict[str, list[LayerRank]], path: Path, title: str) -> Path:
    """Rank (as a share of its maximum, min(rows, columns)) per layer, one line per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for model, rows in ranks.items():
        ax.plot([r.index for r in rows], [r.rank / min(r.rows, r.columns) for r in rows], marker="o", ms=3, label=model)
    ax.set_xlabel("backbone layer (execution order)")
    ax.set_ylabel("numerical rank / max rank")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
