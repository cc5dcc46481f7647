"""The train kind: one training phase with a fixed learning rate.

It plans the study's phases (`stages.phase_plan`: a phase whose lr is searched becomes a tune
node), declares what a phase reads, writes and holds, and trains it through `stages.ray_train`
(Ray Train, or the stage's own process with one worker), imported only when a phase runs, so
planning a study imports no Ray Train.
"""

from __future__ import annotations

import time

from exitflow.pipeline.dag import Graph, Node
from exitflow.pipeline.spec import StudySpec
from exitflow.pipeline.stage import (CHECKPOINT, FILES, NODE_RETRIES, Resources, RunSettings, StageContext, StageInput, StageResult,
                            register_stage)
from exitflow.stages.phase_kind import (DIVERGED_TAG, GRADIENT_DOMINANCE, HISTORY, LINEAGE, PhaseDiverged, PhaseStage, epoch_seconds,
                          phase_cost, phase_job, phase_result, run_name)
from exitflow.stages.phase_plan import TRAIN, TUNE, plan_phases


@register_stage
class Train(PhaseStage):
    """A phase with one fixed learning rate: its best model, history and metrics."""

    kind = TRAIN
    also_plans = (TUNE,)  # the searched phases: planned with the others, so a study lists its phases seed by seed
    writes = (CHECKPOINT, HISTORY, LINEAGE, GRADIENT_DOMINANCE, FILES)
    code = ("exitflow.stages.train", "exitflow.stages.phase_kind", "exitflow.pipeline.resolve")

    def plan(self, spec: StudySpec, graph: Graph) -> list[Node]:
        return plan_phases(spec)

    def resources(self, node: Node, settings: RunSettings) -> Resources:
        """In process, the task is the phase's one worker and holds its CPUs (and GPU)."""
        return settings.worker_group() if settings.in_process else Resources()

    def retries(self, node: Node, settings: RunSettings) -> int:
        """In process, the task's death is also its worker's: Train's restarts join Ray's retries."""
        return NODE_RETRIES + (settings.max_failures if settings.in_process else 0)

    def footprint(self, node: Node, settings: RunSettings) -> Resources:
        return settings.worker_group()

    def run(self, node: Node, inputs: list[StageInput], ctx: StageContext) -> StageResult:
        from exitflow.stages.ray_train import fit_with_torch_trainer, scaling  # Ray Train: only where a phase runs

        job, ns = phase_job(node, inputs, ctx)
        phase = job.config.phase
        start = time.monotonic()
        result = fit_with_torch_trainer(job, scaling(ctx), run_name(node), ctx.storage_path, ctx.settings.max_failures,
                           ctx.settings.in_process)
        cost = phase_cost(phase, ctx.settings, result.epochs_run, epoch_seconds(result.history),
                          time.monotonic() - start, result.resumed_at is not None, result.ran_on)
        lr = float(job.config.train.lr)  # type: ignore[arg-type]  # a train node's lr is fixed
        if result.diverged:
            raise PhaseDiverged(f"{node.id} diverged: {result.diverged} (lr={lr:g}); lower phases.{phase}.lr "
                                f"or set phases.{phase}.grad_clip", {DIVERGED_TAG: result.diverged})
        return phase_result(node, job, ns, result, lr, cost, workdir=ctx.workdir)
