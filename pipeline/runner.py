"""Run a study: check everything, then execute the DAG as Ray tasks that hold no CPU.

Independent nodes run concurrently (Ray schedules a task as soon as its inputs are ready);
results pass between nodes as MLflow run ids, never as pickled models. Cached nodes are
reused after their artifacts verify; an interrupted phase resumes from its checkpoint. Ray
itself is `pipeline.ray_session`, the node tasks `pipeline.scheduler`; what this module needs to
know of a node it asks its kind's role (`pipeline.stage`): the study's phases, its report, its
analyses.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from exitflow.pipeline import tracking, tracking_server
from exitflow.pipeline.artifacts import ArtifactStore
from exitflow.pipeline.dag import Graph, Node, kind_from_tags
from exitflow.pipeline.display import Display, PlainDisplay
from exitflow.pipeline.execute import NodeResult, RunContext, cached_result
from exitflow.pipeline.graph import build_graph
from exitflow.pipeline.locks import STORE_STATE, lock_dir
from exitflow.pipeline.ray_session import check_address, ensure_ray, joined, ray_logs_dir
from exitflow.pipeline.relay import relay
from exitflow.pipeline.resolve import check_starts, preflight
from exitflow.pipeline.results import NODES_FILE, node_record
from exitflow.pipeline.scheduler import describe_result, run_tasks
from exitflow.pipeline.spec import SpecError, StudySpec, spec_to_yaml, variants
from exitflow.pipeline.stage import ANALYSIS, PHASE, REPORT, Role, RunSettings, get_stage, kinds_with_role, nodes_with_role, role_of
from exitflow.pipeline.user_code import shipped_paths
from exitflow.stages.core import faults
from exitflow.stages.core.allowed import RUN_PREFIX

log = logging.getLogger(__name__)

DEFAULT_STORAGE = ".exitflow/ray"  # with a tracking server: the working directory's
ANALYSIS_RUNS_TAG = "exitflow.analysis_runs"  # on the pipeline run: {analysis node: its run id}
Progress = Callable[[str], None]


class StudyFailed(RuntimeError):
    """One or more nodes failed; finished nodes stay cached for the next run."""


@dataclass
class StudyResult:
    parent_run_id: str
    tracking_uri: str
    results: dict[str, NodeResult] = field(default_factory=dict)
    table: str = ""
    seconds: float = 0.0
    roles: dict[str, Role | None] = field(default_factory=dict)  # node -> its kind's role (pipeline.stage)

    @property
    def trained(self) -> list[str]:
        """Phase nodes that trained in this execution (not reused)."""
        return [nid for nid, r in self.results.items() if not r.cached and self.roles.get(nid) == PHASE]

    @property
    def analyses(self) -> dict[str, str]:
        """Analysis node -> its run (this execution's or the cached one)."""
        return {nid: r.run_id for nid, r in self.results.items() if self.roles.get(nid) == ANALYSIS}

    @property
    def cache_hits(self) -> list[str]:
        return [r.node_id for r in self.results.values() if r.cached]


def storage_path(spec: StudySpec, tracking_uri: str | None = None) -> str:
    """The study's Ray storage: `tracking.storage_path`, else beside a local sqlite store
    (`<store folder>/.exitflow/ray`: every command on the store resumes what another left,
    whatever its working directory), else `./.exitflow/ray`."""
    p = spec.tracking.storage_path
    if p is None:
        db = tracking.sqlite_file(tracking.resolve_uri(tracking_uri, spec.tracking.uri))
        p = str(db.parent / STORE_STATE / "ray") if db is not None else DEFAULT_STORAGE
    return p if "://" in p else str(Path(p).resolve())


# ----------------------------------------------------------------------------- plan


@dataclass
class PlannedNode:
    node: Node
    cached_run: str | None


def plan(spec: StudySpec, tracking_uri: str | None = None) -> tuple[Graph, list[PlannedNode]]:
    """The DAG in execution order and, per node, the finished run it would reuse (runs nothing).

    It refuses what `run_study` would refuse in the store: a `net.init: runs:/RUN_ID` that the store
    does not hold as a finished phase run with a checkpoint (a SpecError)."""
    graph = build_graph(spec)
    uri = tracking.resolve_uri(tracking_uri, spec.tracking.uri)
    planned = [PlannedNode(graph.nodes[n], None) for n in graph.order()]
    if not tracking.store_exists(uri):
        check_run_start(spec, uri, None)
        return graph, planned  # no store yet: nothing is cached, and plan creates nothing
    with tracking_server.serve_store(uri, create=False) as http:
        c = tracking.client(http)
        check_run_start(spec, uri, c)
        exp = c.get_experiment_by_name(spec.tracking.experiment or spec.name)
        if exp is not None:
            for p in planned:
                p.cached_run = tracking.find_finished(c, exp.experiment_id, p.node.key)
    return graph, planned


# ----------------------------------------------------------------------------- run


def _recover_zombies(c: Any, experiment_id: str) -> list[str]:
    """Runs left RUNNING by dead processes of this host -> KILLED (pipeline) or FAILED (stages, trials).

    Every exitflow run records the host and pid of the process that opened it; a run whose
    process is gone can only be a leftover of a kill, so the UI never shows it as running.
    Runs of other hosts are left to the stage lock (`execute_node`), which knows its key.
    """
    host = socket.gethostname()
    fixed = []
    for r in c.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000):
        tags = r.data.tags
        if tags.get("exitflow.host") != host or _alive(int(tags.get("exitflow.pid", "0"))):
            continue
        parent = tags.get("exitflow.stage") == "pipeline"
        c.set_tag(r.info.run_id, "exitflow.recovered", f"its process died; marked {'KILLED' if parent else 'FAILED'} by a later run")
        tracking.end_run(c, r.info.run_id, "KILLED" if parent else "FAILED")
        fixed.append(r.info.run_id)
    return fixed


def run_starts(spec: StudySpec) -> list[str]:
    """The `net.init: runs:/ID` of every variant of the study (the base spec's first), each once."""
    inits = [v.net.init for _, v in variants(spec)]
    return list(dict.fromkeys(i for i in inits if i and i.startswith(RUN_PREFIX)))


def starts_from_run(spec: StudySpec) -> bool:
    """Whether a variant's phases that train from scratch start from a run's weights (`net.init: runs:/ID`)."""
    return bool(run_starts(spec))


def check_run_start(spec: StudySpec, uri: str, c: Any | None) -> None:
    """Every variant's `net.init: runs:/RUN_ID` names a finished phase run of the store at `uri` whose
    checkpoint fits that variant's net: a SpecError naming the variant and net.init otherwise. `c`: a
    client of the served store, None when the store does not exist yet (then no run is in it)."""
    starts = run_starts(spec)
    if not starts:
        return
    if c is None:
        raise SpecError(f"net.init: {starts[0]}: no such run: the tracking store {uri} does not exist yet")
    check_starts(spec, read_run=lambda run_id: _phase_run_state(c, run_id), runs_only=True)


def _phase_run_state(c: Any, run_id: str) -> dict[str, Any]:
    """The model state of a finished exitflow phase run (train or tune) of this tracking store."""
    try:
        run = c.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow's "not found" comes as several exception types
        raise ValueError(f"no run {run_id} in the tracking store") from None
    if role_of(kind_from_tags(run.data.tags)) != PHASE or run.info.status != "FINISHED":
        raise ValueError(f"run {run_id} is not a finished exitflow phase run (a {' or '.join(sorted(kinds_with_role(PHASE)))} stage)")
    state, _ = ArtifactStore(c).load_checkpoint(run_id)
    return state


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_study(
    spec: StudySpec,
    tracking_uri: str | None = None,
    address: str | None = None,
    progress: Progress | None = None,
    ray_logs: bool = False,
    display: Display | None = None,
) -> StudyResult:
    """Validate, then run every node of the study (or reuse it) and return the budget table.

    What happens shows on `display` (plain lines to `progress`, or to the log, by default)."""
    show = display or PlainDisplay(progress or (lambda msg: log.info(msg)))
    start = time.monotonic()
    try:
        fault_plan = faults.from_env()
    except ValueError as e:
        raise SpecError(str(e)) from None
    # Nothing is written before every check has passed: a command that fails leaves the store (and
    # the folders beside it) as it found them; a store is created only by a run that will run.
    preflight(spec)  # bad data or nets fail here, in every variant: before Ray, before the store is touched
    check_address(address)  # and a cluster that takes no connections
    graph = build_graph(spec)
    ship = shipped_paths(v.net.backbone for _, v in variants(spec))  # the user's backbone modules, for every worker
    report_node = _report_node(graph)
    uri = tracking.resolve_uri(tracking_uri, spec.tracking.uri)
    tracking.check_store(uri)
    storage = storage_path(spec, uri)
    if not tracking.store_exists(uri):
        check_run_start(spec, uri, None)  # runs:/ID of a store not made yet: refused before making it
    with joined(address, ray_logs, ship), tracking_server.serve_store(uri) as http:
        c = tracking.client(http)
        check_run_start(spec, uri, c)  # net.init: runs:/RUN_ID, read from the store: nothing written yet
        if "://" not in storage:
            Path(storage).mkdir(parents=True, exist_ok=True)
        exp = tracking.ensure_experiment(c, spec.tracking.experiment or spec.name)
        for run_id in _recover_zombies(c, exp):
            show.note(f"recovered: run {run_id}, left RUNNING by a process that died, is closed")
        parent = tracking.start_run(c, exp, spec.name, {"exitflow.stage": "pipeline", **tracking.owner_tags()})
        result = StudyResult(parent_run_id=parent, tracking_uri=uri, roles={nid: role_of(n.kind) for nid, n in graph.nodes.items()})
        try:
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "spec.yaml").write_text(spec_to_yaml(spec))
                ArtifactStore(c).save_file(parent, Path(d) / "spec.yaml")
            tracking.log_params(c, parent, {"regimes": ",".join(spec.regimes), "seeds": ",".join(map(str, spec.seeds)),
                                  "backbone": spec.net.backbone, "data": spec.data.name, "nodes": len(graph.nodes)})
            ctx = RunContext(http, exp, parent, storage, run_settings(spec), fault_plan, str(lock_dir(uri, storage)))
            try:
                _execute(graph, ctx, result, show, address, ray_logs, ship)
            finally:
                show.close()
            report = result.results[report_node.id]
            result.table = _report_text(c, report.run_id, get_stage(report_node.kind).printed)
            with tempfile.TemporaryDirectory() as d:  # every node's run, cached ones too: pipeline.results reads it
                # graph order, not completion order: the same study lists (and reads) the same way every time
                nodes = {nid: node_record(graph.nodes[nid], result.results[nid]) for nid in graph.order() if nid in result.results}
                (Path(d) / NODES_FILE).write_text(json.dumps(nodes, indent=1))
                ArtifactStore(c).save_file(parent, Path(d) / NODES_FILE)
            c.set_tag(parent, "exitflow.report_run", report.run_id)
            if result.analyses:  # the analyses are leaves beside the report: the pipeline run links them
                c.set_tag(parent, ANALYSIS_RUNS_TAG, json.dumps(result.analyses))
            tracking.log_metrics(c, parent, {"nodes_cached": len(result.cache_hits), "nodes_run": len(result.results) - len(result.cache_hits)})
        except KeyboardInterrupt:
            tracking.end_run(c, parent, "KILLED")
            raise
        except BaseException:
            tracking.end_run(c, parent, "FAILED")
            raise
        result.seconds = time.monotonic() - start
        c.log_metric(parent, "seconds", result.seconds)
        tracking.end_run(c, parent, "FINISHED")
    return result


def _execute(graph: Graph, ctx: RunContext, result: StudyResult, show: Display, address: str | None,
             ray_logs: bool = False, ship: Sequence[str] = ()) -> None:
    """Reuse cached nodes from the driver; run the rest as Ray tasks (Ray starts only if needed)."""
    c = tracking.client(ctx.tracking_uri)
    store = ArtifactStore(c)
    inputs: dict[str, Any] = {}  # node id -> NodeResult (cached) or ObjectRef (running)
    to_run: list[str] = []
    show.plan(ctx.settings.study_name, {nid: graph.nodes[nid].kind for nid in graph.order()})
    for nid in graph.order():
        hit = cached_result(c, store, ctx.experiment_id, graph.nodes[nid])
        if hit is None:
            to_run.append(nid)
            continue
        inputs[nid] = result.results[nid] = hit
        show.node(nid, "cached", describe_result(graph.nodes[nid], hit))
    if not to_run:
        return
    started_ray = ensure_ray(address, ray_logs, ship)
    if started_ray and not ray_logs and (logs := ray_logs_dir()):
        show.note(f"Ray's own output: {logs}")
    try:
        with relay(show.show) as lines:
            failures, skipped = run_tasks(graph, to_run, ctx, inputs, result.results, show, lines.flush)
    finally:
        if started_ray:
            ray.shutdown()
    if failures:
        first = next(iter(failures))
        raise StudyFailed(f"{len(failures)} node(s) failed: {', '.join(failures)}"
                          f"{f'; {len(skipped)} skipped' if skipped else ''}; {first}: {failures[first]}")


def _report_node(graph: Graph) -> Node:
    """The study's report: the one node whose kind's role is REPORT."""
    found = nodes_with_role(graph, REPORT)
    if len(found) != 1:
        raise ValueError(f"a study has one report node; this one has {len(found)}: {[n.id for n in found]}")
    return found[0]


def run_settings(spec: StudySpec) -> RunSettings:
    """How the study runs (resources, trial concurrency, its name): read from the spec once, never keyed."""
    r = spec.resources
    return RunSettings(study_name=spec.name, num_workers=r.num_workers, use_gpu=r.use_gpu, cpus_per_worker=r.cpus_per_worker,
                       gpus_per_worker=r.gpus_per_worker, max_failures=r.max_failures, torch_threads=r.torch_threads,
                       max_concurrent_trials=spec.search.max_concurrent_trials, admission=r.admission, trainer=r.trainer)


def _report_text(c: Any, report_id: str, printed: tuple[str, ...]) -> str:
    """The report's texts its kind prints (the budget tables, then the training-cost table), each one
    its run holds (a report made before a text existed has none)."""
    held = {f.path for f in c.list_artifacts(report_id)}
    return "\n\n".join(_read_text(c, report_id, path).rstrip("\n") for path in printed if path in held) + "\n"


def _read_text(c: Any, run_id: str, path: str) -> str:
    import mlflow

    with tempfile.TemporaryDirectory() as d:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=d, tracking_uri=c.tracking_uri)
        return Path(local).read_text()


def study_report(run_id: str, tracking_uri: str | None = None) -> tuple[str, dict[str, Any]]:
    """The budget table of a pipeline run (or of a report run) and where its plots are."""
    uri = tracking.resolve_uri(tracking_uri, None)
    with tracking_server.serve_store(uri, create=False) as http:  # a report never makes a store
        c = tracking.client(http)
        run = c.get_run(run_id)
        is_report = role_of(kind_from_tags(run.data.tags)) == REPORT
        report_id = run.data.tags.get("exitflow.report_run", run_id if is_report else None)
        if report_id is None:
            raise ValueError(f"run {run_id} is neither a finished pipeline run nor a report run")
        rep = c.get_run(report_id)
        table = _report_text(c, report_id, get_stage(kind_from_tags(rep.data.tags)).printed)
        plots = [f.path for f in c.list_artifacts(report_id) if f.path.endswith(".png")]
        where = {"report_run": report_id, "experiment_id": rep.info.experiment_id, "artifact_uri": rep.info.artifact_uri, "plots": plots}
        where["analyses"] = {
            node: [c.get_run(aid).info.artifact_uri.rstrip("/") + "/" + f.path for f in c.list_artifacts(aid) if f.path.endswith(".png")]
            for node, aid in json.loads(run.data.tags.get(ANALYSIS_RUNS_TAG, "{}")).items()
        }
    return table, where
