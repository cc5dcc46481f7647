"""Mutual information I(X; Z) between the input and each block's representation (paper Fig. 5, D.6).

A deterministic net has no finite I(X; h(X)) for continuous X, so, as the information-plane
literature does (Saxe et al. 2018; Kolchinsky, Tracey & Wolpert 2019), we measure it on a noisy
representation Z = h(X) + N(0, s^2 I) with X uniform over a fixed batch of N samples. Then Z is an
equal-weight mixture of N Gaussians and I(X; Z) = H(Z) - H(Z | X), H(Z | X) = d/2 log(2 pi e s^2).

- `mi_monte_carlo` (the reported estimate): H(Z) by Monte Carlo, drawing z_i = h_i + noise and
  averaging -log p(z_i) under the mixture; I = mean_i [log N(z_i; h_i, s^2) - log p(z_i)].
- `mi_pairwise_bounds` (a bracket): Kolchinsky & Tracey (2017)'s pairwise-distance bounds on the
  mixture entropy, with the Bhattacharyya (lower) and KL (upper) distances:
  I <= -1/N sum_i log 1/N sum_j exp(-|h_i - h_j|^2 / (2 s^2)), the lower bound with 8 s^2.

Both in nats; neither exceeds log N. The noise scale s is `noise` times the median distance
between two samples' representations, so layers of different scale and width are compared at the
same relative noise. (Scaling by the activations' per-dimension RMS instead leaves the N mixture
components about sqrt(d) noise stds apart in d dimensions: every real layer then gives log N.)
Validated against the closed form for correlated Gaussians (`tests/test_analysis_mi.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from stages.core.analysis.capture import capture_outputs


def mi_pairwise_bounds(h: Tensor, s: float) -> tuple[float, float]:
    """(lower, upper) bounds on I(X; h + N(0, s^2 I)) with X uniform over the rows of `h`."""
    h = h.flatten(1).double()
    d2 = torch.cdist(h, h).pow(2)
    log_n = math.log(h.shape[0])
    upper = -(torch.logsumexp(-d2 / (2 * s * s), dim=1) - log_n).mean()
    lower = -(torch.logsumexp(-d2 / (8 * s * s), dim=1) - log_n).mean()
    return float(lower), float(upper)


def mi_monte_carlo(h: Tensor, s: float, draws: int = 4, seed: int = 0) -> float:
    """Monte Carlo estimate of I(X; h + N(0, s^2 I)) with X uniform over the rows of `h`."""
    h = h.flatten(1).double()
    g = torch.Generator().manual_seed(seed)
    log_n = math.log(h.shape[0])
    total = 0.0
    for _ in range(draws):
        z = h + s * torch.randn(h.shape, generator=g, dtype=h.dtype)
        log_k = -torch.cdist(z, h).pow(2) / (2 * s * s)  # log N(z_i; h_j, s^2 I), less a shared constant
        total += float((log_k.diagonal() - (torch.logsumexp(log_k, dim=1) - log_n)).mean())
    return total / draws


def noise_scale(h: Tensor, noise: float) -> float:
    """`noise` times the median distance between two samples' representations (all equal: `noise` itself)."""
    h = h.flatten(1).double()
    median = float(torch.pdist(h).median()) if len(h) > 1 else 0.0
    return noise * (median if median > 0 else 1.0)


@dataclass(frozen=True)
class LayerMI:
    index: int  # block number (1-based), as exits are numbered
    mi: float  # Monte Carlo estimate, nats
    lower: float
    upper: float
    noise_std: float
    dims: int


@torch.no_grad()
def block_mutual_information(net: nn.Module, x: Tensor, noise: float = 0.25, draws: int = 4, seed: int = 0) -> list[LayerMI]:
    """I(X; Z_b) for every backbone block b on the batch `x` (net in eval mode)."""
    was_training = net.training
    net.eval()
    try:
        with capture_outputs(enumerate(net.backbone.blocks, start=1), net.backbone.ic_input) as outputs:  # by block number
            net(x)
    finally:
        net.train(was_training)
    rows = []
    for number, h in sorted(outputs.items()):
        s = noise_scale(h, noise)
        lower, upper = mi_pairwise_bounds(h, s)
        rows.append(LayerMI(number, mi_monte_carlo(h, s, draws, seed), lower, upper, s, h.shape[1]))
    return rows


def plot_mutual_information(mi: dict[str, list[LayerMI]], path: Path, title: str, samples: int) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for model, rows in mi.items():
        xs = [r.index for r in rows]
        line, = ax.plot(xs, [r.mi for r in rows], marker="o", ms=3, label=model)
        ax.fill_between(xs, [r.lower for r in rows], [r.upper for r in rows], color=line.get_color(), alpha=0.15)
    ax.axhline(math.log(samples), color="grey", ls=":", lw=1, label="log N (the maximum)")
    ax.set_xlabel("backbone block")
    ax.set_ylabel("I(X; Z) (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
