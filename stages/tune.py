"""The tune stage: a per-phase learning-rate search on Ray Tune over Ray Train V2.

Each trial is a Tune *function* that fits a TorchTrainer (a full phase with early stopping)
with `TuneReportCallback`, so the trial sees every epoch's metrics and the path of its last
checkpoint (`CHECKPOINT_PATH_KEY`). The winner's checkpoint *is* the phase's result: nothing
is re-trained. An optional ASHA scheduler stops poor learning rates early.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow.fs
from ray import tune
from ray.train import Checkpoint, ScalingConfig
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from stages.train import MetricsSink, PhaseJob, PhaseOutcome, build_trainer, outcome_from_checkpoint

log = logging.getLogger(__name__)

SCORE = "score"  # the metric every trial reports (stages.train.selection_score)
TRIAL_RESOURCES = {"cpu": 0.01}  # non-empty (an empty request is refused), tiny (never starve trainers)
TrialSinkFactory = Callable[[str, float], MetricsSink]  # (trial name, lr) -> where the trial logs


@dataclass(frozen=True)
class SearchPlan:
    """What to search and how."""

    grid: tuple[float, ...] | None = None  # explicit learning rates (grid search) ...
    loguniform: tuple[float, float] | None = None  # ... or a log-uniform range
    num_samples: int = 1  # samples of the range (grid: ignored)
    scheduler: str = "none"  # none | asha
    grace_period: int = 2
    reduction_factor: float = 2.0
    max_concurrent_trials: int = 2

    def param_space(self) -> dict[str, Any]:
        if self.grid is not None:
            return {"lr": tune.grid_search(list(self.grid))}
        assert self.loguniform is not None
        return {"lr": tune.loguniform(*self.loguniform)}


@dataclass
class TrialRecord:
    trial: str
    lr: float
    best_val: float
    epochs: int
    stopped_early: bool
    checkpoint_path: str | None
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class SearchOutcome:
    best: TrialRecord
    outcome: PhaseOutcome  # read from the best trial's own checkpoint
    trials: list[TrialRecord]


def _read_outcome(path: str, storage_path: str) -> PhaseOutcome:
    """A trial's checkpoint path is relative to the storage filesystem (local, s3://, gs://)."""
    if "://" not in storage_path:
        return outcome_from_checkpoint(path)
    fs, _ = pyarrow.fs.FileSystem.from_uri(storage_path)
    with Checkpoint(path=path, filesystem=fs).as_directory() as d:
        return outcome_from_checkpoint(d)


def _trial_function(job: PhaseJob, scaling: ScalingConfig, name: str, storage_path: str, max_failures: int,
                    sink_factory: TrialSinkFactory | None) -> Callable[[dict[str, Any]], None]:
    def trial(config: dict[str, Any]) -> None:
        lr = float(config["lr"])
        trial_id = tune.get_context().get_trial_id()
        trial_name = f"{name}-{trial_id}"
        sink = sink_factory(trial_name, lr) if sink_factory is not None else None
        trial_job = replace(job.with_lr(lr), metrics_sink=sink)
        # The trial name makes the inner Train run resumable: a restored search resumes
        # an interrupted trial from its last checkpoint instead of epoch 0.
        trainer = build_trainer(trial_job, scaling, trial_name, storage_path, max_failures, callbacks=[TuneReportCallback()])
        trainer.fit()

    return trial


def run_search(
    job: PhaseJob,
    plan: SearchPlan,
    scaling: ScalingConfig,
    name: str,
    storage_path: str,
    max_failures: int,
    sink_factory: TrialSinkFactory | None = None,
) -> SearchOutcome:
    """Search the phase's learning rate; an interrupted search with the same name resumes."""
    trainable = tune.with_resources(
        _trial_function(job, scaling, name, storage_path, max_failures, sink_factory), TRIAL_RESOURCES
    )
    max_t = int(job.train["max_epochs"])
    scheduler = (
        ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=min(plan.grace_period, max_t),
                      reduction_factor=plan.reduction_factor)
        if plan.scheduler == "asha"
        else FIFOScheduler()
    )
    exp_path = f"{storage_path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(exp_path):
        log.info("resuming learning-rate search %s", name)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True, param_space=plan.param_space())
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=plan.param_space(),
            tune_config=tune.TuneConfig(
                metric=SCORE,
                mode="max",
                scheduler=scheduler,
                num_samples=1 if plan.grid is not None else plan.num_samples,
                max_concurrent_trials=plan.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0),
        )
    results = tuner.fit()
    errors = [r.error for r in results if r.error is not None]
    records: list[TrialRecord] = []
    for r in results:
        if r.error is not None or r.metrics_dataframe is None or r.metrics_dataframe.empty:
            continue
        df = r.metrics_dataframe
        hist_cols = [c for c in df.columns if c.startswith(("val_", "train_loss", "epoch", "score", "lr"))]
        history = df[hist_cols].to_dict("records")
        records.append(
            TrialRecord(
                trial=r.metrics.get("trial_id", r.path.rsplit("/", 1)[-1]),
                lr=float(r.config["lr"]),
                best_val=float(df[SCORE].max()),
                epochs=int(len(df)),
                stopped_early=len(df) < max_t,
                checkpoint_path=r.metrics.get(CHECKPOINT_PATH_KEY),
                history=history,
            )
        )
    if not records:
        raise RuntimeError(f"learning-rate search {name}: every trial failed: {errors[:1]}")
    if errors:
        log.warning("search %s: %d trial(s) failed; choosing among the %d that finished", name, len(errors), len(records))
    best = max(records, key=lambda t: (t.best_val, -t.lr))
    if best.checkpoint_path is None:
        raise RuntimeError(f"search {name}: best trial {best.trial} reported no checkpoint")
    outcome = _read_outcome(best.checkpoint_path, storage_path)
    return SearchOutcome(best=best, outcome=outcome, trials=records)
