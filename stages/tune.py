"""The tune kind: a phase whose learning rate is searched, on Ray Tune.

Its nodes are planned with the other phases (`stages.phase_plan`, through the train kind); it
declares what a search reads, writes and holds, and runs it through `stages.ray_tune`, imported
only when a search runs, so planning a study imports no Ray Tune. The best trial's checkpoint is
the phase's model: nothing is re-trained.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from exitflow.pipeline.dag import Node
from exitflow.pipeline.stage import (CHECKPOINT, FILES, File, Resources, RunSettings, StageContext, StageInput, StageResult, Table,
                            TableKind, register_stage)
from exitflow.stages.core import faults
from exitflow.stages.phase_kind import (DIVERGED_TAG, GRADIENT_DOMINANCE, HISTORY, LINEAGE, TRIAL_RESOURCES, PhaseStage, describe_phase,
                          phase_cost, phase_job, phase_result, run_name)
from exitflow.stages.phase_plan import TUNE

TRIALS = TableKind("trials", "trials.parquet", ("trial", "lr", "best_val", "epochs", "stopped_early"))


@register_stage
class Tune(PhaseStage):
    """A phase whose learning rate is searched: the best trial's model, every trial's record and a plot."""

    kind = TUNE
    writes = (CHECKPOINT, HISTORY, LINEAGE, GRADIENT_DOMINANCE, TRIALS, FILES)
    code = ("exitflow.stages.tune", "exitflow.stages.phase_kind", "exitflow.pipeline.resolve")

    def footprint(self, node: Node, settings: RunSettings) -> Resources:
        """The trials that run at once, each a worker group (and its tiny trial actor)."""
        plan = node.config.search
        group, at_once = settings.worker_group(), min(settings.max_concurrent_trials, plan.trials)
        trial = 0.0 if settings.in_process else TRIAL_RESOURCES["cpu"]
        return Resources(at_once * (group.num_cpus + trial), at_once * group.num_gpus)

    def describe(self, summary: dict[str, Any]) -> str:
        return describe_phase(summary) + f" trials={summary.get('trials')}"

    def run(self, node: Node, inputs: list[StageInput], ctx: StageContext) -> StageResult:
        from exitflow.stages.ray_train import scaling  # Ray Tune and Train: only where a search runs
        from exitflow.stages.ray_tune import run_search, trial_outcomes, trial_run_name

        job, ns = phase_job(node, inputs, ctx)
        plan = node.config.search
        name = run_name(node)
        trial_runs = ctx.trial_runs()
        start = time.monotonic()
        try:
            search = run_search(job, plan, scaling(ctx), name, ctx.storage_path, ctx.settings.max_failures, trial_runs,
                                ctx.settings.max_concurrent_trials, ctx.settings.in_process)
        except BaseException:
            trial_runs.abandon(trial_run_name(name, ""))  # every trial of this search: a re-run resumes them
            raise
        from exitflow.stages.core.report_plots import plot_lr_search  # matplotlib: here, not in every trial's process

        phase = job.config.phase
        faults.hit(ctx.fault_plan, "search.end", phase=phase, node=node.id)
        trial_runs.adopt(trial_outcomes(name, search))
        trials = sorted(search.trials, key=lambda t: t.lr)
        bad = [f"lr={t.lr:g}: {t.diverged}" for t in trials if t.diverged]
        cost = phase_cost(phase, ctx.settings, sum(t.epochs for t in trials), sum(t.train_seconds for t in trials),
                          time.monotonic() - start, any(t.resumed for t in trials), search.outcome.ran_on)
        result = phase_result(node, job, ns, search.outcome, search.best.lr, cost, bad, workdir=ctx.workdir)
        rows = [{"trial": t.trial, "lr": t.lr, "best_val": t.best_val, "epochs": t.epochs, "stopped_early": t.stopped_early,
                 "stopped_by": t.stopped_by, "diverged": t.diverged, "chosen": t.trial == search.best.trial} for t in trials]
        plot = plot_lr_search([r["lr"] for r in rows], [r["best_val"] for r in rows], search.best.lr,
                              ctx.workdir / "lr_search.png", f"{phase}: validation accuracy vs lr")
        result.artifacts += [Table(TRIALS.name, pa.Table.from_pylist(rows)), File(plot)]
        result.summary.update(trials=len(trials), trials_stopped_early=sum(t.stopped_early for t in trials),
                              trial_epochs=sum(t.epochs for t in trials), best_trial=search.best.trial,
                              best_trial_checkpoint=search.best.checkpoint_path)
        if bad:
            result.tags[DIVERGED_TAG] = "; ".join(bad)[:5000]
        return result
