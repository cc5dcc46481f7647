"""What the train and tune kinds share: a phase's job on the worker (the node's own config, carried),
its result as a StageResult (the model, its history, its lineage record); `PhaseStage`, their common
declarations. Imports no Ray (the kinds' `run` reaches Ray Train and Tune through `stages.ray_train`
and `stages.ray_tune`); a phase's result is the core's `PhaseResult`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from exitflow.pipeline.dag import Node
from exitflow.pipeline.resolve import sized_net
from exitflow.pipeline.stage import (CHECKPOINT, PHASE, Checkpoint, File, RunSettings, Stage, StageContext, StageFailed, StageInput,
                            StageResult, Table, TableKind)
from exitflow.stages.core import faults
from exitflow.stages.core.allowed import TIMM_PREFIX
from exitflow.stages.core.data import dataset_info
from exitflow.stages.core.nets import NetSpec
from exitflow.stages.core.nets.start import StartWeights, start_reader
from exitflow.stages.core.phase_state import PhaseResult
from exitflow.stages.phase_plan import GradientDominanceAnalysis, PhaseNodeConfig

DIVERGED_TAG = "exitflow.diverged"  # on a phase that diverged (FAILED) or a search with diverged trials
RAY_NODES_TAG = "exitflow.ray_nodes"  # on a phase: the Ray node ids of the workers that trained it, comma-separated
TRIAL_RESOURCES = {"cpu": 0.01}  # a search trial's own process under Ray Train: non-empty (an empty request is refused), tiny

# data.download only fetches what is missing; a phase never reads the test split; data.root is where
# the files are, data.identity (keyed) what they hold; start: its identity is keyed, not its source
PHASE_UNKEYED = (("data", "download"), ("data", "test_subset"), ("data", "root"), ("start", "source"))
HISTORY = TableKind("history", "history.parquet", ("epoch", "train_loss", "val_acc_mean", "val_acc_final"))
GRADIENT_DOMINANCE = TableKind("gradient_dominance", "gradient_dominance.parquet", ("epoch", "exit", "cosine"))
# A phase node's record in the lineage of every model trained from it: its learning rate (a search's
# choice), what it cost (`phase_cost`) and a search's diverged trials. One row; the report reads it
# from the phase nodes behind each evaluated model (`stages.report`).
LINEAGE_SCHEMA = pa.schema([("node", pa.string()), ("phase", pa.string()), ("lr", pa.float64()), ("epochs", pa.int64()),
                            ("train_seconds", pa.float64()), ("wall_seconds", pa.float64()), ("device", pa.string()),
                            ("device_hours", pa.float64()), ("resumed", pa.bool_()), ("ran_on", pa.string()),
                            ("diverged", pa.list_(pa.string()))])
LINEAGE = TableKind("lineage", "lineage.parquet", tuple(LINEAGE_SCHEMA.names))
InitFrom = Callable[[], dict[str, torch.Tensor]]  # loads the input model's state (on the worker)
MetricsSink = Callable[[int, dict[str, float]], None]  # logs one epoch's metrics (rank 0 only)


@dataclass(frozen=True)
class PhaseJob:
    """Everything a Train worker needs for one phase: the node's config itself (not a copy of its
    fields), its net sized for the data, and what the stage lends the worker (picklable callables)."""

    config: PhaseNodeConfig  # phase, seed, data, train (batch_size global; lr None until a trial sets it), start
    net: NetSpec  # config.net, sized for the data
    init_from: InitFrom | None = None  # the input model (P3 and mixed P2 start from P1)
    start: InitFrom | None = None  # or the backbone a from-scratch phase starts from (config.start: net.init)
    metrics_sink: MetricsSink | None = None
    torch_threads: int = 1
    fault_plan: faults.Plan = ()
    label: str = ""  # the node id, for progress lines
    trial: str = ""  # the trial's name when this phase is one trial of a search

    def fault_context(self, epoch: int) -> dict[str, Any]:
        """What a fault hook in this phase may filter on."""
        return {"phase": self.config.phase, "lr": self.config.train.lr, "epoch": epoch, "search": bool(self.trial),
                "node": self.label}


class PhaseDiverged(StageFailed):
    """A fixed-lr phase's loss became non-finite: the phase fails, and is never cached."""


def phase_job(node: Node, inputs: list[StageInput], ctx: StageContext) -> tuple[PhaseJob, NetSpec]:
    """The Train worker's job for a phase node (P3 and mixed P2 start from their input model)."""
    cfg: PhaseNodeConfig = node.config
    ns = sized_net(cfg.net, dataset_info(cfg.data))
    job = PhaseJob(
        config=cfg,
        net=ns,
        init_from=inputs[0].checkpoint_source() if inputs else None,
        start=_start_loader(cfg.start, ctx, ns.backbone.startswith(TIMM_PREFIX)),
        metrics_sink=ctx.metrics_sink(),
        torch_threads=ctx.settings.threads,
        fault_plan=ctx.fault_plan,
        label=node.id,
    )
    return job, ns


def _start_loader(start: StartWeights | None, ctx: StageContext, onto_timm: bool) -> Any:
    return None if start is None else start_reader(start.source, ctx.run_checkpoint, onto_timm)


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


def phase_result(node: Node, job: PhaseJob, ns: NetSpec, result: PhaseResult, lr: float, cost: dict[str, Any],
                 diverged: Sequence[str] = (), workdir: Path | None = None) -> StageResult:
    """The phase's best model, its history, its lineage record (its lr, its cost, a search's diverged
    trials: `LINEAGE`) and its summary."""
    cfg = job.config
    artifacts: list[Any] = [Checkpoint(result.best_state_dict, {
        "net": ns.to_dict(), "data": cfg.data.to_dict(), "phase": cfg.phase, "seed": cfg.seed, "lr": lr,
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "best_val": result.best_val,
    })]
    if result.history:
        artifacts.append(Table(HISTORY.name, pa.Table.from_pylist(_history_rows(result.history))))
    record = {"node": node.id, "lr": float(lr), **cost, "diverged": list(diverged)}
    artifacts.append(Table(LINEAGE.name, pa.Table.from_pylist([record], schema=LINEAGE_SCHEMA)))
    dominance = [{"epoch": int(m["epoch"]), "exit": int(k.removeprefix("grad_cos_")), "cosine": float(v)}
                 for m in result.history for k, v in m.items() if k.startswith("grad_cos_")]
    if dominance and workdir is not None:  # measured during P2 (analyses.gradient_dominance)
        from exitflow.stages.core.analysis.gradient_dominance import plot_dominance

        artifacts.append(Table(GRADIENT_DOMINANCE.name, pa.Table.from_pylist(dominance)))
        artifacts.append(File(plot_dominance(dominance, workdir / "gradient_dominance.png", f"{node.id}: gradient dominance")))
    return StageResult(
        artifacts=artifacts,
        params={"chosen_lr": str(lr), **({"start.sha256": result.start["sha256"]} if result.start else {})},
        metrics={f"best_{k}": float(v) for k, v in result.best_val.items()}
        | {"epochs_run": result.epochs_run, "best_epoch": result.best_epoch},
        # which machines trained it (a resumed phase: those of its last attempt)
        tags={RAY_NODES_TAG: ",".join(result.nodes)} if result.nodes else {},
        summary={"phase": cfg.phase, "lr": lr, "epochs": result.epochs_run, "best_epoch": result.best_epoch,
                 "stopped_early": result.stopped_early, "resumed_at": result.resumed_at,
                 "best_val": result.best_val["val_score"], "start": result.start},
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
