"""Run a study: check everything, then execute the DAG as Ray tasks that hold no CPU.

Independent nodes run concurrently (Ray schedules a task as soon as its inputs are ready);
results pass between nodes as MLflow run ids, never as pickled models. Cached nodes are
reused after their artifacts verify; an interrupted phase resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from pipeline import tracking
from pipeline.admission import Admission
from pipeline.display import Display, PlainDisplay
from pipeline.artifacts import ArtifactStore
from pipeline.execute import NodeResult, RunContext, cached_result, execute_node
from pipeline.stage import RunSettings, Stage, get_stage
from pipeline.graph import Graph, Node, build_graph
from pipeline.locks import STORE_STATE, lock_dir
from pipeline.loopback import free_loopback_port
from pipeline.resolve import check_starts, preflight
from pipeline.spec import SpecError, StudySpec, spec_to_yaml, variants
from stages.core.allowed import RUN_PREFIX
from stages.core import faults
from stages.core.progress import first_line
from pipeline.relay import quiet_ray_notices, relay, relayed_progress
from pipeline.results import NODES_FILE, node_record

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

    @property
    def trained(self) -> list[str]:
        """Phase nodes that trained in this execution (not reused)."""
        return [nid for nid, r in self.results.items() if not r.cached and nid.rsplit("/", 1)[-1] in ("P1", "P2", "P3")]

    @property
    def analyses(self) -> dict[str, str]:
        """Analysis node -> its run (this execution's or the cached one)."""
        return {nid: r.run_id for nid, r in self.results.items() if "analyze" in nid.split("/")[:-1]}

    @property
    def cache_hits(self) -> list[str]:
        return [r.node_id for r in self.results.values() if r.cached]


def job_env() -> dict[str, str]:
    """Env vars of every process of the job, on one machine or a cluster."""
    tuned = {k: v for k, v in os.environ.items() if k.startswith("RAY_TRAIN_")}
    return {
        **tracking.CLIENT_ENV,
        **tuned,  # the user's own Train settings reach every process
        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore:`torch.jit.script` is deprecated:FutureWarning",
        "RAY_AIR_NEW_OUTPUT": "0",  # Tune's new reporter prints a banner per search whatever its verbosity
    }


def local_env() -> dict[str, str]:
    """`job_env` plus what a local Ray on one machine needs."""
    return {
        **job_env(),
        "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),  # hosts resolving to 127.0.1.1
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
        # One machine has no node to lose to preemption: skip the watcher actor each phase would start.
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"),
    }


STATE_API_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's state API clients look first


def init_local_ray(env: dict[str, str], **init: Any) -> Any:
    """`ray.init` of a local Ray whose processes know where its state API is: its dashboard, on a
    loopback port chosen here and named in every process's environment.

    Ray Train's placement-group cleaner asks the state API whether a run's controller is alive.
    Without an address it looks for Ray on the machine (`ray start`'s address file, then raylet
    processes) and gives up when it finds two: a second study, a `ray start` cluster. The
    placement groups of a run whose controller died (a trial ASHA stopped, a killed worker) then
    keep their CPUs until Ray stops, and the next phase that needs them waits forever."""
    ctx = None
    for _ in range(3):
        port = free_loopback_port()
        ctx = ray.init(runtime_env={"env_vars": {**env, STATE_API_ENV: f"http://127.0.0.1:{port}"}},
                       include_dashboard=True, dashboard_port=port, **init)
        url = ctx.dashboard_url or ""
        if not url or url.rsplit(":", 1)[-1] == str(port):
            return ctx
        ray.shutdown()  # another process bound the port first: the address would name its server
    return ctx


def storage_path(spec: StudySpec, tracking_uri: str | None = None) -> str:
    """The study's Ray storage: `tracking.storage_path`, else beside a local sqlite store
    (`<store folder>/.exitflow/ray`: every command on the store resumes what another left,
    whatever its working directory), else `./.exitflow/ray`."""
    p = spec.tracking.storage_path
    if p is None:
        db = tracking.sqlite_file(tracking.resolve_uri(tracking_uri, spec.tracking.uri))
        p = str(db.parent / STORE_STATE / "ray") if db is not None else DEFAULT_STORAGE
    return p if "://" in p else str(Path(p).resolve())


class ClusterError(RuntimeError):
    """The Ray cluster named by --address / $RAY_ADDRESS cannot be reached or joined."""


RAY_CLIENT_PORT = 10001  # Ray Client's port on a head node, when a ray:// address names none


def check_address(address: str | None) -> None:
    """Fail fast, before anything is stored, when a cluster address takes no connections: `HOST:PORT`
    of its GCS, or `ray://HOST[:PORT]` of its Ray Client server ("auto" and a local start are left
    to Ray; so is another scheme, which names a Ray Client plugin)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return
    scheme, sep, rest = address.partition("://")
    if sep and scheme != "ray":
        return
    where = rest.split("/", 1)[0] if sep else address
    host, colon, port = where.rpartition(":")
    if sep and not colon:
        host, port = where, str(RAY_CLIENT_PORT)
    elif not colon or not port.isdigit() or not host:
        expected = ("ray://HOST:PORT of the cluster's Ray Client server (10001 by default)" if sep else
                    "HOST:PORT of the cluster's head (its GCS port, 6379 by default)")
        raise ClusterError(f"--address {address!r}: expected {expected}")
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None
    # Ray would wait minutes on a port that takes connections but is no Ray (its GCS client retries
    # without end): both of its ports speak gRPC, whose handshake answers in milliseconds.
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", "") and not _speaks_grpc(host, int(port)):
        port_name = "its Ray Client port, 10001 by default" if sep else "its GCS port, 6379 by default"
        raise ClusterError(f"{address} takes connections but is not a Ray cluster (no gRPC answer in "
                           f"{GRPC_WAIT_S:.0f} s): is it the head's port ({port_name})?")


GRPC_WAIT_S = 10.0  # a gRPC handshake on a loaded head still answers well within this


def _speaks_grpc(host: str, port: int) -> bool:
    """Whether the server at host:port completes a gRPC (HTTP/2) handshake within GRPC_WAIT_S."""
    import grpc  # Ray's own dependency

    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=GRPC_WAIT_S)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


@contextlib.contextmanager
def _joined(address: str | None, ray_logs: bool) -> Iterator[None]:
    """Join the cluster a run names (--address, $RAY_ADDRESS) for the block, and leave it after: joined
    before anything is written, so an address that answers but is no Ray (or refuses this client)
    fails with the store untouched. A local Ray is not started here: only once a node must run."""
    joined = ensure_ray(address, ray_logs) if address or os.environ.get("RAY_ADDRESS") else False
    try:
        yield
    finally:
        if joined:
            ray.shutdown()


def ensure_ray(address: str | None, ray_logs: bool = False) -> bool:
    """Join `address` / $RAY_ADDRESS, or start a local Ray; True if we started it (and stop it).

    Ray's own output of the processes stays in the session's log files unless `ray_logs`: the
    terminal shows exitflow's lines, relayed by `pipeline.relay`."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    env = job_env() if address else local_env()
    os.environ.update(env)  # the driver's own MLflow clients too
    # The dashboard serves the state API, which Ray Train's placement-group cleaner needs: without
    # it, the workers' resources of a trial that Tune stops (ASHA) are never given back.
    if not address:  # a local Ray's default token auth is right; its notice about it is not progress
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    common: dict[str, Any] = dict(logging_level=logging.WARNING, configure_logging=False, log_to_driver=ray_logs)
    try:
        if address:  # a cluster's nodes each know their Ray (`ray start` writes its address)
            ray.init(address=address, runtime_env={"env_vars": env}, include_dashboard=True, **common)
        else:
            init_local_ray(env, **common)
    except (ConnectionError, RuntimeError) as e:
        if not address:
            raise
        why = first_line(e)
        hint = ""
        if "Authentication" in str(e) or "GCS" in str(e):
            hint = (" (a cluster with token authentication needs RAY_AUTH_MODE=token and the cluster's token in "
                    "RAY_AUTH_TOKEN; and the same Ray version as the cluster)")
        raise ClusterError(f"could not join the Ray cluster at {address}: {why}{hint}") from None
    if not ray_logs:
        quiet_ray_notices()
    return True


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
    with tracking.serve_store(uri, create=False) as http:
        c = tracking.client(http)
        check_run_start(spec, uri, c)
        exp = c.get_experiment_by_name(spec.tracking.experiment or spec.name)
        if exp is not None:
            for p in planned:
                p.cached_run = tracking.find_finished(c, exp.experiment_id, p.node.key)
    return graph, planned


# ----------------------------------------------------------------------------- run


def _node_task(ctx: RunContext, node: Node, stage: Stage, *inputs: NodeResult) -> NodeResult:
    relayed_progress()
    return execute_node(ctx, node, list(inputs), stage)


def task_name(node_id: str) -> str:
    return f"exitflow:{node_id}"


def node_task(node_id: str) -> Any:
    """The Ray task that runs one node, named after it: Ray's own notices name a task by its
    function ("Task exitflow:seed0/P1 failed. There are 1 retries remaining"), not by its name."""

    def task(ctx: RunContext, node: Node, stage: Stage, *inputs: NodeResult) -> NodeResult:
        return _node_task(ctx, node, stage, *inputs)

    task.__name__ = task.__qualname__ = task_name(node_id)
    return ray.remote(num_cpus=0)(task)


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
    if run.data.tags.get("exitflow.stage") not in ("train", "tune") or run.info.status != "FINISHED":
        raise ValueError(f"run {run_id} is not a finished exitflow phase run (a train or tune stage)")
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
    uri = tracking.resolve_uri(tracking_uri, spec.tracking.uri)
    tracking.check_store(uri)
    storage = storage_path(spec, uri)
    if not tracking.store_exists(uri):
        check_run_start(spec, uri, None)  # runs:/ID of a store not made yet: refused before making it
    with _joined(address, ray_logs), tracking.serve_store(uri) as http:
        c = tracking.client(http)
        check_run_start(spec, uri, c)  # net.init: runs:/RUN_ID, read from the store: nothing written yet
        if "://" not in storage:
            Path(storage).mkdir(parents=True, exist_ok=True)
        exp = tracking.ensure_experiment(c, spec.tracking.experiment or spec.name)
        for run_id in _recover_zombies(c, exp):
            show.note(f"recovered: run {run_id}, left RUNNING by a process that died, is closed")
        parent = tracking.start_run(c, exp, spec.name, {"exitflow.stage": "pipeline", **tracking.owner_tags()})
        result = StudyResult(parent_run_id=parent, tracking_uri=uri)
        try:
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "spec.yaml").write_text(spec_to_yaml(spec))
                ArtifactStore(c).save_file(parent, Path(d) / "spec.yaml")
            tracking.log_params(c, parent, {"regimes": ",".join(spec.regimes), "seeds": ",".join(map(str, spec.seeds)),
                                  "backbone": spec.net.backbone, "data": spec.data.name, "nodes": len(graph.nodes)})
            ctx = RunContext(http, exp, parent, storage, run_settings(spec), fault_plan, str(lock_dir(uri, storage)))
            try:
                _execute(graph, ctx, result, show, address, ray_logs)
            finally:
                show.close()
            report = result.results["report"]
            result.table = _report_text(c, report.run_id)
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
             ray_logs: bool = False) -> None:
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
        show.node(nid, "cached", _describe(graph.nodes[nid], hit))
    if not to_run:
        return
    started_ray = ensure_ray(address, ray_logs)
    if started_ray and not ray_logs and (logs := _ray_logs_dir()):
        show.note(f"Ray's own output: {logs}")
    try:
        with relay(show.show) as lines:
            _run_tasks(graph, to_run, ctx, inputs, result, show, lines.flush)
    finally:
        if started_ray:
            ray.shutdown()


def _ray_logs_dir() -> str | None:
    """Where the local Ray this process started writes its processes' output (Ray has no public
    call for it: None if its internals moved)."""
    try:
        return str(ray._private.worker._global_node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 - only a hint for the terminal
        return None


ADMISSION_POLL_S = 5.0  # how often a node waiting for room re-reads the cluster's capacity


def _run_tasks(graph: Graph, to_run: list[str], ctx: RunContext, inputs: dict[str, Any], result: StudyResult, show: Display,
               flush: Callable[[], None]) -> None:
    """Start each node once its inputs are done; a node downstream of a failure is skipped, not run.
    `flush` prints the lines the nodes posted so far: a node's own lines come before its verdict."""
    waiting = list(to_run)  # topological order
    pending: dict[Any, str] = {}
    admission = Admission(enabled=ctx.settings.admission)
    told: set[str] = set()  # nodes whose wait for room was announced
    failures: dict[str, str] = {}  # node -> why it failed
    skipped: dict[str, str] = {}  # node -> the failed node upstream of it
    show.note(f"running {len(to_run)} of {len(graph.nodes)} nodes: {', '.join(to_run)}")
    while waiting or pending:
        for nid in list(waiting):
            node = graph.nodes[nid]
            blocked = [i for i in node.inputs if i in failures or i in skipped]
            if blocked:
                skipped[nid] = blocked[0] if blocked[0] in failures else skipped[blocked[0]]
                waiting.remove(nid)
            elif all(isinstance(inputs.get(i), NodeResult) for i in node.inputs):
                stage = get_stage(node.kind)  # travels with the task: a stage registered outside the project too
                need = stage.footprint(node, ctx.settings)
                if not admission.fits(need):
                    why = admission.why_waiting(need)
                    show.node(nid, "queued", "" if nid in told else f"waiting {nid}: {why}", why=why)
                    told.add(nid)
                    continue
                admission.admit(nid, need)
                ref = node_task(nid).options(name=task_name(nid), max_retries=stage.retries(node, ctx.settings),
                                   **task_resources(stage, node, ctx.settings)).remote(
                    ctx, node, stage, *[inputs[i] for i in node.inputs])
                pending[ref] = nid
                waiting.remove(nid)
                show.node(nid, "running")
        if not pending:
            break
        # A node waiting for room also waits for the cluster to grow: look again now and then.
        room_wanted = any(n in told for n in waiting)
        done, _ = ray.wait(list(pending), num_returns=1, timeout=ADMISSION_POLL_S if room_wanted else None)
        flush()
        if not done:
            continue
        nid = pending.pop(done[0])
        admission.release(nid)
        try:
            res: NodeResult = ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - reported per node, raised together below
            failures[nid] = brief_error(e, ctx.storage_path)
            show.node(nid, "failed", f"FAILED  {nid}: {failures[nid]}", why=failures[nid])
            continue
        inputs[nid] = result.results[nid] = res
        show.node(nid, "done", _describe(graph.nodes[nid], res))
    for nid, root in skipped.items():
        show.node(nid, "skipped", why=f"input {root} failed")
    for root in dict.fromkeys(skipped.values()):
        show.note(f"skipped {', '.join(n for n, r in skipped.items() if r == root)}: input {root} failed")
    if failures:
        first = next(iter(failures))
        raise StudyFailed(f"{len(failures)} node(s) failed: {', '.join(failures)}"
                          f"{f'; {len(skipped)} skipped' if skipped else ''}; {first}: {failures[first]}")


def run_settings(spec: StudySpec) -> RunSettings:
    """How the study runs (resources, trial concurrency, its name): read from the spec once, never keyed."""
    r = spec.resources
    return RunSettings(study_name=spec.name, num_workers=r.num_workers, use_gpu=r.use_gpu, cpus_per_worker=r.cpus_per_worker,
                       gpus_per_worker=r.gpus_per_worker, max_failures=r.max_failures, torch_threads=r.torch_threads,
                       max_concurrent_trials=spec.search.max_concurrent_trials, admission=r.admission, trainer=r.trainer)


def task_resources(stage: Stage, node: Node, settings: RunSettings) -> dict[str, float]:
    """What a node's Ray task reserves, as its stage kind declares (train and tune only orchestrate:
    Ray Train and Tune reserve their workers' resources; evaluate runs the net in the task)."""
    res = stage.resources(node, settings)
    return {"num_cpus": res.num_cpus} | ({"num_gpus": res.num_gpus} if res.num_gpus else {})


def brief_error(e: BaseException, storage_path: str) -> str:
    """`Type: last line` of a node's error, with Ray's wrapper removed and storage paths made relative."""
    cause = getattr(e, "cause", None) or e
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    text = f"{type(cause).__name__}: {lines[-1].strip() if lines else ''}"
    for prefix in (storage_path.rstrip("/") + "/", str(Path.cwd()) + "/"):
        text = text.replace(prefix, "")
    return text


def _describe(node: Node, res: NodeResult) -> str:
    how = "cached " if res.cached else "done   "
    return f"{how}{node.id:<22} {node.kind:<8} {res.seconds:6.1f}s{get_stage(node.kind).describe(res.summary)}"


def _report_text(c: Any, report_id: str) -> str:
    """The budget tables, then the training-cost table (a report made before it existed has none)."""
    text = _read_text(c, report_id, "budgets.txt").rstrip("\n")
    if any(f.path == "costs.txt" for f in c.list_artifacts(report_id)):
        text += "\n\n" + _read_text(c, report_id, "costs.txt").rstrip("\n")
    return text + "\n"


def _read_text(c: Any, run_id: str, path: str) -> str:
    import mlflow

    with tempfile.TemporaryDirectory() as d:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=d, tracking_uri=c.tracking_uri)
        return Path(local).read_text()


def study_report(run_id: str, tracking_uri: str | None = None) -> tuple[str, dict[str, Any]]:
    """The budget table of a pipeline run (or of a report run) and where its plots are."""
    uri = tracking.resolve_uri(tracking_uri, None)
    with tracking.serve_store(uri, create=False) as http:  # a report never makes a store
        c = tracking.client(http)
        run = c.get_run(run_id)
        report_id = run.data.tags.get("exitflow.report_run", run_id if run.data.tags.get("exitflow.stage") == "report" else None)
        if report_id is None:
            raise ValueError(f"run {run_id} is neither a finished pipeline run nor a report run")
        table = _report_text(c, report_id)
        rep = c.get_run(report_id)
        plots = [f.path for f in c.list_artifacts(report_id) if f.path.endswith(".png")]
        where = {"report_run": report_id, "experiment_id": rep.info.experiment_id, "artifact_uri": rep.info.artifact_uri, "plots": plots}
        where["analyses"] = {
            node: [c.get_run(aid).info.artifact_uri.rstrip("/") + "/" + f.path for f in c.list_artifacts(aid) if f.path.endswith(".png")]
            for node, aid in json.loads(run.data.tags.get(ANALYSIS_RUNS_TAG, "{}")).items()
        }
    return table, where
