"""Gradient dominance (paper Fig. 4): which exits steer the backbone while all of them train (P2).

At sampled training steps, each exit's weighted loss is differentiated on the backbone's trainable
parameters alone (`torch.autograd.grad`, which leaves `.grad` and the optimizer untouched); the
total gradient is their sum, and each exit's dominance is the cosine similarity between its
gradient and the total. An exit whose cosine is near 1 sets the backbone's direction; near 0, it
is drowned out. The per-epoch mean over the sampled steps joins the phase's metrics
(`grad_cos_<k>`). Under DDP each rank measures its own batch (the measurement is not all-reduced).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn


def exit_gradients(losses: Sequence[Tensor], weights: Tensor, params: Sequence[nn.Parameter]) -> list[Tensor]:
    """Each exit's weighted loss's gradient on `params`, flattened (zero where the exit does not reach)."""
    grads = []
    for w, loss in zip(weights, losses):
        parts = torch.autograd.grad(w * loss, list(params), retain_graph=True, allow_unused=True)
        grads.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(parts, params)]))
    return grads


def dominance(grads: Sequence[Tensor]) -> list[float]:
    """Cosine similarity of each exit's gradient with their sum (0 for a zero gradient)."""
    total = torch.stack(list(grads)).sum(0)
    out = []
    for g in grads:
        denom = g.norm() * total.norm()
        out.append(float(g @ total / denom) if denom > 0 else 0.0)
    return out


class GradientDominance:
    """Measures dominance every `every` steps of an epoch; `means()` gives the epoch's mean per exit."""

    def __init__(self, backbone: nn.Module, weights: Tensor, exit_losses: Callable[..., list[Tensor]],
                 loss_fn: Callable[[Tensor, Tensor], Tensor], every: int) -> None:
        self.params = [p for p in backbone.parameters() if p.requires_grad]
        self.weights, self.exit_losses, self.loss_fn, self.every = weights, exit_losses, loss_fn, every
        self.samples: list[list[float]] = []

    def maybe_measure(self, step: int, logits: Sequence[Tensor], target: Tensor) -> None:
        if step % self.every == 0 and self.params:
            losses = self.exit_losses(logits, target, self.loss_fn)
            self.samples.append(dominance(exit_gradients(losses, self.weights, self.params)))

    def means(self) -> list[float]:
        if not self.samples:
            return []
        return [sum(s[k] for s in self.samples) / len(self.samples) for k in range(len(self.samples[0]))]


def plot_dominance(rows: list[dict[str, float]], path: Path, title: str) -> Path:
    """Cosine with the total gradient per epoch, one line per exit."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k in sorted({int(r["exit"]) for r in rows}):
        pts = sorted((r["epoch"], r["cosine"]) for r in rows if int(r["exit"]) == k)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=f"exit {k}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cos(exit gradient, total gradient)")
    ax.set_ylim(-1.05, 1.05)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
