"""Loss landscapes around a trained model (the paper's appendix A, Fig. 17, D.7).

Two random directions in weight space, filter-normalised as Li et al. (2018, "Visualizing the Loss
Landscape of Neural Nets") do: for every weight tensor of dimension >= 2, each filter (slice along
dim 0) of the direction is rescaled to the norm of the same filter of the model; biases and
normalisation parameters (dimension <= 1) get no component, so the plot shows the weights' own
geometry. The loss of every exit, and their sum (the joint objective with uniform weights), is
evaluated at theta + a * d1 + b * d2 on a square grid of `steps` x `steps` points with a, b in
[-span, span]; the grid's centre is the model itself (a = b = 0 exactly). The net runs in eval mode:
BatchNorm uses its running statistics.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def filter_normalized_direction(net: nn.Module, generator: torch.Generator) -> dict[str, Tensor]:
    """A random direction with each filter scaled to the model's filter norm; zero on biases and norms."""
    out = {}
    for name, p in net.named_parameters():
        if p.ndim <= 1:
            out[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        dims = tuple(range(1, p.ndim))
        norm = torch.linalg.vector_norm
        scale = norm(p.detach(), dim=dims, keepdim=True) / norm(d, dim=dims, keepdim=True).clamp_min(1e-12)
        out[name] = d * scale
    return out


def grid_coordinates(steps: int, span: float) -> Tensor:
    """`steps` points in [-span, span] as integer multiples of the step, so the middle one is exactly 0."""
    if steps < 3 or steps % 2 == 0:
        raise ValueError(f"a landscape grid needs an odd number of steps >= 3, got {steps}")
    half = steps // 2
    return torch.arange(-half, half + 1, dtype=torch.float64) * (span / half)


@torch.no_grad()
def exit_losses(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> list[float]:
    """Mean cross-entropy of every exit on (x, y), the final one last."""
    sums: Tensor | None = None
    for i in range(0, x.shape[0], batch_size):
        logits = net(x[i : i + batch_size])
        part = torch.stack([F.cross_entropy(z.float(), y[i : i + batch_size], reduction="sum") for z in logits])
        sums = part if sums is None else sums + part
    assert sums is not None
    return (sums / x.shape[0]).tolist()


@torch.no_grad()
def loss_landscape(net: nn.Module, x: Tensor, y: Tensor, steps: int = 21, span: float = 1.0, seed: int = 0) -> list[dict[str, float]]:
    """Rows (a, b, exit, loss) over the grid; `exit` is the exit's index, or -1 for the sum over exits."""
    was_training = net.training
    net.eval()
    g = torch.Generator().manual_seed(seed)
    d1, d2 = filter_normalized_direction(net, g), filter_normalized_direction(net, g)
    params = dict(net.named_parameters())
    theta = {n: p.detach().clone() for n, p in params.items()}
    coords = grid_coordinates(steps, span)
    rows: list[dict[str, float]] = []
    try:
        for a in coords.tolist():
            for b in coords.tolist():
                for n, p in params.items():
                    p.copy_(theta[n] + a * d1[n] + b * d2[n])
                losses = exit_losses(net, x, y)
                rows += [{"a": a, "b": b, "exit": k, "loss": v} for k, v in enumerate(losses)]
                rows.append({"a": a, "b": b, "exit": -1, "loss": sum(losses)})
    finally:
        for n, p in params.items():
            p.copy_(theta[n])
        net.train(was_training)
    return rows


def plot_landscape(rows: list[dict[str, float]], path: Path, title: str) -> Path:
    """Contour plots: one per exit and one of the sum, on the grid's (a, b) plane."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    exits = sorted({int(r["exit"]) for r in rows}, key=lambda k: (k < 0, k))
    coords = sorted({r["a"] for r in rows})
    index = {c: i for i, c in enumerate(coords)}
    fig = Figure(figsize=(3.2 * len(exits), 3.0))
    FigureCanvasAgg(fig)
    for i, k in enumerate(exits):
        z = np.full((len(coords), len(coords)), np.nan)
        for r in rows:
            if int(r["exit"]) == k:
                z[index[r["b"]], index[r["a"]]] = r["loss"]
        ax = fig.add_subplot(1, len(exits), i + 1)
        cs = ax.contour(coords, coords, np.log(np.maximum(z, 1e-12)), levels=15, cmap="viridis")
        ax.plot([0], [0], "r+")
        ax.set_title("sum of exits" if k < 0 else f"exit {k}", fontsize=9)
        ax.set_xlabel("a")
        if i == 0:
            ax.set_ylabel("b")
        fig.colorbar(cs, ax=ax, shrink=0.8, label="log loss" if i == len(exits) - 1 else None)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
