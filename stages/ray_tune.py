"""The tune kind's Ray side: a per-phase learning-rate search on Ray Tune.

Each trial is a Tune *function* that fits a full phase with early stopping: with one worker in
the trial's own process (`stages.ray_train.fit_in_this_process`), with several a TorchTrainer with
`TuneReportCallback`. Either way the trial sees every epoch's metrics and the path of its last
checkpoint (`CHECKPOINT_PATH_KEY`), kept in the trial's own folder of the storage, so a restored
search resumes a trial from it whatever Tune last recorded. The winner's checkpoint *is* the
phase's result: nothing is re-trained. An optional ASHA scheduler stops poor learning rates early.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import pyarrow.fs
from ray import tune
from ray.train import ScalingConfig
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from exitflow.pipeline.progress_events import SearchProgress
from exitflow.pipeline.relay import relayed_progress
from exitflow.pipeline.stage import TrialOutcome
from exitflow.stages.checkpoints import CheckpointStore, is_whole, local_copy, storage_fs, storage_location, whole_checkpoints
from exitflow.stages.core import faults
from exitflow.stages.core.nets.methods import get_method
from exitflow.stages.core.log_lines import brief
from exitflow.stages.core.phase_state import PhaseResult
from exitflow.stages.phase_kind import TRIAL_RESOURCES, PhaseJob, epoch_seconds
from exitflow.stages.phase_plan import SearchPlan
from exitflow.stages.ray_train import build_trainer, fit_in_this_process, phase_device, progress_from_checkpoint, read_outcome

log = logging.getLogger(__name__)

SCORE = "val_score"  # the metric trials are ranked by: each epoch's stages.core.selection.selection_score


def trial_resources(scaling: ScalingConfig, in_process: bool) -> dict[str, float]:
    """What a trial's own process reserves: tiny when Ray Train's workers do the training, else a worker's."""
    if not in_process:
        return TRIAL_RESOURCES
    per_worker = scaling.resources_per_worker or {"CPU": 1.0}
    return {k.lower(): float(v) for k, v in per_worker.items() if v}


class TrialLog(Protocol):
    """Where one trial logs its epochs, closed with the trial's final status (FINISHED or FAILED)."""

    def __call__(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self, status: str) -> None: ...


TrialLogFactory = Callable[[str, float], TrialLog]  # (trial name, lr) -> the trial's log


def param_space(plan: SearchPlan) -> dict[str, Any]:
    """The learning rates as Tune samples them: a grid search, or a log-uniform range."""
    if plan.grid is not None:
        return {"lr": tune.grid_search(list(plan.grid))}
    assert plan.loguniform is not None
    return {"lr": tune.loguniform(*plan.loguniform)}


@dataclass
class TrialRecord:
    trial: str
    lr: float
    best_val: float  # best selection score over the trial's epochs
    epochs: int  # epochs trained
    stopped_by: str  # "patience" (its own early stopping), "scheduler" (ASHA), "diverged" or "" (ran max_epochs)
    checkpoint_path: str  # its last checkpoint, which holds its best state
    diverged: str = ""  # "non-finite loss at epoch E, step S": ranked below every healthy trial
    train_seconds: float = 0.0  # its epochs' own time
    resumed: bool = False  # it continued from a checkpoint of an earlier run

    @property
    def stopped_early(self) -> bool:
        return bool(self.stopped_by)


def choose_trial(healthy: list[TrialRecord], finishes: bool) -> TrialRecord:
    """The trial whose model the search keeps: the best score, ties to the smaller (safer) lr.

    A method with a closing step of its own (`ExitMethod.finish`: ZTW fits its ensemble) runs it
    at its phase's last epoch, which a trial ASHA stopped never reached: its model would lack the
    step, so when `finishes` only the trials that ran to their end compete (ASHA keeps at least
    one running to the end, and it judged the others worse at a rung).
    """
    ended = [t for t in healthy if t.stopped_by != "scheduler"] if finishes else healthy
    return max(ended or healthy, key=lambda t: (t.best_val, -t.lr))


class SearchFailed(RuntimeError):
    """A trial failed after its retries; the finished trials are kept and a re-run resumes the rest."""


@dataclass
class SearchOutcome:
    best: TrialRecord
    outcome: PhaseResult  # read from the best trial's own checkpoint
    trials: list[TrialRecord]


def trial_run_name(search_name: str, trial_id: str) -> str:
    """The deterministic name of a trial: its inner Train run's name, and how its log is found."""
    return f"{search_name}-{trial_id}"


def latest_complete_checkpoint(path: str, storage_path: str, what: str) -> str:
    """`path` (the checkpoint Tune last heard of) when it is whole; else the newest whole checkpoint
    of the same Train run. Tune's record can be older than the run's own: an attempt Tune never
    heard of (killed before Tune saved its state) reported again, and Train, keeping two, removed it."""
    fs = storage_fs(storage_path)
    if is_whole(fs, path):
        return path
    run_dir = path.rstrip("/").rsplit("/", 1)[0]
    whole = whole_checkpoints(fs, run_dir)
    if not whole:
        raise SearchFailed(f"{what}: its checkpoint {Path(path).name} is gone and its run {Path(run_dir).name} keeps no "
                           "complete one; delete that run's folder from the Ray storage to train the trial afresh")
    log.info("%s: checkpoint %s is gone; reading the run's newest, %s", what, Path(path).name, Path(whole[-1]).name)
    return whole[-1]


def _trial_function(job: PhaseJob, scaling: ScalingConfig, name: str, folder: str, storage_path: str, max_failures: int,
                    log_factory: TrialLogFactory | None, in_process: bool) -> Callable[[dict[str, Any]], None]:
    def trial(config: dict[str, Any]) -> None:
        relayed_progress()
        lr = float(config["lr"])
        faults.hit(job.fault_plan, "trial.start", phase=job.config.phase, lr=lr, node=job.label)
        trial_id = tune.get_context().get_trial_id()
        trial_name = trial_run_name(name, trial_id)
        trial_log = log_factory(trial_name, lr) if log_factory is not None else None
        # the node's config with the trial's lr: what the trial trains (and records in its checkpoints)
        trial_job = replace(job, config=replace(job.config, train=replace(job.config.train, lr=lr)), metrics_sink=trial_log,
                            trial=trial_name)
        # The trial name names its checkpoints' folder: a restored search resumes an interrupted
        # trial from its last checkpoint instead of epoch 0.
        try:
            if in_process:  # the trial's own process is its one worker
                fit_in_this_process(trial_job, CheckpointStore(storage_path, trial_name), phase_device(bool(scaling.use_gpu)),
                               max_failures, to_tune=True)
            else:
                build_trainer(trial_job, scaling, trial_name, storage_path, max_failures,
                              callbacks=[TuneReportCallback()]).fit()
        except SystemExit:  # Tune stopped the trial (its scheduler): run_search's caller closes its log
            raise
        except BaseException:
            if trial_log is not None:
                trial_log.close("FAILED")
            raise
        # A trial the scheduler stops never gets here: its log is closed by run_search's caller.
        if trial_log is not None:
            trial_log.close("FINISHED")

    # Tune registers a function trainable cluster-wide under its __name__: two searches running
    # at once with the same name would swap trainables, and one search's trials would run the
    # other's phase. The search's folder name (its cache key and its storage) keeps them apart,
    # deterministically, so a restored search finds its trainable under the same name.
    trial.__name__ = trial.__qualname__ = f"exitflow_trial_{folder}"
    return trial


def search_dir(name: str, storage_path: str) -> str:
    """The Tune experiment's name: its folder in storage, and in the node's local staging area.

    Tune stages a search's state under `<Ray session>/artifacts/<second it started>/<name>` and
    copies that folder to storage: the same search of two studies in different storage (one
    cluster, two experiments) started in the same second on one node would share that folder,
    and each study's storage would receive the other's state. A hash of the storage path in the
    name keeps them apart; within one storage, the node's key lock lets one run at a time.
    """
    return f"{name}-{hashlib.sha256(storage_path.encode()).hexdigest()[:8]}"


def _record(result: Any, storage_path: str, max_epochs: int) -> TrialRecord:
    """A finished trial, from its last checkpoint's progress record.

    Tune's per-trial metrics cover only the trial's last attempt (a resumed trial may report a
    single epoch, or re-report its final one); the checkpoint holds every epoch.
    """
    metrics = result.metrics or {}
    trial = str(metrics.get("trial_id") or Path(result.path).name)
    lr = float(result.config["lr"])
    path = metrics.get(CHECKPOINT_PATH_KEY)
    if path is None:
        raise SearchFailed(f"trial {trial} (lr={lr:g}) ended without a checkpoint; run again to resume it")
    path = latest_complete_checkpoint(path, storage_path, f"trial {trial} (lr={lr:g})")
    with local_copy(path, storage_path) as d:
        progress = progress_from_checkpoint(d)
    return TrialRecord(
        trial=trial,
        lr=lr,
        best_val=max(float(m[SCORE]) for m in progress.history),
        epochs=progress.epochs_run,
        stopped_by=("diverged" if progress.diverged else "patience" if progress.stopped_early
                    else "scheduler" if progress.epochs_run < max_epochs else ""),
        checkpoint_path=path,
        diverged=progress.diverged,
        train_seconds=epoch_seconds(progress.history),
        resumed=progress.resumed_at is not None,
    )


def _fresh_or_restored(trainable: Any, plan: SearchPlan, name: str, storage_path: str, tune_config: Any,
                       run_config: Any) -> Any:
    """Resume the search saved under `name` (its folder, `search_dir`), or start it afresh, saying why,
    when its state cannot be read."""
    exp_path = f"{storage_path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(exp_path):
        try:
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True, param_space=param_space(plan))
            log.info("resuming learning-rate search %s", name)
            return tuner
        except Exception as e:  # noqa: BLE001 - an unreadable state must not leave the study stuck
            aside = _set_aside(storage_path, name)
            log.warning("learning-rate search %s: cannot resume its saved state (%s); starting it afresh "
                        "(the old state is kept as %s)", name, brief(e), aside)
    return tune.Tuner(trainable, param_space=param_space(plan), tune_config=tune_config, run_config=run_config)


def _set_aside(storage_path: str, name: str) -> str:
    """Rename a search's folder in storage out of the way; returns its new name (relative to storage)."""
    fs, root = storage_location(storage_path)
    for i in range(1, 1000):
        aside = f"{name}.unresumable-{i}"
        if fs.get_file_info(f"{root}/{aside}").type == pyarrow.fs.FileType.NotFound:
            fs.move(f"{root}/{name}", f"{root}/{aside}")
            return aside
    raise SearchFailed(f"learning-rate search {name}: too many unresumable states set aside in storage")


def run_search(
    job: PhaseJob,
    plan: SearchPlan,
    scaling: ScalingConfig,
    name: str,
    storage_path: str,
    max_failures: int,
    log_factory: TrialLogFactory | None = None,
    max_concurrent_trials: int = 2,
    in_process: bool = False,
) -> SearchOutcome:
    """Search the phase's learning rate; an interrupted search with the same name resumes.
    `in_process`: each trial trains in its own process (one worker), not under Ray Train."""
    folder = search_dir(name, storage_path)
    trainable = tune.with_resources(
        _trial_function(job, scaling, name, folder, storage_path, max_failures, log_factory, in_process),
        trial_resources(scaling, in_process),
    )
    max_t = job.config.train.max_epochs
    scheduler = (
        ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=min(plan.grace_period, max_t),
                      reduction_factor=plan.reduction_factor)
        if plan.scheduler == "asha"
        else FIFOScheduler()
    )
    faults.hit(job.fault_plan, "search.start", phase=job.config.phase, node=job.label)
    tune_config = tune.TuneConfig(
        metric=SCORE,
        mode="max",
        scheduler=scheduler,
        num_samples=1 if plan.grid is not None else plan.num_samples,
        max_concurrent_trials=max_concurrent_trials,
    )
    # A trial whose process dies (a lost node) is retried as often as a phase's workers are; in
    # process, the trial is its worker too, and may die as often as both.
    run_config = tune.RunConfig(name=folder, storage_path=storage_path, verbose=0,
                                failure_config=tune.FailureConfig(max_failures=max_failures * (2 if in_process else 1)),
                                callbacks=[SearchProgress(job.label, plan.trials, functools.partial(trial_run_name, name))])
    results = _fresh_or_restored(trainable, plan, folder, storage_path, tune_config, run_config).fit()
    errors = [(r.config.get("lr"), r.error) for r in results if r.error is not None]
    if errors:
        # Choosing among the survivors would let a crash decide the search; fail instead, and
        # let a re-run resume the failed trials (Tuner.restore, resume_errored).
        lr, error = errors[0]
        raise SearchFailed(f"learning-rate search {name}: {len(errors)} of {len(results)} trial(s) failed, "
                           f"first lr={lr}: {brief(error)}; run again to resume")
    records = [_record(r, storage_path, max_t) for r in results]
    if not records:
        raise SearchFailed(f"learning-rate search {name}: no trial reported a result")
    healthy = [t for t in records if not t.diverged]
    if not healthy:
        raise SearchFailed(f"learning-rate search {name}: every learning rate diverged "
                           f"({'; '.join(f'lr={t.lr:g}: {t.diverged}' for t in records)})")
    best = choose_trial(healthy, finishes=get_method(job.net.method).finishes)
    outcome = read_outcome(best.checkpoint_path, storage_path)
    return SearchOutcome(best=best, outcome=outcome, trials=records)


def trial_outcomes(name: str, search: SearchOutcome) -> list[TrialOutcome]:
    """How each trial of the search `name` ended, for its nested run."""
    return [TrialOutcome(trial_run_name(name, t.trial), t.stopped_by or "max_epochs", t.trial == search.best.trial, t.best_val,
                         t.epochs) for t in search.trials]
