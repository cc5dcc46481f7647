"""The train kind's Ray side: one training phase, on Ray Train V2 (TorchTrainer, DDP via prepare_model) or,
with one worker, in the stage's own process.

Only this adapter touches Ray: the loop itself is `stages.core.loop.fit_phase`, which runs without
Ray. `train_loop_per_worker` is one attempt at a phase on one worker, whatever hosts it: a `TrainSession`
(rank 0 writes a checkpoint every epoch, the full resumable state; every rank calls
`ray.train.report`, a barrier; a re-run with the same (storage_path, name) resumes from
`ray.train.get_checkpoint()`) or an `InProcessSession` (one worker in the stage's task or a Tune
trial, its checkpoints kept by `stages.checkpoints` under the same name, where Train's would be).
Ray Train starts a controller, a worker, a synchronization actor and a placement-group cleaner per
fit, each a fresh process importing Ray Train (~10-15 s of CPU: bench/fit_processes.py), which a
phase of one worker does not need. The runner names runs by cache key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray.train
import torch
from ray import cloudpickle
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_data_loader, prepare_model
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from exitflow.pipeline.progress_events import publish_epoch
from exitflow.pipeline.relay import relayed_progress
from exitflow.pipeline.stage import StageContext
from exitflow.stages.checkpoints import PROGRESS_FILE, STATE_FILE, CheckpointStore, local_copy, read_state, write_checkpoint
from exitflow.stages.core import faults
from exitflow.stages.core.data import load_splits, make_loader, train_collate
from exitflow.stages.core.loop import EpochReport, PhaseConfig, exit_fractions, fit_phase, seed_everything
from exitflow.stages.core.nets import create_net
from exitflow.stages.core.nets.start import load_start
from exitflow.stages.core.phase_state import PhaseResult
from exitflow.stages.core.regimes import prepare_phase
from exitflow.stages.core.log_lines import brief
from exitflow.stages.core.state_hash import state_dict_hash
from exitflow.stages.phase_kind import PhaseJob

log = logging.getLogger(__name__)

def ran_on(device: torch.device, world: int, cfg: PhaseConfig) -> str:
    """Where a phase's epochs run, read on the worker, not inferred from the spec: a study that asked
    for GPUs but trained on CPUs, or without bf16, shows it in its cost table."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "one process"
    modes = [m for m, on in (("bf16", cfg.bf16), ("channels_last", cfg.channels_last)) if on and device.type == "cuda"]
    return f"{world} x {name} ({', '.join([backend, *modes])})"


def worker_nodes(world: int) -> list[str]:
    """The Ray node ids of a phase's workers, sorted: on a cluster, which machines trained it.
    Every rank must call it (a collective when there is more than one)."""
    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not torch.distributed.is_initialized():
        return [node]
    nodes: list[Any] = [None] * world
    torch.distributed.all_gather_object(nodes, node)
    return sorted(set(nodes))


def _quiet_train_reports() -> None:
    """Ray Train logs every report at INFO under a logger named by its file path (not under
    `ray.train`, so RunConfig's LoggingConfig misses it): one line per epoch we already print."""
    with contextlib.suppress(ImportError):
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _resumable(label: str, load: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """The last checkpoint's state, or None (with a warning) to start the phase afresh when it cannot be read."""
    try:
        return load()
    except Exception as e:  # noqa: BLE001 - a checkpoint we cannot read must not leave the phase stuck
        log.warning("%s: cannot resume from its last checkpoint (%s); starting the phase afresh", label, brief(e))
        return None


class TrainSession:
    """A phase's worker under Ray Train: its rank, device, DDP, and Train's checkpoints and reports."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare(self, net: torch.nn.Module, train_loader: Any, val_loader: Any) -> tuple[Any, Any, Any]:
        if self.world > 1 or self.device.type == "cuda":
            net = prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": False} if self.world > 1 else None)
            train_loader = prepare_data_loader(train_loader)
            val_loader = prepare_data_loader(val_loader)
        return net, train_loader, val_loader

    def resume_state(self, label: str) -> dict[str, Any] | None:
        """The state of the last registered checkpoint, or None to start afresh (none, or unreadable)."""
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None

        def load() -> dict[str, Any]:
            with ckpt.as_directory() as d:
                return read_state(Path(d) / STATE_FILE)

        return _resumable(label, load)

    def report(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Report one epoch; rank 0 attaches the resumable state (every rank must call: it is a barrier)."""
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            write_checkpoint(state, Path(d))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


class InProcessSession:
    """A one-worker phase trained in the process that runs its stage (the node's Ray task) or its
    trial (a Tune trial's actor): no Ray Train controller, worker group or synchronization actor.
    It keeps its checkpoints itself (`stages.checkpoints`), where Train would, and a trial reports
    each epoch to Tune with its checkpoint's path, as Train's TuneReportCallback does."""

    rank, world = 0, 1

    def __init__(self, store: CheckpointStore, device: torch.device, to_tune: bool = False) -> None:
        self.store, self.device, self.to_tune = store, device, to_tune

    def prepare(self, net: torch.nn.Module, train_loader: Any, val_loader: Any) -> tuple[Any, Any, Any]:
        return net, train_loader, val_loader  # fit_phase places the net; batches move as they are read

    def resume_state(self, label: str) -> dict[str, Any] | None:
        path = self.store.latest()
        return None if path is None else _resumable(label, lambda: self.store.load(path))

    def report(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        path = self.store.save(state)
        if self.to_tune:
            from ray import tune

            tune.report({**metrics, CHECKPOINT_PATH_KEY: path})


WorkerSession = TrainSession | InProcessSession


def sealed(job: PhaseJob) -> dict[str, bytes]:
    """The job as Train's `train_loop_config`: pickled bytes. Train hands that config to its
    controller too, which would otherwise unpickle the job and so import exitflow, PyTorch and
    MLflow in a process that only schedules (~5 s of CPU per fit: bench/fit_processes.py)."""
    return {"job": cloudpickle.dumps(job)}


def train_worker(config: dict[str, bytes]) -> None:
    """Ray Train's loop function: the sealed job, fitted on this worker."""
    relayed_progress("exitflow.stages.core.loop")  # the loop's epoch line lacks the node's label: ours (train_loop_per_worker) has it
    _quiet_train_reports()
    train_loop_per_worker(cloudpickle.loads(config["job"]), TrainSession())


def train_loop_per_worker(job: PhaseJob, session: WorkerSession) -> None:
    """One attempt at a phase: data -> net -> (input model) -> phase setup -> DDP -> resume -> fit."""
    torch.set_num_threads(job.torch_threads)
    rank, world = session.rank, session.world
    node_cfg, phase, seed = job.config, job.config.phase, job.config.seed
    seed_everything(seed)
    cfg = replace(node_cfg.train, batch_size=max(1, node_cfg.train.batch_size // world))  # the spec's batch size is global
    data = node_cfg.data
    splits = load_splits(data, seed)
    train_loader = make_loader(splits.train, cfg.batch_size, shuffle=True, seed=seed, num_workers=data.num_workers,
                               drop_last=len(splits.train) > cfg.batch_size * world,
                               collate_fn=train_collate(data, splits.info.num_classes))
    val_loader = make_loader(splits.val, cfg.batch_size, shuffle=False, seed=seed, num_workers=data.num_workers)

    net = create_net(job.net)
    flops_frac = exit_fractions(net)  # what selection `auc` integrates over; the progress lines' exit count
    if job.init_from is not None:
        net.load_state_dict(job.init_from())
    start = None
    if job.start is not None:  # the hash of what the net holds now: the phase's proven starting point
        source = node_cfg.start.source if node_cfg.start is not None else ""
        start = {"source": source, "sha256": state_dict_hash(load_start(net, job.start()))}
        if rank == 0:
            log.info("%s: backbone starts from %s (sha256 %s)", job.label or phase, source, start["sha256"][:12])
    prepare_phase(net, phase)  # before DDP: DDP must see only the trainable parameters
    net, train_loader, val_loader = session.prepare(net, train_loader, val_loader)
    device = session.device
    where = ran_on(device, world, cfg)
    nodes = worker_nodes(world)
    label = job.label or phase
    resume = session.resume_state(label)
    if resume is not None and rank == 0:
        log.info("%s: resuming after epoch %d", label, resume["epoch"])

    # resumed_at / early_stop of every epoch so far (fit_phase's history holds only its own metrics)
    extras: dict[int, dict[str, float]] = {
        int(m["epoch"]): {k: m[k] for k in ("resumed_at", "early_stop") if k in m}
        for m in (resume or {}).get("history", [])
    }
    reported = False

    def on_step(epoch: int, step: int, steps: int) -> None:
        if step == steps // 2 and faults.hit(job.fault_plan, "train.mid_epoch", **job.fault_context(epoch)):
            faults.make_nonfinite(net)  # action=nonfinite: the next step's loss is NaN

    def on_epoch(report: EpochReport) -> None:
        nonlocal reported
        # before reporting: this epoch's work is lost, as in a crash mid-epoch
        faults.hit(job.fault_plan, "train.epoch_end", **job.fault_context(report.epoch))
        extra = {
            "resumed_at": float(resume["epoch"] + 1) if resume is not None else -1.0,
            "early_stop": float(report.stop),  # patience ran out: this is the phase's last epoch
        }
        extras[report.epoch] = extra
        for m in report.state["history"]:  # kept in the checkpoint, so a resumed run keeps them
            m.update(extras.get(int(m["epoch"]), {}))
        if start is not None:
            report.state["start"] = start
        report.state["ran_on"] = where
        report.state["ray_nodes"] = nodes
        metrics = {**report.metrics, **extra}
        if rank == 0:
            publish_epoch(job.label, job.trial, cfg.lr, report.epoch, cfg.max_epochs, metrics, len(flops_frac))
        if rank == 0 and job.metrics_sink is not None:
            job.metrics_sink(report.epoch, metrics)
        session.report(report.state, metrics)
        reported = True
        if report.stop:
            faults.hit(job.fault_plan, "train.stopped", **job.fault_context(report.epoch))

    fit_phase(net, phase, cfg, train_loader, val_loader, device, resume=resume, on_epoch=on_epoch, on_step=on_step,
              flops_frac=flops_frac)
    if not reported and resume is not None:
        # Resumed at (or past) its stopping point: nothing was left to train. Report the recorded
        # final state again, so this attempt ends with a result like any other (a Tune trial
        # needs one); its epochs are logged already and are not logged twice.
        if rank == 0:
            log.info("%s: already complete after epoch %d; keeping its recorded best state", label, resume["epoch"])
        session.report(resume, {**resume["history"][-1]})


def scaling_config(num_workers: int, use_gpu: bool, cpus_per_worker: float, gpus_per_worker: float) -> ScalingConfig:
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def scaling(ctx: StageContext) -> ScalingConfig:
    """A phase's Train workers, as the study's resources ask for them."""
    s = ctx.settings
    return scaling_config(s.num_workers, s.use_gpu, s.cpus_per_worker, s.gpus_per_worker)


class PhaseTrainer(TorchTrainer):
    """A TorchTrainer without Ray Data's part: a phase reads its data itself, and Train would
    otherwise start a DatasetManager actor per fit for no datasets: a process importing Ray Train,
    ~4 s of CPU (-7.6% of a small study's CPU without it: bench/fit_processes.py)."""

    def _create_default_callbacks(self) -> list[Any]:
        from ray.train.v2._internal.callbacks import DatasetsCallback

        callbacks = super()._create_default_callbacks()
        if self.datasets:  # none here; kept if a caller ever passes some
            return callbacks
        return [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]


def build_trainer(
    job: PhaseJob,
    scaling: ScalingConfig,
    name: str,
    storage_path: str,
    max_failures: int,
    callbacks: list[Any] | None = None,
) -> TorchTrainer:
    """A TorchTrainer for one phase; `name` is deterministic (cache key) so a re-run resumes."""
    return PhaseTrainer(
        train_worker,
        train_loop_config=sealed(job),
        scaling_config=scaling,
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures),
            # Train's INFO lines (every report, every checkpoint) would bury the epoch progress
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )


def outcome_from_checkpoint(path: str | Path) -> PhaseResult:
    """The phase's result, read from a checkpoint directory written by `train_worker`."""
    return PhaseResult.from_state(read_state(Path(path) / STATE_FILE))


def read_outcome(path: str, storage_path: str) -> PhaseResult:
    """`outcome_from_checkpoint` of a checkpoint in storage (`path` on the storage's filesystem)."""
    with local_copy(path, storage_path) as d:
        return outcome_from_checkpoint(d)


def progress_from_checkpoint(path: str | Path) -> PhaseResult:
    """The same as `outcome_from_checkpoint` without the model (`best_state_dict` empty): cheap for every trial."""
    return PhaseResult.from_state(json.loads((Path(path) / PROGRESS_FILE).read_text()))


def phase_device(use_gpu: bool) -> torch.device:
    """Where a one-worker phase trains in its own process: the GPU Ray gave it, else the CPU."""
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


def fit_in_this_process(job: PhaseJob, store: CheckpointStore, device: torch.device, max_failures: int,
                   to_tune: bool = False) -> None:
    """Fit a one-worker phase in this process. An attempt that raises resumes from its last
    checkpoint, `max_failures` times, as Ray Train restarts a failed worker group; the death of
    the process itself is the death of its Ray task or Tune trial, retried by Ray or Tune."""
    logging.getLogger("exitflow.stages.core.loop").setLevel(logging.WARNING)  # the labelled epoch line is train_loop_per_worker's
    session = InProcessSession(store, device, to_tune)
    for attempt in range(max_failures + 1):
        try:
            train_loop_per_worker(job, session)
            return
        except Exception as e:  # noqa: BLE001 - SystemExit (Tune stopping a trial) passes through
            if attempt == max_failures:
                raise
            log.warning("%s: training failed (%s); resuming from its last checkpoint (%d of %d restarts)",
                        job.label or job.config.phase, brief(e), attempt + 1, max_failures)


def fit_with_torch_trainer(job: PhaseJob, scaling: ScalingConfig, name: str, storage_path: str, max_failures: int,
              in_process: bool = False) -> PhaseResult:
    """Fit one phase with one learning rate: under Ray Train (which raises TrainingFailedError on
    failure), or `in_process` (one worker: in this process, with its checkpoints in the same place)."""
    if in_process:
        store = CheckpointStore(storage_path, name)
        fit_in_this_process(job, store, phase_device(bool(scaling.use_gpu)), max_failures)
        path = store.latest()
        if path is None:
            raise RuntimeError(f"phase {job.config.phase} ({name}) finished without a checkpoint")
        return read_outcome(path, storage_path)
    result = build_trainer(job, scaling, name, storage_path, max_failures).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"phase {job.config.phase} ({name}) finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return outcome_from_checkpoint(d)
