"""One epoch of a phase: the training pass (`train_one_epoch`) and the validation pass over every exit
(`evaluate_exits`), the same with and without DDP (sums reduced over ranks), and the device helpers
they share with the loop (`stages.core.loop`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from exitflow.stages.core.analysis.gradient_dominance import GradientDominance
from exitflow.stages.core.l2w import L2W
from exitflow.stages.core.phase_config import PhaseConfig
from exitflow.stages.core.regimes import Phase, per_sample_weighted, phase_loss, phase_objective, set_train_mode, unwrap
from exitflow.stages.core.selection import NO_STEP

StepHook = Callable[[int, int, int], None]  # (epoch, step within the epoch, steps per epoch), after each step


def strip_ddp(net: nn.Module) -> nn.Module:
    """The module inside DDP, keeping any compile wrapper: forward passes that need no
    gradient sync (evaluation) skip DDP's per-forward buffer broadcast."""
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum `t` over ranks when torch.distributed is up, so every rank sees the global value."""
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: Tensor) -> Tensor:
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(x: Tensor, y: Tensor, device: torch.device, cfg: PhaseConfig) -> tuple[Tensor, Tensor]:
    x = x.to(device, non_blocking=True)
    if cfg.channels_last and x.ndim == 4 and x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def train_one_epoch(
    net: nn.Module,
    phase: Phase,
    weights: Tensor,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    cfg: PhaseConfig,
    epoch: int,
    on_step: StepHook | None = None,
    l2w: L2W | None = None,
) -> dict[str, Any]:
    """One pass over `loader`; returns train_loss, train_loss_per_exit, samples_per_s, num_samples,
    nonfinite_step (the first step whose loss was NaN or infinite on any rank, else -1).

    `on_step(epoch, step, steps)` runs after every batch (progress, fault hooks). With `l2w`, a
    batch due a meta step trains in two halves, each after its meta step (stages.core.l2w).

    Losses accumulate on the device and sync once at the end; with torch.distributed up
    they are averaged over all ranks' samples (num_samples is global, samples_per_s this
    worker's throughput).
    """
    set_train_mode(net, phase)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    weights = weights.to(device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # [sum of the phase loss, sum of each exit's loss ..., samples], all sample-weighted.
    sums = torch.zeros(weights.numel() + 2, dtype=torch.float64, device=device)
    # The first step with a non-finite loss, kept on the device (a check per step would sync it).
    nonfinite = torch.full((), NO_STEP, dtype=torch.float64, device=device)
    start = time.perf_counter()
    steps = len(loader) if on_step is not None else 0  # type: ignore[arg-type]
    method = unwrap(net).method
    probe = (GradientDominance(unwrap(net).backbone, weights, method.losses, loss_fn, cfg.gradient_dominance_every)
             if cfg.gradient_dominance_every and phase == "P2" else None)
    sample_loss = nn.CrossEntropyLoss(reduction="none", label_smoothing=cfg.label_smoothing)
    for step, (x, y) in enumerate(loader):
        x, y = to_device(x, y, device, cfg)
        for i, (part, meta) in enumerate(_l2w_parts(x, y, step, l2w)):
            if meta is not None:
                with autocast(device, cfg.bf16):
                    l2w.meta_step(unwrap(net), optimizer,  # type: ignore[union-attr]
                                  lambda ls, w: phase_objective(per_sample_weighted(ls, w), phase, weights,
                                                                cfg.loss_reduction),
                                  method.losses, sample_loss, part, meta)
            xs, ys = part
            with autocast(device, cfg.bf16):
                logits = net(xs)
                if l2w is None:
                    loss, per_exit = phase_loss(logits, ys, phase, weights, loss_fn, method.losses,
                                                reduction=cfg.loss_reduction)
                else:
                    loss, per_exit = phase_loss(logits, ys, phase, weights, sample_loss, method.losses, l2w.weights,
                                                cfg.loss_reduction)
                aux = method.aux_loss(unwrap(net))
                if aux is not None and phase != "P1":  # the method's own loss (GPF's imitation) trains ICs only
                    loss = loss + aux
                if probe is not None and i == 0:  # once per batch, as without L2W
                    probe.maybe_measure(step, logits, ys)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            n = ys.shape[0]
            nonfinite = torch.where(torch.isfinite(loss.detach()) | (nonfinite < NO_STEP), nonfinite, float(step))
            sums[0] += loss.detach() * n
            sums[1:-1] += per_exit * n
            sums[-1] += n
        scheduler.step()
        if on_step is not None:
            on_step(epoch, step, steps)
    local_samples = sums[-1].item()  # syncs the device, so the clock below is honest
    elapsed = time.perf_counter() - start
    if local_samples == 0:
        raise ValueError(f"epoch {epoch}: the training loader yielded no samples")
    first_bad = all_reduce_min(nonfinite).item()
    totals = all_reduce_sum(sums).tolist()
    count = totals[-1]
    return {
        "nonfinite_step": -1 if first_bad == NO_STEP else int(first_bad),
        "train_loss": totals[0] / count,
        "train_loss_per_exit": [s / count for s in totals[1:-1]],
        "samples_per_s": local_samples / elapsed if elapsed > 0 else float("inf"),
        "num_samples": int(count),
        "gradient_dominance": probe.means() if probe is not None else [],
        "l2w_meta_loss": l2w.last_meta_loss if l2w is not None else None,
    }


Batch = tuple[Tensor, Tensor]


def _l2w_parts(x: Tensor, y: Tensor, step: int, l2w: L2W | None) -> list[tuple[Batch, Batch | None]]:
    """(training part, its meta batch or None) in order: the whole batch, or with L2W's meta step
    due, its two halves, each the other's meta batch (the paper's exchange)."""
    if l2w is None or step % l2w.settings.meta_interval or y.shape[0] < 2:
        return [((x, y), None)]
    (x1, x2), (y1, y2) = x.chunk(2), y.chunk(2)
    return [((x1, y1), (x2, y2)), ((x2, y2), (x1, y1))]


def evaluate_exits(
    net: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    cfg: PhaseConfig,
) -> dict[str, Any]:
    """Every exit's accuracy and mean cross-entropy over `loader` (lists, final exit last).

    With torch.distributed up, correct counts, loss sums and sample counts are summed over
    ranks, so every rank returns the same numbers and makes the same early-stopping call.
    """
    model = strip_ddp(net)
    model.eval()
    with torch.inference_mode():
        sums: Tensor | None = None  # [correct per exit ..., loss sum per exit ..., samples]
        for x, y in loader:
            x, y = to_device(x, y, device, cfg)
            with autocast(device, cfg.bf16):
                logits = torch.stack(model(x)).float()  # [E, B, C]
            num_exits, batch = logits.shape[:2]
            if sums is None:
                sums = torch.zeros(2 * num_exits + 1, dtype=torch.float64, device=device)
            sums[:num_exits] += (logits.argmax(-1) == y).sum(1)
            losses = F.cross_entropy(logits.flatten(0, 1), y.repeat(num_exits), reduction="none")
            sums[num_exits:-1] += losses.view(num_exits, batch).sum(1)
            sums[-1] += batch
        if sums is None:
            raise ValueError("the validation loader yielded no samples")
        totals = all_reduce_sum(sums).tolist()
    num_exits, count = (len(totals) - 1) // 2, totals[-1]
    return {
        "accuracy": [c / count for c in totals[:num_exits]],
        "loss": [s / count for s in totals[num_exits:-1]],
        "num_samples": int(count),
    }
