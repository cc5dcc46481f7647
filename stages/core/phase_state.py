"""A phase's resumable state and its result: the snapshot `fit_phase` hands `on_epoch` after every
epoch (net, optimizer, schedule, early stopping, best state, history, RNGs), resuming from one, and
`PhaseResult`, what a phase produced, read from that state (in the loop, or from a checkpoint)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from exitflow.stages.core.early_stopping import EarlyStopping
from exitflow.stages.core.l2w import L2W
from exitflow.stages.core.phase_config import PhaseConfig
from exitflow.stages.core.regimes import Phase
from exitflow.stages.core.selection import diverged_in

logger = logging.getLogger("exitflow.stages.core.loop")  # one logger for the loop's lines (launchers quieten it by name)


@dataclass
class PhaseResult:
    """What a phase produced: its best state, how it ended, its history, and where it ran (the
    launcher's record, kept in its state). `fit_phase` returns it; a checkpoint reads back as it."""

    best_state_dict: dict[str, Tensor]  # unwrapped net state (CPU) at the best epoch; {} when read without it
    best_epoch: int  # 0-based epoch of the best selection score
    epochs_run: int  # epochs trained in total, resumed ones included
    stopped_early: bool  # early stopping fired (False: max_epochs reached)
    history: list[dict[str, float]] = field(default_factory=list)  # metrics of every epoch
    best_val: dict[str, float] = field(default_factory=dict)  # val_* metrics of the best epoch
    diverged: str = ""  # why the phase stopped on a non-finite loss ("" when it did not)
    resumed_at: int | None = None  # first epoch of the first resumed attempt, as the launcher recorded it
    start: dict[str, str] | None = None  # net.init's source and the sha256 of the backbone the phase started from
    ran_on: str = ""  # where the epochs ran, as the workers saw it; "" when unrecorded
    nodes: list[str] = field(default_factory=list)  # the cluster nodes of the workers that trained it

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PhaseResult:
        """The result a phase's state records: a snapshot (`on_epoch`'s, a checkpoint's), or its progress
        record alone (history and early stopping: `best_state_dict` then empty)."""
        history, es = state["history"], state["early_stopping"]
        best_epoch = int(es["best_epoch"])
        best_val = next((m for m in history if int(m["epoch"]) == best_epoch), history[-1])
        resumed = [int(m["resumed_at"]) for m in history if m.get("resumed_at", -1) >= 0]
        return cls(
            best_state_dict=state.get("best_state_dict") or {},
            best_epoch=best_epoch,
            epochs_run=len(history),
            stopped_early=int(es["epochs_without_improvement"]) >= int(es["patience"]),
            history=list(history),
            best_val={k: v for k, v in best_val.items() if k.startswith("val_")},
            diverged=diverged_in(history),
            resumed_at=resumed[0] if resumed else None,
            start=state.get("start"),
            ran_on=state.get("ran_on", ""),
            nodes=list(state.get("ray_nodes", [])),  # as the Ray launcher records them (stages.ray_train)
        )


@dataclass
class Progress:
    """What carries from epoch to epoch (and through a resume): early stopping, the best state, history."""

    stopper: EarlyStopping
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, Tensor] | None = None
    start_epoch: int = 0


def cpu_copy(obj: Any) -> Any:
    """Deep copy with every tensor cloned to CPU: a snapshot later training cannot mutate."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copied = type(obj)((k, cpu_copy(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # module versions that load_state_dict consults
            copied._metadata = copy.deepcopy(obj._metadata)  # type: ignore[attr-defined]
        return copied
    if isinstance(obj, list | tuple):
        return type(obj)(cpu_copy(v) for v in obj)
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


def restore(state: dict[str, Any], phase: Phase, cfg: PhaseConfig, model: nn.Module, optimizer: Any, scheduler: Any,
            train_loader: Any, device: torch.device, l2w: L2W | None = None) -> Progress:
    """Load a state `on_epoch` reported into the net, optimizer, schedule and RNGs; continue after its epoch."""
    if state["phase"] != phase:
        raise ValueError(f"resume state is from phase {state['phase']}, not {phase}")
    if state["config"] != cfg.to_dict():
        logger.warning("resuming %s with a changed config: %s -> %s", phase, state["config"], cfg.to_dict())
    model.load_state_dict(state["net"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stopper = EarlyStopping(cfg.patience)
    stopper.load_state_dict(state["early_stopping"])
    if l2w is not None:
        if "l2w" not in state:
            raise ValueError(f"resume state of {phase} holds no L2W weight predictor (trained with another loss_weighting?)")
        l2w.load_state_dict(state["l2w"])
    _set_rng_state(state["rng"], train_loader, device)
    logger.info("%s: resumed after epoch %d", phase, int(state["epoch"]))
    return Progress(stopper, [dict(m) for m in state["history"]], state["best_state_dict"], int(state["epoch"]) + 1)


def snapshot(phase: Phase, epoch: int, cfg: PhaseConfig, model: nn.Module, optimizer: Any, scheduler: Any,
             progress: Progress, train_loader: Any, device: torch.device, l2w: L2W | None = None) -> dict[str, Any]:
    """The resumable state after `epoch` (CPU tensors and plain values)."""
    return {
        "phase": phase,
        "epoch": epoch,
        "config": cfg.to_dict(),
        "net": cpu_copy(model.state_dict()),
        "optimizer": cpu_copy(optimizer.state_dict()),
        "scheduler": cpu_copy(scheduler.state_dict()),
        "early_stopping": progress.stopper.state_dict(),
        "best_state_dict": progress.best_state,  # never mutated in place: safe to share
        "history": [dict(m) for m in progress.history],
        "rng": _rng_state(train_loader, device),
        **({"l2w": cpu_copy(l2w.state_dict())} if l2w is not None else {}),
    }
