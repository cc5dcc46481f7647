"""Early-exit evaluation maths: cached logits -> fixed-exit accuracy and threshold curves.

Everything after `collect_logits` works on the cached [E, N, C] logits, vectorized over samples,
exits and thresholds at once (README, "The maths, exactly"). Reading budgets off the curves is
`stages.core.budgets`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from exitflow.stages.core.registry import Registry

Spacing = Literal["uniform", "quantile"]
SPACINGS: tuple[str, ...] = ("uniform", "quantile")


@dataclass(frozen=True)
class ExitCriterion:
    """How confident an exit is in a sample, and which way a threshold reads it.

    `confidence(logp)`: log-softmax [E, N, C] (float64) -> confidence [E, N]. It lies in
    [0, upper(C)]; `confident_high`: a sample leaves at an IC when its confidence is above the
    threshold (max softmax), else below it (entropy). Every function below reads only these
    three, so a new criterion is one registration, never a branch.
    """

    name: str
    confidence: Callable[[torch.Tensor], torch.Tensor]
    confident_high: bool
    upper: Callable[[int], float]  # the range's top, given the number of classes


CRITERIA: Registry[ExitCriterion] = Registry("criterion")
Criterion = str | ExitCriterion  # a registered name, or the criterion itself


def register_criterion(criterion: ExitCriterion) -> ExitCriterion:
    return CRITERIA.register(criterion.name, criterion)


def get_criterion(criterion: Criterion) -> ExitCriterion:
    return criterion if isinstance(criterion, ExitCriterion) else CRITERIA.get(criterion)


def agreement_run(logp: torch.Tensor) -> torch.Tensor:
    """PABEE's patience (Zhou et al. 2020) as a confidence: at exit i, the number of consecutive
    exits up to i that predict exit i's class, over the number of exits E: [E, N] in [1/E, 1].

    PABEE leaves at the first IC whose counter of agreements with the previous exit reaches the
    patience p; that counter is this run length - 1, so threshold t is patience p = floor(t * E):
    a sample leaves at the first IC where at least p + 1 consecutive exits agree.
    """
    pred = logp.argmax(dim=-1)  # [E, N]
    run = torch.ones(pred.shape, dtype=torch.float64)
    for i in range(1, pred.shape[0]):
        run[i] = torch.where(pred[i] == pred[i - 1], run[i - 1] + 1.0, 1.0)
    return run / pred.shape[0]


register_criterion(ExitCriterion("max_softmax", lambda logp: logp.max(dim=-1).values.exp(), True, lambda c: 1.0))
register_criterion(ExitCriterion("entropy", lambda logp: -(logp.exp() * logp).sum(dim=-1), False, math.log))
register_criterion(ExitCriterion("patience", agreement_run, True, lambda c: 1.0))


def collect_logits(net: nn.Module, loader: DataLoader, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over `loader`: (logits [E, N, C] float32 on CPU, labels [N] int64). Leaves `net` in eval mode."""
    net.eval()
    per_batch: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with torch.inference_mode():
        for x, y in loader:
            outs = net(x.to(device, non_blocking=True))
            per_batch.append(torch.stack([o.float() for o in outs]).cpu())  # [E, B, C]
            labels.append(torch.as_tensor(y).cpu())
    if not per_batch:
        raise ValueError("collect_logits: the loader yielded no batches")
    return torch.cat(per_batch, dim=1), torch.cat(labels).long()


def fixed_exit_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy of every exit when it is forced to classify every sample: [E] float64.

    float64 so it equals the threshold curve's end points exactly (both are counts / N).
    """
    return (logits.argmax(dim=-1) == labels.unsqueeze(0)).double().mean(dim=1)


def confidence(logits: torch.Tensor, criterion: Criterion) -> torch.Tensor:
    """Per-exit, per-sample confidence [E, N] (float64, on the logits' device): max softmax,
    predictive entropy in nats, ... The one definition the simulated curve and dynamic inference
    (`stages.core.inference`) share, so both take the same exit for the same logits."""
    c = get_criterion(criterion)
    logp = torch.log_softmax(torch.as_tensor(logits).double(), dim=-1)
    # Clamp: rounding must not put a confidence outside its range, where the end thresholds would misbehave.
    return c.confidence(logp).clamp(0.0, c.upper(logits.shape[-1]))


def passes(conf: torch.Tensor, threshold: float, criterion: Criterion) -> torch.Tensor:
    """Whether a confidence lets a sample leave at an IC: above the threshold (max softmax), below it (entropy)."""
    return conf > threshold if get_criterion(criterion).confident_high else conf < threshold


def exit_criterion(logits: torch.Tensor, criterion: Criterion) -> np.ndarray:
    """Per-exit, per-sample confidence [E, N] (float64) as a NumPy array: see `confidence`."""
    return confidence(logits, criterion).cpu().numpy()


def running_best(conf: np.ndarray, criterion: Criterion) -> np.ndarray:
    """The ICs' best confidence so far, exit by exit: [E-1, N] (prefix max, or prefix min when low is confident)."""
    ics = conf[:-1]
    accumulate = np.maximum.accumulate if get_criterion(criterion).confident_high else np.minimum.accumulate
    return accumulate(ics, axis=0)


def threshold_grid(
    criterion: Criterion,
    num_classes: int,
    num_thresholds: int = 100,
    spacing: Spacing = "uniform",
    conf: np.ndarray | None = None,
) -> np.ndarray:
    """Thresholds from one end of the criterion's range to the other: [0, 1] for max softmax, [0, ln C] for entropy.

    "uniform": evenly spaced. "quantile": the two ends, and between them thresholds at evenly
    spaced quantiles of the ICs' running best confidence (`conf` [E, N], as `exit_criterion`
    gives it), which is what decides each sample's exit. Confident ICs put almost every max
    softmax above 0.99, so a uniform grid leaves the curve a few points near its cheap end
    and one jump to the full cost; quantiles spread the points along the FLOPs axis. With
    fewer distinct confidences than thresholds the grid is shorter than `num_thresholds`.
    """
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be >= 2 (the two ends), got {num_thresholds}")
    top = get_criterion(criterion).upper(num_classes)
    if spacing == "uniform":
        return np.linspace(0.0, top, num_thresholds)
    if spacing != "quantile":
        raise ValueError(f"unknown threshold spacing {spacing!r}; known: {list(SPACINGS)}")
    if conf is None:
        raise ValueError("quantile spacing needs the confidences (conf)")
    if conf.shape[0] < 2:  # a single exit: nothing to spread
        return np.linspace(0.0, top, num_thresholds)
    values = np.unique(running_best(conf, criterion))
    # One candidate per gap between neighbouring values, at its midpoint: every threshold in a
    # gap gives the same curve point, and one away from the values is safe from rounding.
    gaps = (values[:-1] + values[1:]) / 2
    if gaps.size == 0 or num_thresholds == 2:
        inner = np.empty(0)
    else:
        inner = gaps[np.unique(np.round(np.linspace(0, gaps.size - 1, num_thresholds - 2)).astype(int))]
    return np.unique(np.concatenate([[0.0, top], np.clip(inner, 0.0, top)]))


def exit_indices(conf: np.ndarray, thresholds: np.ndarray, criterion: Criterion) -> np.ndarray:
    """Exit taken by every sample at every threshold: [T, N] ints in [0, E-1].

    A sample leaves at the first IC (exits 0..E-2) whose criterion passes (max softmax > t,
    entropy < t), else at the final exit E-1. With the running best confidence over ICs
    (a prefix max, or prefix min for entropy), "first passing IC" = number of ICs whose running
    best still fails, so one broadcast comparison and a sum give all thresholds at once.
    """
    best = running_best(conf, criterion)[None]  # [1, E-1, N]; the final exit always accepts
    t = thresholds[:, None, None]
    return (best <= t if get_criterion(criterion).confident_high else best >= t).sum(axis=1)


def threshold_curve(
    logits: torch.Tensor,
    labels: torch.Tensor,
    exit_flops: Sequence[float],
    criterion: Criterion = "max_softmax",
    num_thresholds: int = 100,
    spacing: Spacing = "uniform",
) -> dict[str, np.ndarray]:
    """FLOPs-accuracy trade-off of confidence-based early exiting: arrays threshold, flops, accuracy [T].

    flops is the mean per-sample cost (the cost of the exit each sample leaves at); accuracy the
    share of samples whose exit classifies them correctly. `spacing`: see `threshold_grid`.
    """
    criterion = get_criterion(criterion)
    num_exits, n, num_classes = logits.shape
    cost = np.asarray(exit_flops, dtype=np.float64)
    if cost.shape != (num_exits,):
        raise ValueError(f"exit_flops has {cost.size} entries for {num_exits} exits")
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} samples")
    conf = exit_criterion(logits, criterion)
    thresholds = threshold_grid(criterion, num_classes, num_thresholds, spacing, conf)
    return {"threshold": thresholds, **curve_at_exits(logits, labels, cost, exit_indices(conf, thresholds, criterion))}


def curve_at_exits(logits: torch.Tensor, labels: torch.Tensor, exit_flops: Sequence[float] | np.ndarray,
                   exits: np.ndarray, equal_mass: bool = False) -> dict[str, np.ndarray]:
    """Curve points from the exit every sample takes at each point (`exits` [T, N] in [0, E-1]):
    arrays flops (mean per-sample cost), accuracy and ece (of the taken exits' predictions) [T];
    with `equal_mass`, also ece_equal_mass (`equal_mass_calibration_error`)."""
    cost = np.asarray(exit_flops, dtype=np.float64)
    correct = (logits.argmax(dim=-1) == torch.as_tensor(labels).unsqueeze(0)).numpy()  # [E, N]
    hit = np.take_along_axis(correct, exits, axis=0)  # row t picks each sample's exit at point t
    top = np.take_along_axis(top_probability(logits), exits, axis=0)  # [T, N]: the taken exit's top-class probability
    out = {
        "flops": cost[exits].mean(axis=1),
        "accuracy": hit.mean(axis=1, dtype=np.float64),
        "ece": calibration_error(top, hit),
    }
    if equal_mass:
        out["ece_equal_mass"] = equal_mass_calibration_error(top, hit)
    return out


ECE_BINS = 15  # Guo et al. 2017's choice, the usual one


def top_probability(logits: torch.Tensor) -> np.ndarray:
    """The predicted class's softmax probability at every exit: [E, N] float64."""
    return torch.softmax(torch.as_tensor(logits).double(), dim=-1).max(dim=-1).values.numpy()


def calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Expected calibration error (Naeini et al. 2015; Guo et al. 2017) of each row: [..., N] -> [...].

    The predictions' top-class probabilities fall into `bins` equal-width bins over [0, 1] (the top
    one closed); ECE = sum over bins of (share of samples in it) x |accuracy - mean probability|
    in it. Vectorized over rows (every exit, or every threshold of a curve).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    rows, n = int(np.prod(confidence.shape[:-1])), confidence.shape[-1]
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1).reshape(rows, n)
    flat = (which + bins * np.arange(rows)[:, None]).ravel()  # one bin index per (row, bin)
    conf_sum = np.bincount(flat, confidence.reshape(-1), minlength=rows * bins).reshape(rows, bins)
    hit_sum = np.bincount(flat, correct.reshape(-1), minlength=rows * bins).reshape(rows, bins)
    return (np.abs(hit_sum - conf_sum).sum(axis=1) / n).reshape(confidence.shape[:-1])


def _equal_mass_row(confidence: np.ndarray, correct: np.ndarray, bins: int) -> float:
    """One row's ECE over `bins` equal-mass bins (see `equal_mass_calibration_error`)."""
    # numpy's default (linear) interpolation; the levels as fractions x 100, as JEI-DNN's code writes them:
    # where an edge lands on a sample, a last-bit difference in the level moves that sample to the next bin
    edges = np.percentile(confidence, np.linspace(0.0, 1.0, bins + 1) * 100)
    # bin i holds edges[i] < p <= edges[i + 1] (the first bin everything up to edges[1]): a tie at an
    # edge joins the lower bin, and tied edges leave empty bins, which add nothing
    which = np.searchsorted(edges[1:-1], confidence, side="left")
    conf_sum = np.bincount(which, confidence, minlength=bins)
    hit_sum = np.bincount(which, correct, minlength=bins)
    return float(np.abs(hit_sum - conf_sum).sum() / confidence.size)


def equal_mass_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS,
                                 batch: int | None = None) -> np.ndarray:
    """ECE with equal-mass bins, as JEI-DNN's code (networkslab/dynn, `src/metrics_utils.py` through its
    copy of scikit-learn's `calibration_curve(strategy="quantile", n_bins=15)`) computes it: [..., N] -> [...].

    The bin edges are the 0, 1/bins, ..., 1 quantiles of the row's confidences (about N / bins samples
    a bin); ECE = sum over bins of (share of samples in it) x |accuracy - mean confidence| in it.
    `batch`: their test-time aggregate, the size-weighted mean of each batch's own ECE over consecutive
    batches of `batch` samples; None (exitflow's): one ECE over the whole row, which does not grow as
    the batches shrink (docs/methods.md).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    n = confidence.shape[-1]
    step = n if batch is None else batch
    rows_conf, rows_hit = confidence.reshape(-1, n), correct.reshape(-1, n)
    out = [sum(_equal_mass_row(c[i : i + step], h[i : i + step], bins) * min(step, n - i) / n for i in range(0, n, step))
           for c, h in zip(rows_conf, rows_hit)]
    return np.asarray(out, dtype=np.float64).reshape(confidence.shape[:-1])
