"""What the train and tune kinds share: a phase's job on the worker, its outcome, and the outcome as a
StageResult; `PhaseStage`, their common declarations. Imports no Ray (the kinds' `run` reaches Ray
Train and Tune through `stages.ray_train` and `stages.ray_tune`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from pipeline.dag import Node
from pipeline.resolve import sized_net
from pipeline.stage import (CHECKPOINT, PHASE, Checkpoint, File, RunSettings, Stage, StageContext, StageFailed, StageInput,
                            StageResult, Table, TableKind)
from stages.core import faults
from stages.core.data import DataSpec, dataset_info
from stages.core.loop import PhaseConfig
from stages.core.nets import NetSpec
from stages.core.nets.start import StartWeights, start_reader
from stages.phase_plan import GradientDominanceAnalysis, PhaseNodeConfig

DIVERGED_TAG = "exitflow.diverged"  # on a phase that diverged (FAILED) or a search with diverged trials
RAY_NODES_TAG = "exitflow.ray_nodes"  # on a phase: the Ray node ids of the workers that trained it, comma-separated
TRIAL_RESOURCES = {"cpu": 0.01}  # a search trial's own process under Ray Train: non-empty (an empty request is refused), tiny

# data.download only fetches what is missing; a phase never reads the test split; data.root is where
# the files are, data.identity (keyed) what they hold; start: its identity is keyed, not its source
PHASE_UNKEYED = (("data", "download"), ("data", "test_subset"), ("data", "root"), ("start", "source"))
HISTORY = TableKind("history", "history.parquet", ("epoch", "train_loss", "val_acc_mean", "val_acc_final"))
GRADIENT_DOMINANCE = TableKind("gradient_dominance", "gradient_dominance.parquet", ("epoch", "exit", "cosine"))
InitFrom = Callable[[], dict[str, torch.Tensor]]  # loads the input model's state (on the worker)
MetricsSink = Callable[[int, dict[str, float]], None]  # logs one epoch's metrics (rank 0 only)


@dataclass(frozen=True)
class PhaseJob:
    """Everything a Train worker needs for one phase: the node config's own objects plus two picklable callables."""

    phase: str  # P1 | P2 | P3
    seed: int
    data: DataSpec
    net: NetSpec  # the node's NetChoice, sized for the data
    train: PhaseConfig  # batch_size is global; lr is None until a search's trial sets it
    selection: str = "mean"  # score reported to Tune: mean | final | auc (P1: always final)
    init_from: InitFrom | None = None  # the input model (P3 and mixed P2 start from P1)
    start: InitFrom | None = None  # or the backbone a from-scratch phase starts from (net.init)
    start_source: str = ""  # where `start` reads from, for the record
    metrics_sink: MetricsSink | None = None
    torch_threads: int = 1
    fault_plan: faults.Plan = ()
    label: str = ""  # the node id, for progress lines
    trial: str = ""  # the trial's name when this phase is one trial of a search

    def fault_context(self, epoch: int) -> dict[str, Any]:
        """What a fault hook in this phase may filter on."""
        return {"phase": self.phase, "lr": self.train.lr, "epoch": epoch, "search": bool(self.trial),
                "node": self.label}

    def with_lr(self, lr: float) -> "PhaseJob":
        return replace(self, train=replace(self.train, lr=float(lr)))


@dataclass
class PhaseOutcome:
    """What a phase produced, read back from its last checkpoint."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    best_val: dict[str, float] = field(default_factory=dict)
    resumed_at: int | None = None  # first epoch of this attempt, when it resumed from a checkpoint
    diverged: str = ""  # "non-finite loss at epoch E, step S" when the phase stopped on one
    start: dict[str, str] | None = None  # net.init's source and the sha256 of the backbone the phase started from
    ran_on: str = ""  # where the epochs ran, as the workers saw it (`ran_on`); "" in checkpoints older than the record
    ray_nodes: list[str] = field(default_factory=list)  # the Ray node ids of the workers that trained it (`worker_nodes`)


class PhaseDiverged(StageFailed):
    """A fixed-lr phase's loss became non-finite: the phase fails, and is never cached."""


def phase_job(node: Node, inputs: list[StageInput], ctx: StageContext) -> tuple[PhaseJob, NetSpec]:
    """The Train worker's job for a phase node (P3 and mixed P2 start from their input model)."""
    cfg: PhaseNodeConfig = node.config
    ns = sized_net(cfg.net, dataset_info(cfg.data))
    job = PhaseJob(
        phase=cfg.phase,
        seed=cfg.seed,
        data=cfg.data,
        net=ns,
        train=cfg.train,
        selection=cfg.selection,
        init_from=inputs[0].checkpoint_source() if inputs else None,
        start=_start_loader(cfg.start, ctx),
        start_source=cfg.start.source if cfg.start is not None else "",
        metrics_sink=ctx.metrics_sink(),
        torch_threads=ctx.settings.threads,
        fault_plan=ctx.fault_plan,
        label=node.id,
    )
    return job, ns


def _start_loader(start: StartWeights | None, ctx: StageContext) -> Any:
    return None if start is None else start_reader(start.source, ctx.run_checkpoint)


def run_name(node: Node) -> str:
    """The Ray Train / Tune run name: the cache key, so a re-run of the same node resumes it."""
    return f"{node.key}-{node.config.phase}"


def phase_params(node: Node) -> dict[str, str]:
    return _flat(dataclasses.asdict(node.config))


def phase_cost(phase: str, settings: RunSettings, epochs: int, train_seconds: float, wall_seconds: float,
               resumed: bool, ran_on: str = "") -> dict[str, Any]:
    """What training a phase node cost (a search: all its trials), for the report's cost table.

    train_seconds sums the epochs' own time; device-hours are that times the devices the phase
    held (its workers' GPUs, else their CPUs); wall_seconds is the stage's run, Ray's start-up
    included (a resumed phase: since its resume); ran_on is where the workers found themselves
    (stages.ray_train.ran_on), "" when unknown."""
    group = settings.worker_group()
    device, count = ("GPU", group.num_gpus) if settings.use_gpu else ("CPU", group.num_cpus)
    return {"phase": phase, "epochs": epochs, "train_seconds": round(train_seconds, 3), "wall_seconds": round(wall_seconds, 3),
            "device": device, "device_hours": train_seconds * count / 3600, "resumed": resumed, "ran_on": ran_on}


def epoch_seconds(history: list[dict[str, float]]) -> float:
    return float(sum(m.get("epoch_time", 0.0) for m in history))


def phase_result(node: Node, inputs: list[StageInput], job: PhaseJob, ns: NetSpec, outcome: PhaseOutcome, lr: float,
                 diverged: dict[str, list[str]] | None = None, workdir: Path | None = None,
                 cost: dict[str, Any] | None = None) -> StageResult:
    """The phase's best model, its history and its summary: the lrs chosen so far (lineage), any
    diverged, and what each phase so far cost to train."""
    phase = job.phase
    lineage = {**(inputs[0].summary.get("lrs", {}) if inputs else {}), phase: lr}
    all_diverged = {**(inputs[0].summary.get("diverged", {}) if inputs else {}), **(diverged or {})}
    costs = {**(inputs[0].summary.get("costs", {}) if inputs else {}), **({node.id: cost} if cost else {})}
    artifacts: list[Any] = [Checkpoint(outcome.best_state, {
        "net": ns.to_dict(), "data": job.data.to_dict(), "phase": phase, "seed": job.seed, "lr": lr,
        "best_epoch": outcome.best_epoch, "epochs_run": outcome.epochs_run, "best_val": outcome.best_val,
    })]
    if outcome.history:
        artifacts.append(Table(HISTORY.name, pa.Table.from_pylist(_history_rows(outcome.history))))
    dominance = [{"epoch": int(m["epoch"]), "exit": int(k.removeprefix("grad_cos_")), "cosine": float(v)}
                 for m in outcome.history for k, v in m.items() if k.startswith("grad_cos_")]
    if dominance and workdir is not None:  # measured during P2 (analyses.gradient_dominance)
        from stages.core.analysis.gradient_dominance import plot_dominance

        artifacts.append(Table(GRADIENT_DOMINANCE.name, pa.Table.from_pylist(dominance)))
        artifacts.append(File(plot_dominance(dominance, workdir / "gradient_dominance.png", f"{node.id}: gradient dominance")))
    return StageResult(
        artifacts=artifacts,
        params={"chosen_lr": str(lr), **({"start.sha256": outcome.start["sha256"]} if outcome.start else {})},
        metrics={f"best_{k}": float(v) for k, v in outcome.best_val.items()}
        | {"epochs_run": outcome.epochs_run, "best_epoch": outcome.best_epoch},
        # which machines trained it (a resumed phase: those of its last attempt)
        tags={RAY_NODES_TAG: ",".join(outcome.ray_nodes)} if outcome.ray_nodes else {},
        summary={"phase": phase, "lr": lr, "lrs": lineage, "diverged": all_diverged, "epochs": outcome.epochs_run,
                 "best_epoch": outcome.best_epoch, "stopped_early": outcome.stopped_early,
                 "resumed_at": outcome.resumed_at, "best_val": outcome.best_val["val_score"], "start": outcome.start,
                 "costs": costs},
    )


def describe_phase(s: dict[str, Any]) -> str:
    return f" lr={s.get('lr', float('nan')):.3g} val={s.get('best_val', float('nan')):.4f} epochs={s.get('epochs')}"


def _history_rows(history: list[dict[str, float]]) -> list[dict[str, float]]:
    keys = sorted({k for m in history for k in m})
    return [{k: float(m.get(k, float("nan"))) for k in keys} for m in history]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]
    return out


class PhaseStage(Stage):
    """The declarations the train and tune kinds share: a phase of a regime (`stages.phase_plan` plans
    them), starting from its input model when it has one, reading the data to train on."""

    role = PHASE
    reads = (CHECKPOINT,)  # the input model (P3 and mixed P2 start from P1), loaded on the worker
    unkeyed = PHASE_UNKEYED
    section = GradientDominanceAnalysis  # read while P2 trains
    data_context = "training"
    plan_order = 10  # first: every other kind reads the phases' models

    def params(self, node: Node) -> dict[str, str]:
        return phase_params(node)

    def describe(self, summary: dict[str, Any]) -> str:
        return describe_phase(summary)
