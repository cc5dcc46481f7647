"""Mutual information I(X; Z) between the input and each block's representation (paper Fig. 5, D.6).

A deterministic net has no finite I(X; h(X)) for continuous X, so we measure it on a noisy
representation Z = h(X) + N(0, s^2 I) with X uniform over a fixed batch of N samples. Then Z is an
equal-weight mixture of N Gaussians, p(z) = 1/N sum_j N(z; h_j, s^2 I), and
I(X; Z) = E[log p(z | x) - log p(z)]. Three estimators (`MIEstimator.kind`):

- `jensen` (the paper's, D.6) and `mc`: Kawaguchi, Deng, Ji & Huang (2023), "How does information
  bottleneck help deep learning?" (ICML), as their code (the `xu-ji/information-bottleneck`
  repository: `log_marg_prob(..., jensen)`, `compute_log_prior(..., mode)`) forms it: a fixed,
  absolute noise std s (`noise_std`), the marginal p(z) the mixture over the batch's own
  representations. `mc` takes log p(z) as it is (log-mean-exp over the components, `mi_monte_carlo`);
  `jensen` replaces it by the mean of the components' log densities, a lower bound on log p(z)
  (Jensen), so the Jensen value is never below the Monte Carlo one (`mi_jensen`, in closed form).
- `relative_noise` (exitflow's earlier estimator): `mi_monte_carlo` with s = `noise` times the median
  distance between two samples' representations, so layers of different scale and width meet the
  same relative noise (the Saxe et al. 2018 / Kolchinsky, Tracey & Wolpert 2019 line of work).

Every estimator also gets a bracket on the true I(X; Z) at its noise: Kolchinsky & Tracey (2017)'s
pairwise-distance bounds on the mixture entropy (`mi_pairwise_bounds`). All values in nats.

Torch-free at import: the study spec validates its section with `MIEstimator` itself.
Validated against the closed form for correlated Gaussians (`tests/test_analysis_mi.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor, nn

ESTIMATORS: tuple[str, ...] = ("jensen", "mc", "relative_noise")
# The settings each estimator reads; the others must stay unset (None), so none is silently ignored.
READS: dict[str, tuple[str, ...]] = {"jensen": ("noise_std",), "mc": ("noise_std", "draws"),
                                     "relative_noise": ("noise", "draws")}
# noise_std 1.0: Kawaguchi et al.'s code fixes no single value (its CIFAR script tries a grid from
# 0.01 to 21 per layer and keeps the likeliest); 1.0 is on that grid, about a BatchNorm-ed unit's scale.
DEFAULTS: dict[str, float | int] = {"noise_std": 1.0, "noise": 0.25, "draws": 4}


def estimator_setting(kind: str, name: str, value: float | int | None) -> float | int | None:
    """`name`'s value for estimator `kind`: its default when unset and read, None when not read;
    a value set for an estimator that does not read it is a ValueError."""
    if kind not in READS:
        raise ValueError(f"unknown estimator {kind!r}; one of {', '.join(ESTIMATORS)}")
    if name not in READS[kind]:
        if value is not None:
            readers = [k for k, names in READS.items() if name in names]
            which = f"estimator {readers[0]}" if len(readers) == 1 else f"estimators {' and '.join(readers)}"
            raise ValueError(f"{name} is read only by {which}; estimator {kind} reads {', '.join(READS[kind])}")
        return None
    return DEFAULTS[name] if value is None else value


@dataclass(frozen=True)
class MIEstimator:
    """Which estimator, and its settings: unset (None) ones it reads take `DEFAULTS`."""

    kind: str = "jensen"
    noise_std: float | None = None  # jensen, mc: the noise's std, absolute (in the activations' units)
    noise: float | None = None  # relative_noise: the noise's std as a share of the median pairwise distance
    draws: int | None = None  # mc, relative_noise: noise draws per sample

    def __post_init__(self) -> None:
        for name in DEFAULTS:  # frozen: fill through object.__setattr__, as dataclasses do
            object.__setattr__(self, name, estimator_setting(self.kind, name, getattr(self, name)))
        for name in READS[self.kind]:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def describe(self) -> str:
        """The estimator and its settings, for a plot's title."""
        if self.kind == "relative_noise":
            return f"relative noise: std {self.noise} x median distance, {self.draws} draws"
        name = "Jensen" if self.kind == "jensen" else f"Monte Carlo, {self.draws} draws"
        return f"Kawaguchi et al. 2023, {name}, noise std {self.noise_std}"


def _log_kernel(z: Tensor, h: Tensor, s: float) -> Tensor:
    """[len(z), len(h)]: log N(z_i; h_j, s^2 I), less the normaliser every entry shares."""
    import torch

    return -torch.cdist(z, h).pow(2) / (2 * s * s)


def log_marginal(log_k: Tensor, jensen: bool = False) -> Tensor:
    """log p(z_i) under the equal-weight mixture over the columns of `log_k` (its components'
    log densities): the log-mean-exp, or with `jensen` the mean of the logs (never above it)."""
    import torch

    if jensen:
        return log_k.mean(dim=1)
    return torch.logsumexp(log_k, dim=1) - math.log(log_k.shape[1])


def mi_pairwise_bounds(h: Tensor, s: float) -> tuple[float, float]:
    """(lower, upper) bounds on I(X; h + N(0, s^2 I)) with X uniform over the rows of `h`:
    Kolchinsky & Tracey (2017) with the Bhattacharyya (lower) and KL (upper) distances,
    I <= -1/N sum_i log 1/N sum_j exp(-|h_i - h_j|^2 / (2 s^2)), the lower bound with 8 s^2."""
    import torch

    h = h.flatten(1).double()
    d2 = torch.cdist(h, h).pow(2)
    log_n = math.log(h.shape[0])
    upper = -(torch.logsumexp(-d2 / (2 * s * s), dim=1) - log_n).mean()
    lower = -(torch.logsumexp(-d2 / (8 * s * s), dim=1) - log_n).mean()
    return float(lower), float(upper)


def mi_monte_carlo(h: Tensor, s: float, draws: int = 4, seed: int = 0, jensen: bool = False) -> float:
    """Monte Carlo estimate of I(X; h + N(0, s^2 I)) with X uniform over the rows of `h`: draw
    z_i = h_i + noise, average log N(z_i; h_i, s^2 I) - log p(z_i). With `jensen`, log p(z_i) is
    the mean of the components' log densities (Kawaguchi et al.'s switch); `mi_jensen` is that
    value's exact expectation over the noise."""
    import torch

    h = h.flatten(1).double()
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        z = h + s * torch.randn(h.shape, generator=g, dtype=h.dtype)
        log_k = _log_kernel(z, h, s)
        total += float((log_k.diagonal() - log_marginal(log_k, jensen)).mean())
    return total / draws


def mi_jensen(h: Tensor, s: float) -> float:
    """Kawaguchi et al.'s Jensen estimate of I(X; h + N(0, s^2 I)), X uniform over the rows of `h`,
    in expectation over the noise: with z = h_i + e, log N(z; h_i) - 1/N sum_j log N(z; h_j) is
    1/N sum_j (|h_i - h_j|^2 + 2 e.(h_i - h_j)) / (2 s^2) (the |e|^2 terms cancel), whose mean over e
    and i is the mean pairwise KL divergence, 1/N^2 sum_ij |h_i - h_j|^2 / (2 s^2)
    = 1/N sum_i |h_i - mean(h)|^2 / s^2: the representation's total variance over s^2. Their CIFAR
    code evaluates it at z = h_i, which gives the same value. O(N d), where `mc` is O(N^2 d)."""
    h = h.flatten(1).double()
    return float((h - h.mean(dim=0)).pow(2).sum(dim=1).mean()) / (s * s)


def noise_scale(h: Tensor, noise: float) -> float:
    """`noise` times the median distance between two samples' representations (all equal: `noise` itself)."""
    import torch

    h = h.flatten(1).double()
    median = float(torch.pdist(h).median()) if len(h) > 1 else 0.0
    return noise * (median if median > 0 else 1.0)


@dataclass(frozen=True)
class LayerMI:
    index: int  # block number (1-based), as exits are numbered
    mi: float  # the estimator's value, nats
    lower: float  # Kolchinsky & Tracey's bracket on the true I(X; Z) at noise_std (not on the estimate)
    upper: float
    noise_std: float  # the noise's std s, absolute
    dims: int


def layer_mi(h: Tensor, estimator: MIEstimator, index: int, seed: int = 0) -> LayerMI:
    """I(X; h + noise) for one block's outputs `h` (rows: samples) by `estimator`."""
    if estimator.kind == "relative_noise":
        s = noise_scale(h, estimator.noise)
    else:
        s = estimator.noise_std
    if estimator.kind == "jensen":
        mi = mi_jensen(h, s)
    else:
        mi = mi_monte_carlo(h, s, estimator.draws, seed)
    lower, upper = mi_pairwise_bounds(h, s)
    return LayerMI(index, mi, lower, upper, s, h.flatten(1).shape[1])


def block_mutual_information(net: nn.Module, x: Tensor, estimator: MIEstimator = MIEstimator(), seed: int = 0) -> list[LayerMI]:
    """I(X; Z_b) for every backbone block b on the batch `x` (net in eval mode)."""
    import torch

    from exitflow.stages.core.analysis.capture import capture_outputs

    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), capture_outputs(enumerate(net.backbone.blocks, start=1), net.backbone.ic_input) as outputs:
            net(x)
    finally:
        net.train(was_training)
    return [layer_mi(h, estimator, number, seed) for number, h in sorted(outputs.items())]  # by block number


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
    ax.axhline(math.log(samples), color="grey", ls=":", lw=1, label="log N (the most the true I(X; Z) can be)")
    ax.set_xlabel("backbone block")
    ax.set_ylabel("I(X; Z) estimate (nats)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
