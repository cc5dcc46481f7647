"""The training loop of one phase: plain functions with explicit arguments.

`fit_phase` reads top to bottom: prepare -> optimizer -> schedule -> resume -> epochs.
It runs the same with and without DDP; Ray (or any launcher) wraps it from outside: build
the net, call `prepare_phase`, wrap in DDP, then call `fit_phase` with an `on_epoch` that
reports and checkpoints. Nothing here imports Ray or MLflow. Which epoch a phase keeps is
`stages.core.selection`; its resumable state and its result, `stages.core.phase_state`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from exitflow.stages.core.early_stopping import EarlyStopping
from exitflow.stages.core.epoch import StepHook, all_reduce_sum, autocast, evaluate_exits, to_device, train_one_epoch
from exitflow.stages.core.l2w import L2W
from exitflow.stages.core.phase_config import L2WSettings, PhaseConfig
from exitflow.stages.core.phase_state import PhaseResult, Progress, cpu_copy, restore, snapshot
from exitflow.stages.core.regimes import Phase, check_phase, exit_weights, prepare_phase, unwrap
from exitflow.stages.core.selection import DIVERGED_SCORE, divergence_message, diverged_in, monitored, selection_score

__all__ = [
    "EarlyStopping",
    "EpochReport",
    "PhaseConfig",
    "PhaseResult",
    "build_optimizer",
    "build_scheduler",
    "diverged_in",
    "evaluate_exits",
    "exit_fractions",
    "fit_phase",
    "lr_factor",
    "seed_everything",
    "train_one_epoch",
    "unwrap",
]

logger = logging.getLogger(__name__)


@dataclass
class EpochReport:
    """What `fit_phase` hands `on_epoch` after every epoch."""

    epoch: int  # 0-based epoch just finished
    metrics: dict[str, float]  # flat: train_loss, val_acc_<k>, val_acc_mean, val_acc_final, val_score, lr, ...
    state: dict[str, Any]  # CPU snapshot that `fit_phase(resume=state)` continues from (see `fit_phase`)
    improved: bool  # the selection score improved: state["best_state_dict"] is this epoch's net
    stop: bool  # early stopping fired: this is the phase's last epoch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Seeding is the caller's job, not `fit_phase`'s."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(params: Iterable[nn.Parameter], cfg: PhaseConfig) -> Optimizer:
    """The phase's optimizer over `params` (the trainable ones, from `prepare_phase`).

    Weight decay applies to tensors with ndim >= 2 only (the nanoGPT/timm convention).
    """
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters: did prepare_phase freeze everything?")
    if cfg.lr is None:
        raise ValueError("phase config: lr is unset (a searched phase trains with each trial's own lr)")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.Adam(groups, lr=cfg.lr)


def lr_factor(step: int, cfg: PhaseConfig, steps_per_epoch: int) -> float:
    """Multiplier of `cfg.lr` at optimizer step `step` (0-based): linear warm-up, then the schedule."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "none":
        return 1.0
    if cfg.schedule == "step":
        return cfg.step_gamma ** (step // (steps_per_epoch * cfg.step_epochs))
    total = cfg.max_epochs * steps_per_epoch
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: Optimizer, cfg: PhaseConfig, steps_per_epoch: int) -> LRScheduler:
    """A per-step scheduler (call `.step()` after every optimizer step) following `lr_factor`.

    Its state_dict holds plain numbers only (a closure is not pickled), so it resumes exactly.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch))


def _set_epoch(loader: Any, epoch: int) -> None:
    """DistributedSampler (and friends) reshuffle per epoch only when told the epoch."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def fit_phase(
    net: nn.Module,
    phase: Phase,
    cfg: PhaseConfig,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    val_loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    on_step: StepHook | None = None,
    flops_frac: Sequence[float] | None = None,
) -> PhaseResult:
    """Train `net` for one phase with early stopping; the net ends holding its best state.

    `net` may be DDP-wrapped, provided `prepare_phase(net, phase)` ran before the wrap.
    After every epoch `on_epoch` gets an `EpochReport` whose `state` (CPU tensors and plain
    values; loads with `torch.load(weights_only=True)`) has the keys phase, epoch, config,
    net (unwrapped state_dict), optimizer, scheduler, early_stopping, best_state_dict,
    history, rng. Passing it back as `resume` continues at epoch + 1 exactly where the
    uninterrupted run would be (same optimizer, schedule, early stopping and RNG states).
    Every epoch is scored by `cfg.selection` (`stages.core.selection.selection_score`: P1 always
    by its final exit); `auc` reads `flops_frac`, each exit's FLOPs as a share of the final exit's
    (counted from the net when not given). `on_step(epoch, step, steps)` runs after every optimizer step.
    """
    device = torch.device(device)
    if cfg.selection == "auc" and phase != "P1" and flops_frac is None:
        flops_frac = exit_fractions(unwrap(net))
    model, params = _setup(net, phase, cfg, device)
    optimizer = build_optimizer(params, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=len(train_loader))  # type: ignore[arg-type]
    progress = Progress(EarlyStopping(cfg.patience))
    l2w = _make_l2w(cfg, phase, model.num_exits, device)
    if resume is not None:
        progress = restore(resume, phase, cfg, model, optimizer, scheduler, train_loader, device, l2w)

    ramp_epochs = cfg.kaya_epochs or cfg.max_epochs
    for epoch in range(progress.start_epoch, cfg.max_epochs):
        if progress.stopper.stop:  # a resumed state may already have stopped
            break
        weights = exit_weights(cfg.loss_weighting, model.num_exits, min(1.0, (epoch + 1) / ramp_epochs), model.method)
        _set_epoch(train_loader, epoch)
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        train = train_one_epoch(net, phase, weights, optimizer, scheduler, train_loader, device, cfg, epoch, on_step, l2w)
        val = evaluate_exits(net, val_loader, device, cfg)
        score, improved = _select(progress, model, phase, epoch, val["accuracy"], train["nonfinite_step"], cfg, flops_frac)
        metrics = _epoch_metrics(epoch, train, val, score, lr, time.perf_counter() - start)
        progress.history.append(metrics)
        logger.info("%s epoch %d: train_loss %.4f val_acc %s score %.4f%s", phase, epoch, train["train_loss"],
                    " ".join(f"{a:.3f}" for a in val["accuracy"]), score, " (best)" if improved else "")
        if progress.stopper.stop or epoch == cfg.max_epochs - 1:  # the phase's last epoch
            _finish_method(model, phase, progress, train_loader, device, cfg)
        if on_epoch is not None:
            state = snapshot(phase, epoch, cfg, model, optimizer, scheduler, progress, train_loader, device, l2w)
            on_epoch(EpochReport(epoch=epoch, metrics=dict(metrics), state=state, improved=improved, stop=progress.stopper.stop))

    if progress.best_state is None:
        raise RuntimeError(f"{phase}: no epoch ran (start epoch {progress.start_epoch}, max_epochs {cfg.max_epochs})")
    model.load_state_dict(progress.best_state)
    return PhaseResult.from_state({"history": progress.history, "early_stopping": progress.stopper.state_dict(),
                                   "best_state_dict": progress.best_state})


def exit_fractions(net: nn.Module) -> list[float]:
    """Each exit's FLOPs as a share of the final exit's (what selection `auc` integrates over)."""
    from exitflow.stages.core.flops import exit_flops  # fvcore: imported only when the fractions are asked for

    flops = exit_flops(net)
    return [f / flops[-1] for f in flops]


def _setup(net: nn.Module, phase: Phase, cfg: PhaseConfig, device: torch.device) -> tuple[Any, list[nn.Parameter]]:
    """Freeze what the phase freezes, place the net; returns the unwrapped net and the trained parameters."""
    check_phase(phase)
    model = unwrap(net)
    is_ddp = isinstance(net, nn.parallel.DistributedDataParallel)
    flags_before = [p.requires_grad for p in model.parameters()]
    params = prepare_phase(net, phase)
    if is_ddp and flags_before != [p.requires_grad for p in model.parameters()]:
        raise RuntimeError(f"call prepare_phase(net, {phase!r}) before wrapping the net in DDP")
    if not is_ddp:
        model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # in place: `params` stay valid
    # Gradient equilibrium balances several exits' gradients inside the backbone, which only
    # P2 has (in P1 it would merely shrink early layers' gradients). It is a switch in the
    # net, not a weight: set it every phase so a carried-over net never keeps a stale one.
    model.set_gradient_equilibrium(cfg.loss_weighting == "gradient_equilibrium" and phase == "P2")
    return model, params


def _make_l2w(cfg: PhaseConfig, phase: Phase, num_exits: int, device: torch.device) -> L2W | None:
    """L2W's weight prediction network for a phase that trains the ICs with `loss_weighting: l2w`
    (P1 trains the final exit alone: nothing to weigh). Seeded like everything else in the phase."""
    if cfg.loss_weighting != "l2w" or phase == "P1":
        return None
    return L2W(num_exits, L2WSettings.of(cfg), device)


def _finish_method(model: nn.Module, phase: Phase, progress: Progress, train_loader: Any, device: torch.device,
                   cfg: PhaseConfig) -> None:
    """The method's own step once a phase that trained the ICs (P2, P3) ends (ZTW fits its ensemble):
    on the best state, which then holds its result. It runs before the last epoch's report, so a
    kill during it costs that epoch, and a phase resumed after it does not run it again."""
    method = model.method
    if not method.finishes or phase == "P1" or progress.best_state is None or diverged_in(progress.history):
        return
    model.load_state_dict(progress.best_state)
    batches = (to_device(x, y, device, cfg) for x, y in train_loader)
    with autocast(device, cfg.bf16):
        line = method.finish(model, batches, all_reduce_sum)
    progress.best_state = cpu_copy(model.state_dict())
    logger.info("%s: %s", phase, line)


def _select(progress: Progress, model: nn.Module, phase: Phase, epoch: int, accuracies: list[float], nonfinite_step: int,
            cfg: PhaseConfig, flops_frac: Sequence[float] | None) -> tuple[float, bool]:
    """Score the epoch, update early stopping and keep the best state; a diverged epoch stops the phase."""
    watched, score = monitored(phase, accuracies), selection_score(accuracies, cfg.selection, phase, flops_frac)
    if nonfinite_step >= 0:  # the weights are garbage from here on: stop, as if patience had run out
        progress.stopper.epochs_without_improvement = progress.stopper.patience
        logger.warning("%s diverged: %s", phase, divergence_message(epoch, nonfinite_step))
        if progress.best_state is None:  # nothing healthy to keep: the phase result is marked diverged
            progress.best_state = cpu_copy(model.state_dict())
        return DIVERGED_SCORE, False
    improved = progress.stopper.update(epoch, watched, score)
    if improved:
        progress.best_state = cpu_copy(model.state_dict())
    return score, improved


def _epoch_metrics(epoch: int, train: dict[str, Any], val: dict[str, Any], score: float, lr: float,
                   seconds: float) -> dict[str, float]:
    """One epoch's flat metrics: what history, MLflow and Tune see."""
    accuracies = val["accuracy"]
    metrics: dict[str, float] = {"epoch": float(epoch), "train_loss": train["train_loss"]}
    metrics.update({f"train_loss_{k}": v for k, v in enumerate(train["train_loss_per_exit"])})
    metrics.update({f"val_acc_{k}": v for k, v in enumerate(accuracies)})
    metrics.update({f"val_loss_{k}": v for k, v in enumerate(val["loss"])})
    metrics.update({
        "val_acc_mean": sum(accuracies) / len(accuracies),
        "val_acc_final": accuracies[-1],
        "val_score": score,
        "lr": lr,
        "samples_per_s": train["samples_per_s"],
        "epoch_time": seconds,
        "nonfinite_step": float(train["nonfinite_step"]),
    })
    metrics.update({f"grad_cos_{k}": v for k, v in enumerate(train.get("gradient_dominance", []))})
    if train.get("l2w_meta_loss") is not None:
        metrics["l2w_meta_loss"] = train["l2w_meta_loss"]  # the last meta step's
    return metrics
