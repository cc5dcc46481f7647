"""Mode connectivity between trained models (the paper's section 3.1, Fig. 2, appendix D.8).

Models B (and C) are first aligned to A by weight matching (`stages.core.analysis.permutation`), so
that the paths compare functions rather than arbitrary orderings of hidden units. Then:

- the line: theta(t) = (1 - t) A + t perm(B) for `points` values of t evenly spaced in [0, 1];
- the plane: theta(a, b) = (1 - a - b) A + a perm(B) + b perm(C) for a, b on a `steps` x `steps`
  grid over [0, 1]^2 (corners (0, 0), (1, 0), (0, 1) are the three models, (1, 1) is B + C - A).

Every point's BatchNorm statistics are repaired (Jordan et al. 2022, "REPAIR"; Ainsworth et al.
2022): interpolated running statistics describe no network, so they are reset and recomputed on
training images in train mode with momentum None (a plain average over the batches), then the net is
evaluated in eval mode. The endpoints are repaired too, so a path compares like with like. At each
point: the mean cross-entropy and the accuracy of every exit on a fixed batch, and the total loss
(the sum over exits: the joint objective with uniform weights).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exitflow.stages.core.analysis.permutation import State

EVAL_BATCH = 512


def interpolate(states: Sequence[State], weights: Sequence[float]) -> State:
    """sum_i w_i * state_i on floating entries; integer entries (BatchNorm's counters) from the first."""
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = sum(w * s[key] for w, s in zip(weights, states))  # type: ignore[assignment]
        else:
            out[key] = first.clone()
    return out


@torch.no_grad()
def repair_batchnorm(net: nn.Module, x: Tensor, batch_size: int = EVAL_BATCH) -> None:
    """Recompute every BatchNorm's running statistics on `x` (train mode, momentum None); leaves the net in eval mode."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch counts the same, the order does not matter
        net.train()
        # near-equal batches: none of a single image (train-mode BatchNorm needs two), and each counts alike
        for chunk in x.tensor_split(math.ceil(x.shape[0] / batch_size)):
            net(chunk)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    net.eval()


@torch.no_grad()
def exit_metrics(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = EVAL_BATCH) -> tuple[list[float], list[float]]:
    """(mean cross-entropy, accuracy) of every exit on (x, y), the final exit last; the net in eval mode."""
    net.eval()
    loss: Tensor | None = None
    hits: Tensor | None = None
    for i in range(0, x.shape[0], batch_size):
        logits = net(x[i : i + batch_size])
        target = y[i : i + batch_size]
        part = torch.stack([F.cross_entropy(z.float(), target, reduction="sum") for z in logits])
        right = torch.stack([(z.argmax(1) == target).sum() for z in logits])
        loss, hits = (part, right) if loss is None else (loss + part, hits + right)  # type: ignore[operator]
    assert loss is not None and hits is not None
    return (loss / x.shape[0]).tolist(), (hits.double() / x.shape[0]).tolist()


def _point(net: nn.Module, state: State, x: Tensor, y: Tensor, repair: Tensor | None) -> tuple[list[float], list[float]]:
    net.load_state_dict(state)
    if repair is not None:
        repair_batchnorm(net, repair)
    return exit_metrics(net, x, y)


def _rows(base: dict[str, float], losses: list[float], accs: list[float]) -> list[dict[str, Any]]:
    """One row per exit, and exit -1: the total loss (sum over exits) with the exits' mean accuracy."""
    rows = [{**base, "exit": k, "loss": l, "accuracy": acc} for k, (l, acc) in enumerate(zip(losses, accs))]
    return rows + [{**base, "exit": -1, "loss": sum(losses), "accuracy": sum(accs) / len(accs)}]


def _weights(state: State) -> list[str]:
    """The entries whose distance the coordinates measure: learned weights, not BatchNorm's running
    statistics (recomputed at every point, and large enough to swamp the weights' distance)."""
    return [k for k, v in state.items() if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))]


def _distance(s: State, t: State) -> Tensor:
    return torch.sqrt(sum(((s[k].double() - t[k].double()) ** 2).sum() for k in _weights(s)))


def grid(n: int) -> list[float]:
    """`n` points evenly spaced in [0, 1], exactly 0 and 1 at the ends."""
    if n < 2:
        raise ValueError(f"a path needs at least 2 points, got {n}")
    return [i / (n - 1) for i in range(n)]


def line(net: nn.Module, a: State, b: State, x: Tensor, y: Tensor, points: int, repair: Tensor | None = None) -> list[dict[str, Any]]:
    """Rows (a = t, b = 0, x = t |B - A| (learned weights), y = 0, exit, loss, accuracy) along (1 - t) A + t B."""
    dist = _distance(a, b).item()
    rows = []
    for t in grid(points):
        losses, accs = _point(net, interpolate((a, b), (1.0 - t, t)), x, y, repair)
        rows += _rows({"a": t, "b": 0.0, "x": t * dist, "y": 0.0}, losses, accs)
    return rows


def plane(net: nn.Module, a: State, b: State, c: State, x: Tensor, y: Tensor, steps: int,
          repair: Tensor | None = None) -> list[dict[str, Any]]:
    """Rows (a, b, x, y, exit, loss, accuracy) over (1 - a - b) A + a B + b C; (x, y) are the point's
    coordinates in an orthonormal basis of the plane (A at the origin, B on the x axis; the learned
    weights' distances), so plots keep its geometry."""
    floats = _weights(a)
    u = torch.cat([(b[k].double() - a[k].double()).flatten() for k in floats])
    v = torch.cat([(c[k].double() - a[k].double()).flatten() for k in floats])
    nu = u.norm().item()
    along = (u @ v).item() / max(nu, 1e-30)  # v's component along u
    across = math.sqrt(max(v.norm().item() ** 2 - along**2, 0.0))
    rows = []
    for s in grid(steps):
        for t in grid(steps):
            losses, accs = _point(net, interpolate((a, b, c), (1.0 - s - t, s, t)), x, y, repair)
            rows += _rows({"a": s, "b": t, "x": s * nu + t * along, "y": t * across}, losses, accs)
    return rows


def barrier(rows: list[dict[str, Any]], exit: int = -1, key: str = "loss", sign: float = 1.0) -> float:
    """max over the line of sign * (value(t) - ((1 - t) value(0) + t value(1))): the loss barrier
    (Frankle et al. 2020); with key "accuracy" and sign -1, the accuracy's largest dip below the chord."""
    path = sorted((r["a"], r[key]) for r in rows if r["exit"] == exit)
    (t0, v0), (t1, v1) = path[0], path[-1]
    return max(sign * (v - ((t1 - t) * v0 + (t - t0) * v1) / (t1 - t0)) for t, v in path)


def plot_lines(lines: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """Per pair (a row of panels): every exit's loss and accuracy along t, the total loss dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 2.8 * len(lines)))
    FigureCanvasAgg(fig)
    for i, (pair, rows) in enumerate(lines.items()):
        exits = sorted({r["exit"] for r in rows if r["exit"] >= 0})
        ax_loss, ax_acc = fig.add_subplot(len(lines), 2, 2 * i + 1), fig.add_subplot(len(lines), 2, 2 * i + 2)
        for k in exits:
            pts = sorted((r["a"], r["loss"], r["accuracy"]) for r in rows if r["exit"] == k)
            ts = [p[0] for p in pts]
            name = "final" if k == exits[-1] else f"exit {k}"
            ax_loss.plot(ts, [p[1] for p in pts], marker=".", label=name)
            ax_acc.plot(ts, [100 * p[2] for p in pts], marker=".", label=name)
        total = sorted((r["a"], r["loss"]) for r in rows if r["exit"] == -1)
        ax_loss.plot([p[0] for p in total], [p[1] for p in total], "k--", label="total")
        a, b = pair.split("-", 1)
        for ax, label in ((ax_loss, "loss"), (ax_acc, "accuracy (%)")):
            ax.set_xlabel(f"t   ({a} -> {b}, aligned)")
            ax.set_ylabel(label)
            ax.set_title(f"{pair}: {label}", fontsize=9)
        ax_loss.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_plane(rows: list[dict[str, Any]], names: Sequence[str], path: Path, title: str) -> Path:
    """Heatmap of the total loss over the plane, in its orthonormal coordinates; the three models marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    total = [r for r in rows if r["exit"] == -1]
    corners = {(0.0, 0.0): names[0], (1.0, 0.0): names[1], (0.0, 1.0): names[2]}
    marks = [(r["x"], r["y"], corners[(r["a"], r["b"])], r["loss"]) for r in total if (r["a"], r["b"]) in corners]
    # the colour scale tops out at twice the worst model's loss, as the paper's Fig. 2 caps high loss
    cap = 2.0 * max(m[3] for m in marks)
    fig = Figure(figsize=(5.2, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cs = ax.tricontourf([r["x"] for r in total], [r["y"] for r in total], [min(r["loss"], cap) for r in total],
                        levels=20, cmap="viridis")
    fig.colorbar(cs, ax=ax, shrink=0.8, label=f"total loss (capped at {cap:.2f})")
    for x, y, name, loss in marks:
        ax.plot([x], [y], "r*", markersize=10)
        ax.annotate(f"{name} {loss:.3f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8,
                    bbox={"boxstyle": "round", "fc": "white", "alpha": 0.7}, annotation_clip=False)
    xs, ys = [r["x"] for r in total], [r["y"] for r in total]
    pad = 0.1 * max(max(xs) - min(xs), max(ys) - min(ys), 1e-12)  # room for the marks' labels at the edges
    ax.set_xlim(min(xs) - pad, max(xs) + 3 * pad)  # the labels sit right of their marks
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.set_xlabel("weight-space distance (aligned)")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": the marks' labels may reach past the axes
    return path


def repair_batch(train: Any, samples: int, seed: int) -> Tensor:
    """`samples` seeded training images for BatchNorm repair, through the training transforms (the
    statistics the models were trained under); the random draws of any augmentation are seeded too."""
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: min(samples, len(train))]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([train[int(i)][0] for i in idx])
