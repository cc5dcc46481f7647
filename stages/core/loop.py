"""The training loop of one phase: plain functions with explicit arguments.

`fit_phase` reads top to bottom: prepare -> optimizer -> schedule -> resume -> epochs.
It runs the same with and without DDP; Ray (or any launcher) wraps it from outside: build
the net, call `prepare_phase`, wrap in DDP, then call `fit_phase` with an `on_epoch` that
reports and checkpoints. Nothing here imports Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from stages.core.analysis.gradient_dominance import GradientDominance
from stages.core.early_stopping import EarlyStopping
from stages.core.l2w import L2W
from stages.core.phase_config import L2WSettings, PhaseConfig, Selection
from stages.core.phases import (
    Phase,
    check_phase,
    exit_weights,
    per_sample_weighted,
    phase_loss,
    phase_objective,
    prepare_phase,
    set_train_mode,
    unwrap,
)

__all__ = [
    "EarlyStopping",
    "EpochReport",
    "PhaseConfig",
    "PhaseResult",
    "build_optimizer",
    "build_scheduler",
    "evaluate_exits",
    "fit_phase",
    "lr_factor",
    "seed_everything",
    "train_one_epoch",
    "unwrap",
]

logger = logging.getLogger(__name__)

ScoreFn = Callable[[list[float]], float]  # every exit's val accuracy (final last) -> selection score
StepHook = Callable[[int, int, int], None]  # (epoch, step within the epoch, steps per epoch), after each step


@dataclass
class EpochReport:
    """What `fit_phase` hands `on_epoch` after every epoch."""

    epoch: int  # 0-based epoch just finished
    metrics: dict[str, float]  # flat: train_loss, val_acc_<k>, val_acc_mean, val_acc_final, val_score, lr, ...
    state: dict[str, Any]  # CPU snapshot that `fit_phase(resume=state)` continues from (see `fit_phase`)
    improved: bool  # the selection score improved: state["best_state_dict"] is this epoch's net
    stop: bool  # early stopping fired: this is the phase's last epoch


@dataclass
class PhaseResult:
    """Outcome of `fit_phase`; the net itself already holds `best_state_dict`."""

    best_state_dict: dict[str, Tensor]  # unwrapped net state (CPU) at the best epoch
    best_epoch: int  # 0-based epoch of the best selection score
    epochs_run: int  # epochs trained in total, resumed ones included
    stopped_early: bool  # early stopping fired (False: max_epochs reached)
    history: list[dict[str, float]] = field(default_factory=list)  # metrics of every epoch
    best_val: dict[str, float] = field(default_factory=dict)  # val_* metrics of the best epoch
    diverged: str = ""  # why the phase stopped on a non-finite loss ("" when it did not)


NO_STEP = float(2**53)  # "no non-finite step yet": above any step, so a MIN over ranks finds the first
DIVERGED_SCORE = -1.0  # a diverged epoch's selection score: below every accuracy, never the best


def divergence_message(epoch: int, step: int) -> str:
    return f"non-finite loss at epoch {epoch}, step {step}"


def diverged_in(history: list[dict[str, float]]) -> str:
    """The divergence recorded in a phase's history, or "" (a history is what checkpoints keep)."""
    bad = [m for m in history if m.get("nonfinite_step", -1) >= 0]
    return divergence_message(int(bad[0]["epoch"]), int(bad[0]["nonfinite_step"])) if bad else ""


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


def _strip_ddp(net: nn.Module) -> nn.Module:
    """The module inside DDP, keeping any compile wrapper: forward passes that need no
    gradient sync (evaluation) skip DDP's per-forward buffer broadcast."""
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(t: Tensor) -> Tensor:
    """Sum `t` over ranks when torch.distributed is up, so every rank sees the global value."""
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _all_reduce_min(t: Tensor) -> Tensor:
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(x: Tensor, y: Tensor, device: torch.device, cfg: PhaseConfig) -> tuple[Tensor, Tensor]:
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
        x, y = _to_device(x, y, device, cfg)
        for i, (part, meta) in enumerate(_l2w_parts(x, y, step, l2w)):
            if meta is not None:
                with _autocast(device, cfg.bf16):
                    l2w.meta_step(unwrap(net), optimizer,  # type: ignore[union-attr]
                                  lambda ls, w: phase_objective(per_sample_weighted(ls, w), phase, weights,
                                                                cfg.loss_reduction),
                                  method.losses, sample_loss, part, meta)
            xs, ys = part
            with _autocast(device, cfg.bf16):
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
    first_bad = _all_reduce_min(nonfinite).item()
    totals = _all_reduce_sum(sums).tolist()
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
    model = _strip_ddp(net)
    model.eval()
    with torch.inference_mode():
        sums: Tensor | None = None  # [correct per exit ..., loss sum per exit ..., samples]
        for x, y in loader:
            x, y = _to_device(x, y, device, cfg)
            with _autocast(device, cfg.bf16):
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
        totals = _all_reduce_sum(sums).tolist()
    num_exits, count = (len(totals) - 1) // 2, totals[-1]
    return {
        "accuracy": [c / count for c in totals[:num_exits]],
        "loss": [s / count for s in totals[num_exits:-1]],
        "num_samples": int(count),
    }


def _monitored(
    phase: Phase, accuracies: list[float], selection: Selection, score_fn: ScoreFn | None
) -> tuple[list[float], float]:
    """The accuracies early stopping watches, and the selection score, for `phase`.

    P1 trains the final exit only: ICs are untrained and their accuracies noise, so only the
    final exit counts. P3 freezes the final head, so its constant accuracy is left out and the
    score is the ICs' mean. P2 watches every exit and scores by `selection`. A `score_fn`
    replaces the P2/P3 score (a search's own metric, so the state kept is the one it ranks).
    """
    if phase == "P1":
        return accuracies[-1:], accuracies[-1]
    watched = accuracies[:-1] if phase == "P3" else accuracies
    if score_fn is not None:
        return watched, score_fn(accuracies)
    if phase == "P3":
        return watched, sum(watched) / len(watched)
    score = accuracies[-1] if selection == "final" else sum(accuracies) / len(accuracies)
    return watched, score


def _cpu_copy(obj: Any) -> Any:
    """Deep copy with every tensor cloned to CPU: a snapshot later training cannot mutate."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copied = type(obj)((k, _cpu_copy(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # module versions that load_state_dict consults
            copied._metadata = copy.deepcopy(obj._metadata)  # type: ignore[attr-defined]
        return copied
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The torch generators that decide a loader's shuffling and worker seeds, deduplicated."""
    found: list[torch.Generator] = []
    for owner in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def _rng_state(loader: Any, device: torch.device) -> dict[str, Any]:
    """RNG states that the next epoch draws from (shuffling, augmentation, dropout)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "loader": [g.get_state() for g in _loader_generators(loader)]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], loader: Any, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    gens = _loader_generators(loader)
    if len(gens) != len(state["loader"]):
        logger.warning("resume: loader has %d generators, state has %d; shuffling will differ",
                       len(gens), len(state["loader"]))
    else:
        for gen, gen_state in zip(gens, state["loader"]):
            gen.set_state(gen_state)
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _set_epoch(loader: Any, epoch: int) -> None:
    """DistributedSampler (and friends) reshuffle per epoch only when told the epoch."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


@dataclass
class _Progress:
    """What carries from epoch to epoch (and through a resume): early stopping, the best state, history."""

    stopper: EarlyStopping
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, Tensor] | None = None
    start_epoch: int = 0


def fit_phase(
    net: nn.Module,
    phase: Phase,
    cfg: PhaseConfig,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    val_loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    score_fn: ScoreFn | None = None,
    on_step: StepHook | None = None,
) -> PhaseResult:
    """Train `net` for one phase with early stopping; the net ends holding its best state.

    `net` may be DDP-wrapped, provided `prepare_phase(net, phase)` ran before the wrap.
    After every epoch `on_epoch` gets an `EpochReport` whose `state` (CPU tensors and plain
    values; loads with `torch.load(weights_only=True)`) has the keys phase, epoch, config,
    net (unwrapped state_dict), optimizer, scheduler, early_stopping, best_state_dict,
    history, rng. Passing it back as `resume` continues at epoch + 1 exactly where the
    uninterrupted run would be (same optimizer, schedule, early stopping and RNG states).
    `score_fn`, if given, scores P2 and P3 epochs from every exit's validation accuracy in
    place of `cfg.selection` (P1 always scores its final exit). `on_step(epoch, step, steps)`
    runs after every optimizer step.
    """
    device = torch.device(device)
    model, params = _setup(net, phase, cfg, device)
    optimizer = build_optimizer(params, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=len(train_loader))  # type: ignore[arg-type]
    progress = _Progress(EarlyStopping(cfg.patience))
    l2w = _make_l2w(cfg, phase, model.num_exits, device)
    if resume is not None:
        progress = _resume(resume, phase, cfg, model, optimizer, scheduler, train_loader, device, l2w)

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
        score, improved = _select(progress, model, phase, epoch, val["accuracy"], train["nonfinite_step"], cfg, score_fn)
        metrics = _epoch_metrics(epoch, train, val, score, lr, time.perf_counter() - start)
        progress.history.append(metrics)
        logger.info("%s epoch %d: train_loss %.4f val_acc %s score %.4f%s", phase, epoch, train["train_loss"],
                    " ".join(f"{a:.3f}" for a in val["accuracy"]), score, " (best)" if improved else "")
        if progress.stopper.stop or epoch == cfg.max_epochs - 1:  # the phase's last epoch
            _finish_method(model, phase, progress, train_loader, device, cfg)
        if on_epoch is not None:
            state = _snapshot(phase, epoch, cfg, model, optimizer, scheduler, progress, train_loader, device, l2w)
            on_epoch(EpochReport(epoch=epoch, metrics=dict(metrics), state=state, improved=improved, stop=progress.stopper.stop))

    if progress.best_state is None:
        raise RuntimeError(f"{phase}: no epoch ran (start epoch {progress.start_epoch}, max_epochs {cfg.max_epochs})")
    model.load_state_dict(progress.best_state)
    history, stopper = progress.history, progress.stopper
    best_val = next((m for m in history if int(m["epoch"]) == stopper.best_epoch), {})
    return PhaseResult(
        diverged=diverged_in(history),
        best_state_dict=progress.best_state,
        best_epoch=stopper.best_epoch,
        epochs_run=len(history),
        stopped_early=stopper.stop,
        history=history,
        best_val={k: v for k, v in best_val.items() if k.startswith("val_")},
    )


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


def _resume(resume: dict[str, Any], phase: Phase, cfg: PhaseConfig, model: nn.Module, optimizer: Any, scheduler: Any,
            train_loader: Any, device: torch.device, l2w: L2W | None = None) -> _Progress:
    """Load a state `on_epoch` reported into the net, optimizer, schedule and RNGs; continue after its epoch."""
    if resume["phase"] != phase:
        raise ValueError(f"resume state is from phase {resume['phase']}, not {phase}")
    if resume["config"] != cfg.to_dict():
        logger.warning("resuming %s with a changed config: %s -> %s", phase, resume["config"], cfg.to_dict())
    model.load_state_dict(resume["net"])
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    stopper = EarlyStopping(cfg.patience)
    stopper.load_state_dict(resume["early_stopping"])
    if l2w is not None:
        if "l2w" not in resume:
            raise ValueError(f"resume state of {phase} holds no L2W weight predictor (trained with another loss_weighting?)")
        l2w.load_state_dict(resume["l2w"])
    _set_rng_state(resume["rng"], train_loader, device)
    logger.info("%s: resumed after epoch %d", phase, int(resume["epoch"]))
    return _Progress(stopper, [dict(m) for m in resume["history"]], resume["best_state_dict"], int(resume["epoch"]) + 1)


def _finish_method(model: nn.Module, phase: Phase, progress: _Progress, train_loader: Any, device: torch.device,
                   cfg: PhaseConfig) -> None:
    """The method's own step once a phase that trained the ICs (P2, P3) ends (ZTW fits its ensemble):
    on the best state, which then holds its result. It runs before the last epoch's report, so a
    kill during it costs that epoch, and a phase resumed after it does not run it again."""
    method = model.method
    if not method.finishes or phase == "P1" or progress.best_state is None or diverged_in(progress.history):
        return
    model.load_state_dict(progress.best_state)
    batches = (_to_device(x, y, device, cfg) for x, y in train_loader)
    with _autocast(device, cfg.bf16):
        line = method.finish(model, batches, _all_reduce_sum)
    progress.best_state = _cpu_copy(model.state_dict())
    logger.info("%s: %s", phase, line)


def _select(progress: _Progress, model: nn.Module, phase: Phase, epoch: int, accuracies: list[float], nonfinite_step: int,
            cfg: PhaseConfig, score_fn: ScoreFn | None) -> tuple[float, bool]:
    """Score the epoch, update early stopping and keep the best state; a diverged epoch stops the phase."""
    watched, score = _monitored(phase, accuracies, cfg.selection, score_fn)
    if nonfinite_step >= 0:  # the weights are garbage from here on: stop, as if patience had run out
        progress.stopper.epochs_without_improvement = progress.stopper.patience
        logger.warning("%s diverged: %s", phase, divergence_message(epoch, nonfinite_step))
        if progress.best_state is None:  # nothing healthy to keep: the phase result is marked diverged
            progress.best_state = _cpu_copy(model.state_dict())
        return DIVERGED_SCORE, False
    improved = progress.stopper.update(epoch, watched, score)
    if improved:
        progress.best_state = _cpu_copy(model.state_dict())
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


def _snapshot(phase: Phase, epoch: int, cfg: PhaseConfig, model: nn.Module, optimizer: Any, scheduler: Any,
              progress: _Progress, train_loader: Any, device: torch.device, l2w: L2W | None = None) -> dict[str, Any]:
    """The resumable state after `epoch` (CPU tensors and plain values)."""
    return {
        "phase": phase,
        "epoch": epoch,
        "config": cfg.to_dict(),
        "net": _cpu_copy(model.state_dict()),
        "optimizer": _cpu_copy(optimizer.state_dict()),
        "scheduler": _cpu_copy(scheduler.state_dict()),
        "early_stopping": progress.stopper.state_dict(),
        "best_state_dict": progress.best_state,  # never mutated in place: safe to share
        "history": [dict(m) for m in progress.history],
        "rng": _rng_state(train_loader, device),
        **({"l2w": _cpu_copy(l2w.state_dict())} if l2w is not None else {}),
    }
