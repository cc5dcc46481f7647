"""Execute one DAG node, the same way for every stage kind.

Cache lookup under the node's key lock; the stage's MLflow run; the stage itself (found in the
stage registry, `pipeline/stage.py`); its declared outputs saved and hashed; its params,
metrics, tags and summary logged. Runs inside a Ray task on any node of the cluster: everything
it needs arrives as plain values, and inputs are read from the tracking store by run id.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exitflow.pipeline import tracking
from exitflow.pipeline.artifacts import ArtifactError, ArtifactStore
from exitflow.pipeline.dag import Node
from exitflow.pipeline.locks import key_lock, lock_dir
from exitflow.pipeline.stage import Checkpoint, File, RunSettings, Stage, StageResult, Table, get_stage
from exitflow.pipeline.trial_runs import MlflowTrialRuns
from exitflow.stages.core import faults

log = logging.getLogger(__name__)

INVALID_PREFIX = "invalid:"  # a run whose artifacts failed verification keeps its key under this prefix
MODELS_TAG = "exitflow.models"  # the ids of the MLflow models a stage logged on its run (JSON list)


@dataclass(frozen=True)
class RunContext:
    """What every node task needs from the driver (picklable, absolute paths only)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    storage_path: str
    settings: RunSettings = RunSettings()
    fault_plan: faults.Plan = ()  # from $EXITFLOW_FAULT, for fault-injection tests
    # The store's key-lock folder (`pipeline.locks.lock_dir` of the store the driver was given: the
    # served tracking URI above no longer says where a sqlite store lies); "" -> the Ray storage's.
    lock_path: str = ""

    @property
    def locks(self) -> str:
        return self.lock_path or str(lock_dir(self.tracking_uri, self.storage_path))


@dataclass
class NodeResult:
    node_id: str
    key: str
    run_id: str
    cached: bool
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointSource:
    """Loads an input model's state from the tracking store (called on the Train worker)."""

    tracking_uri: str
    run_id: str

    def __call__(self) -> dict[str, Any]:
        state, _ = ArtifactStore(tracking.client(self.tracking_uri)).load_checkpoint(self.run_id)
        return state


@dataclass(frozen=True)
class InputRun:
    """A finished input node as its stage sees it: loads only the artifact kinds the stage declares it reads."""

    node_id: str
    run_id: str
    summary: dict[str, Any]
    tracking_uri: str
    reads: tuple[str, ...]
    stage: str

    def _check(self, kind: str) -> None:
        if kind not in self.reads:
            raise TypeError(f"stage {self.stage!r} reads {kind!r} from {self.node_id} without declaring it (reads: {list(self.reads)})")

    def table(self, kind: str) -> Any:
        self._check(kind)
        return ArtifactStore(tracking.client(self.tracking_uri)).load_table(self.run_id, kind)

    def checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]]:
        self._check("checkpoint")
        return ArtifactStore(tracking.client(self.tracking_uri)).load_checkpoint(self.run_id)

    def checkpoint_source(self) -> Callable[[], dict[str, Any]]:
        self._check("checkpoint")
        return CheckpointSource(self.tracking_uri, self.run_id)


@dataclass
class NodeContext:
    """What a running stage borrows from the pipeline (see pipeline.stage.StageContext)."""

    run: RunContext
    node: Node
    run_id: str
    workdir: Path

    @property
    def storage_path(self) -> str:
        return self.run.storage_path

    @property
    def settings(self) -> RunSettings:
        return self.run.settings

    @property
    def fault_plan(self) -> faults.Plan:
        return self.run.fault_plan

    def metrics_sink(self) -> tracking.MetricsSink:
        return tracking.MetricsSink(self.run.tracking_uri, self.run_id)

    def run_checkpoint(self, run_id: str) -> CheckpointSource:
        """Loads any finished phase run's model state (a starting point `runs:/RUN_ID`), on the worker."""
        return CheckpointSource(self.run.tracking_uri, run_id)

    def trial_runs(self) -> MlflowTrialRuns:
        return MlflowTrialRuns(self.run.tracking_uri, self.run.experiment_id, self.run_id, tuple(self.node.tags().items()))


def execute_node(ctx: RunContext, node: Node, inputs: list[NodeResult], stage: Stage | None = None) -> NodeResult:
    """Reuse a finished, verified run with the node's key, or run the stage."""
    stage = stage or get_stage(node.kind)
    start = time.monotonic()
    c = tracking.client(ctx.tracking_uri)
    store = ArtifactStore(c, ctx.fault_plan)
    with key_lock(ctx.locks, node.key):
        # Another run of the same study may have finished this node while we waited.
        hit = cached_result(c, store, ctx.experiment_id, node)
        if hit is not None:
            return hit
        stale = tracking.find_stale(c, ctx.experiment_id, node.key)
        for run_id in stale:  # holding the lock, no live process owns these: they are zombies
            c.set_tag(run_id, "exitflow.recovered", "marked FAILED by a later run")
            tracking.end_run(c, run_id, "FAILED")
        tags = {**node.tags(), **tracking.owner_tags()}
        if stale:
            tags["exitflow.resumes"] = stale[0]
        run_id = tracking.start_run(c, ctx.experiment_id, node.id, tags, ctx.parent_run_id)
        try:
            tracking.log_params(c, run_id, stage.params(node))  # what the run is, before it runs
            _log_data(c, run_id, node, stage)
            with tempfile.TemporaryDirectory() as d:
                stage_inputs = [InputRun(r.node_id, r.run_id, r.summary, ctx.tracking_uri, stage.reads, stage.kind) for r in inputs]
                out = stage.run(node, stage_inputs, NodeContext(ctx, node, run_id, Path(d)))  # type: ignore[arg-type]
                stage.check_outputs(out)
                _store(c, store, run_id, stage, out)
        except BaseException as e:
            for k, v in getattr(e, "tags", {}).items():  # StageFailed: why, on the run itself
                c.set_tag(run_id, k, v)
            tracking.end_run(c, run_id, "FAILED")
            raise
        tracking.end_run(c, run_id, "FINISHED")
    return NodeResult(node.id, node.key, run_id, False, time.monotonic() - start, out.summary)


def _log_data(c: Any, run_id: str, node: Node, stage: Stage) -> None:
    """A node whose config holds a data set reads it: its run records that data's identity as an input,
    in the context its kind declares (what it reads the data for; its kind's family by default)."""
    data = getattr(node.config, "data", None)
    if data is not None and getattr(data, "identity", ""):
        tracking.log_data_input(c, run_id, data, stage.data_context or node.kind.partition(".")[0])


def _store(c: Any, store: ArtifactStore, run_id: str, stage: Stage, out: StageResult) -> None:
    """Everything a stage produced, onto its run: params, tags, metrics, artifacts, summary last."""
    tracking.log_params(c, run_id, out.params)
    for k, v in out.tags.items():
        c.set_tag(run_id, k, v)
    tracking.log_metrics(c, run_id, out.metrics)
    for a in out.artifacts:
        if isinstance(a, Checkpoint):
            store.save_checkpoint(run_id, dict(a.state), dict(a.meta))
        elif isinstance(a, Table):
            store.save_table(run_id, stage.table_kinds()[a.kind], a.table, dict(a.meta))
        elif isinstance(a, File):
            store.save_file(run_id, a.path)
    models = [log_model(c, run_id) for log_model in out.models]  # after the metrics, which MLflow copies onto each
    if models:
        c.set_tag(run_id, MODELS_TAG, json.dumps(models))
    c.set_tag(run_id, "exitflow.summary", json.dumps(out.summary, default=float))


def cached_result(c: Any, store: ArtifactStore, experiment_id: str, node: Node) -> NodeResult | None:
    """The node's finished run, if its artifacts verify; a corrupted one is set aside (re-run)."""
    start = time.monotonic()
    run_id = tracking.find_finished(c, experiment_id, node.key)
    if run_id is None:
        return None
    try:
        store.verify_all(run_id)
    except ArtifactError as e:
        log.warning("%s: cached run %s refused (%s); re-running the stage", node.id, run_id, e)
        c.set_tag(run_id, "exitflow.key", INVALID_PREFIX + node.key)
        c.set_tag(run_id, "exitflow.invalid", str(e)[:500])
        return None
    summary = json.loads(c.get_run(run_id).data.tags.get("exitflow.summary", "{}"))
    return NodeResult(node.id, node.key, run_id, True, time.monotonic() - start, summary)
