"""A real two-node Ray cluster on this machine: `exitflow submit --wait` of the digits study to it, and of
examples/custom_backbone (a backbone module of the user's, shipped to the workers by Ray),
and the submit errors only a cluster shows (its token refused, a tracking server it cannot reach).

Two `ray start` nodes on 127.0.0.1 (a head and a worker, each with its own ports and temp dir, one
logical CPU each, so two phases at once need both), token authentication on as `cluster/README.md`
sets it up (one token, in every node's and client's environment), the suite's MLflow server as the
tracking server. The test asserts that the job succeeded, that the store holds the whole DAG with
its artifacts, and that phases trained on both nodes. Every process it starts is stopped by its id
at the end, also when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import TINY, descendants, free_port

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.yaml"
NAME = "two-node-study"
# joint + disjoint: P1 and joint/P2 are ready at once, and with one CPU per node they train on both.
STUDY = [*TINY, f"name={NAME}", "regimes=[joint,disjoint]",
         *[f"phases.{p}.{k}={v}" for p in ("P1", "P2", "P3") for k, v in (("max_epochs", 1), ("patience", 2))]]
START_LIMIT_S = 180  # a node's start, on a loaded 2-core machine


@dataclass
class Cluster:
    env: dict[str, str]  # what every node and client of the cluster runs with (the token included)
    gcs: str
    dashboard: str
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)  # every process the nodes started, as last seen

    def start_node(self, temp_dir: Path, log: Path, *args: str) -> None:
        ports = {flag: free_port() for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                                 "--runtime-env-agent-port", "--metrics-export-port",
                                                 "--node-manager-port", "--object-manager-port")}
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
               f"--temp-dir={temp_dir}", "--disable-usage-stats", *[f"{k}={v}" for k, v in ports.items()], *args]
        with log.open("wb") as out:
            self.nodes.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    def track(self) -> None:
        """Remember the nodes' processes: their descendants, and any process holding the cluster's
        token (one whose parent died is no descendant any more)."""
        for node in self.nodes:
            self.seen |= descendants(node.pid)
        self.seen |= {int(p.name) for p in Path("/proc").glob("[0-9]*") if self.ours(int(p.name))}

    def ours(self, pid: int) -> bool:
        """Whether `pid` is still a process of this cluster (alive, holding its token), not another
        process that got a recycled id."""
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return _alive(pid) and f"RAY_AUTH_TOKEN={self.env['RAY_AUTH_TOKEN']}".encode() in environ.split(b"\0")

    def stop(self) -> None:
        """Stop every process the nodes started, by its id: SIGTERM (Ray's processes shut down on it),
        then SIGKILL for any still there after 15 s."""
        self.track()
        for sig, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            for pid in [p for p in self.seen if self.ours(p)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace_s
            while any(self.ours(p) for p in self.seen) and time.monotonic() < deadline:
                time.sleep(0.5)
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=5)  # reaped: no zombie left behind


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited already; its parent reaps it


def _wait_for(what: str, ready: Callable[[], bool], limit_s: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + limit_s
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready in {limit_s:.0f} s:\n" + "\n".join(p.read_text()[-2000:] for p in logs))
        time.sleep(1)


def _alive_nodes(c: Cluster) -> int:
    """How many nodes the cluster's state API counts alive (asked with the cluster's token); 0 while
    its dashboard does not answer yet."""
    request = urllib.request.Request(f"{c.dashboard}/api/v0/nodes?limit=100",
                                     headers={"Authorization": f"Bearer {c.env['RAY_AUTH_TOKEN']}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            nodes = json.load(response)["data"]["result"]["result"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return sum(n.get("state") == "ALIVE" for n in nodes)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="xf-", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    bin_dir = str(Path(sys.executable).parent)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), PYTHONUNBUFFERED="1",
               PATH=f"{bin_dir}:{env.get('PATH', '')}",  # the job's `exitflow` is this environment's
               GLOO_SOCKET_IFNAME="lo")  # both nodes share this machine's loopback
    gcs_port, dash_port = free_port(), free_port()
    c = Cluster(env, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}")
    logs = [root / "head.log", root / "worker.log"]
    try:
        c.start_node(root / "head", logs[0], "--head", f"--port={gcs_port}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--ray-client-server-port={free_port()}")
        _wait_for("the head", lambda: _alive_nodes(c) == 1, START_LIMIT_S, logs)
        c.start_node(root / "worker", logs[1], f"--address={c.gcs}")
        _wait_for("the worker node", lambda: _alive_nodes(c) == 2, START_LIMIT_S, logs)
        c.track()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def submitted(cluster: Cluster, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """`exitflow submit --wait` from a working directory holding only the spec (the upload)."""
    work = tmp_path_factory.mktemp("submit")
    shutil.copy(EXAMPLE, work / "digits.yaml")
    storage = tmp_path_factory.mktemp("cluster-storage")  # one file system: every node sees it
    sets = [*STUDY, f"tracking.storage_path={storage}"]
    cmd = [sys.executable, "-m", "exitflow.pipeline.cli", "submit", "digits.yaml", "--address", cluster.dashboard,
           "--tracking-uri", mlflow_uri, "--wait", *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(cmd, cwd=work, env=cluster.env, capture_output=True, text=True, timeout=720)
    cluster.track()
    return done


def test_the_submitted_study_succeeds_on_the_cluster(submitted: subprocess.CompletedProcess[str]) -> None:
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "submitted raysubmit_" in submitted.stdout
    assert "SUCCEEDED" in submitted.stderr
    assert "test accuracy (%)" in submitted.stdout  # the job's own output, streamed: the budget table
    assert "Authentication token is missing or incorrect" not in submitted.stdout + submitted.stderr


def test_the_store_holds_the_whole_dag_with_its_artifacts(submitted: subprocess.CompletedProcess[str], mlflow_uri: str) -> None:
    from exitflow.pipeline.artifacts import ArtifactStore

    c = MlflowClient(mlflow_uri)
    experiment = c.get_experiment_by_name(NAME)
    runs = c.search_runs([experiment.experiment_id], max_results=1000)
    by_node = {r.data.tags["exitflow.node"]: r for r in runs if "exitflow.node" in r.data.tags}
    assert set(by_node) >= {"seed0/P1", "seed0/joint/P2", "seed0/disjoint/P3", "seed0/joint/evaluate",
                            "seed0/disjoint/evaluate", "report"}
    assert {r.info.status for r in runs} == {"FINISHED"}
    [pipeline] = [r for r in runs if r.data.tags.get("exitflow.stage") == "pipeline"]
    assert all(r.data.tags.get("mlflow.parentRunId") == pipeline.info.run_id for r in by_node.values())
    store = ArtifactStore(c)
    for node in ("seed0/P1", "seed0/joint/P2", "seed0/disjoint/P3"):
        state, spec = store.load_checkpoint(by_node[node].info.run_id)  # verified against its recorded hash
        assert state and spec["phase"] == node.rsplit("/", 1)[1]
    assert store.load_table(by_node["report"].info.run_id, "budgets").num_rows > 0


def test_phases_trained_on_both_nodes(submitted: subprocess.CompletedProcess[str], mlflow_uri: str) -> None:
    from exitflow.stages.phase_kind import RAY_NODES_TAG

    c = MlflowClient(mlflow_uri)
    experiment = c.get_experiment_by_name(NAME)
    phases = [r for r in c.search_runs([experiment.experiment_id], max_results=1000) if r.data.tags.get("exitflow.stage") == "train"]
    nodes = {n for r in phases for n in r.data.tags[RAY_NODES_TAG].split(",")}
    assert len(phases) == 3 and len(nodes) == 2, {r.data.tags["exitflow.node"]: r.data.tags[RAY_NODES_TAG] for r in phases}


CUSTOM = Path(__file__).resolve().parents[1] / "examples" / "custom_backbone"
CUSTOM_NAME = "two-node-custom-backbone"


@pytest.fixture(scope="module")
def submitted_custom(cluster: Cluster, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """examples/custom_backbone submitted from the folder above it: its my_backbone.py is installed on no node
    and the spec's folder is a subfolder of the job's working directory, so the workers import it only as the
    job's `exitflow run` ships it (Ray's py_modules)."""
    work = tmp_path_factory.mktemp("submit-custom")
    shutil.copytree(CUSTOM, work / "custom_backbone", ignore=shutil.ignore_patterns("__pycache__"))
    storage = tmp_path_factory.mktemp("cluster-storage-custom")
    sets = [f"name={CUSTOM_NAME}", "regimes=[joint,disjoint]", f"tracking.storage_path={storage}"]
    cmd = [sys.executable, "-m", "exitflow.pipeline.cli", "submit", "custom_backbone/study.yaml", "--address", cluster.dashboard,
           "--tracking-uri", mlflow_uri, "--wait", *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(cmd, cwd=work, env=cluster.env, capture_output=True, text=True, timeout=720)
    cluster.track()
    return done


def test_a_backbone_of_the_users_travels_with_the_submitted_study(submitted_custom: subprocess.CompletedProcess[str],
                                                                  mlflow_uri: str) -> None:
    from exitflow.pipeline.artifacts import ArtifactStore
    from exitflow.stages.phase_kind import RAY_NODES_TAG

    assert submitted_custom.returncode == 0, submitted_custom.stdout[-3000:] + submitted_custom.stderr[-3000:]
    assert "test accuracy (%)" in submitted_custom.stdout
    c = MlflowClient(mlflow_uri)
    experiment = c.get_experiment_by_name(CUSTOM_NAME)
    phases = [r for r in c.search_runs([experiment.experiment_id], max_results=1000) if r.data.tags.get("exitflow.stage") == "train"]
    nodes = {n for r in phases for n in r.data.tags[RAY_NODES_TAG].split(",")}
    assert len(phases) == 3 and len(nodes) == 2  # both nodes imported my_backbone
    _, spec = ArtifactStore(c).load_checkpoint(phases[0].info.run_id)
    assert spec["net"]["backbone"] == "my_backbone:build"


def _submit(cluster: Cluster, work: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    shutil.copy(EXAMPLE, work / "digits.yaml")
    cmd = [sys.executable, "-m", "exitflow.pipeline.cli", "submit", "digits.yaml", "--address", cluster.dashboard, *args]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("token", ["another token", "none"])
def test_a_client_without_the_clusters_token_exits_2_saying_what_to_set(cluster: Cluster, tmp_path: Path, token: str) -> None:
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    if token == "another token":
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    done = _submit(cluster, tmp_path, env, "--tracking-uri", "http://127.0.0.1:5000")
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"the Ray cluster at {cluster.dashboard} refused this client" in done.stderr
    assert "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in done.stderr and "Traceback" not in done.stderr


def test_a_tracking_server_the_cluster_cannot_reach_fails_the_job_with_exit_2_and_the_reason(cluster: Cluster, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = _submit(cluster, tmp_path, cluster.env, "--tracking-uri", closed, "--wait", *[a for s in STUDY for a in ("--set", s)])
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"tracking server {closed} does not answer" in done.stdout  # the job's own output, streamed
    assert "FAILED" in done.stderr and "Traceback" not in done.stdout + done.stderr


def test_every_process_the_cluster_started_is_stopped_by_its_id(cluster: Cluster) -> None:
    """(Runs last in this module, before the fixture's own stop, which repeats it for a failed run.)"""
    cluster.track()
    assert len(cluster.seen) > 4  # the two `ray start`s, their GCS, raylets, dashboard...
    cluster.stop()
    assert [pid for pid in cluster.seen if cluster.ours(pid)] == []
    assert all(node.poll() is not None for node in cluster.nodes)
