"""One tracking store, many commands: a command that fails writes nothing to the store it was given,
a store another writer holds locked is waited on for a stated time, and concurrent `exitflow run`s of
overlapping studies on one store, from two working directories, train each node once.

Each refusal asserts the exit status (2), the one line that names the problem, and that nothing
was written: no store made, an existing store's folder (its SQLite file included) byte for byte as
it was, no Ray storage or key locks, nothing in the working directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

from exitflow.pipeline.cli import app

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.yaml"
NO_RUN = "0123456789abcdef0123456789abcdef"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder` (hidden ones too), each file with its content's sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def invoke(*args: str) -> tuple[int, list[str], float]:
    """Run an exitflow command in this process: its exit status, its lines (stdout and stderr), seconds taken."""
    start = time.monotonic()
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"exitflow {args[0]} raised {type(result.exception).__name__}: {result.exception}\n{result.output}")
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()], time.monotonic() - start


def refused(*args: str) -> tuple[str, float]:
    """The one line a command refused with (exit 2, no traceback, no Ray), and the seconds it took."""
    code, lines, seconds = invoke(*args)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("exitflow"), lines
    assert not ray.is_initialized()
    return lines[0], seconds


@pytest.fixture(scope="module")
def donor(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An existing sqlite store (made by MLflow's own client: no exitflow file beside it) holding a
    FINISHED train run without a checkpoint; its folder, and that run's id."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("donor")
    c = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = c.create_experiment("donor")
    run = c.create_run(exp, tags={"exitflow.stage": "train"}).info.run_id
    c.set_terminated(run, "FINISHED")
    return folder, run


# ----------------------------------------------------------------------------- a failing command writes nothing


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_start_from_a_run_of_a_store_that_does_not_exist_is_refused_and_makes_no_store(cwd: Path, command: str) -> None:
    line, _ = refused(command, "empty.yaml", "--set", "net.width=8", "--set", f"net.init=runs:/{NO_RUN}")
    assert f"net.init: runs:/{NO_RUN}: no such run" in line and "does not exist yet" in line
    assert sorted(p.name for p in cwd.iterdir()) == ["empty.yaml"]  # no mlflow.db, mlartifacts, .exitflow


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("case", ["unknown run", "run without a checkpoint"])
def test_a_start_from_a_run_the_store_cannot_give_is_refused_writing_nothing(
        cwd: Path, donor: tuple[Path, str], command: str, case: str) -> None:
    folder, no_checkpoint = donor
    run_id = NO_RUN if case == "unknown run" else no_checkpoint
    before = snapshot(folder)
    line, _ = refused(command, "empty.yaml", "--set", "net.width=8", "--set", f"net.init=runs:/{run_id}",
                      "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}")
    assert line.startswith(f"exitflow: net.init: runs:/{run_id}: "), line
    assert (f"no run {run_id} in the tracking store" if case == "unknown run" else "artifact 'checkpoint' is missing") in line
    assert snapshot(folder) == before  # the SQLite file unchanged: no experiment, no run; no file beside it
    assert sorted(p.name for p in cwd.iterdir()) == ["empty.yaml"]


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_variants_start_from_a_run_the_store_lacks_is_refused_naming_the_variant(
        cwd: Path, donor: tuple[Path, str], command: str) -> None:
    folder, _ = donor
    before = snapshot(folder)
    line, _ = refused(command, "empty.yaml", "--set", "net.width=8", "--set", f"compare={{net.init: [runs:/{NO_RUN}]}}",
                      "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}")
    assert line.startswith(f"exitflow: compare net.init=runs:/{NO_RUN}: net.init: runs:/{NO_RUN}: "), line
    assert f"no run {NO_RUN} in the tracking store" in line
    assert snapshot(folder) == before and sorted(p.name for p in cwd.iterdir()) == ["empty.yaml"]


@pytest.mark.parametrize("scheme", ["ray://", ""], ids=["ray-client", "gcs"])
def test_a_cluster_address_that_refuses_connections_fails_fast_writing_nothing(cwd: Path, scheme: str) -> None:
    from exitflow.pipeline.loopback import free_loopback_port

    address = f"{scheme}127.0.0.1:{free_loopback_port()}"  # nothing listens there
    line, _ = refused("run", "empty.yaml", "--set", "net.width=8", "--address", address)
    assert line == f"exitflow: cannot reach the Ray cluster at {address}: Connection refused"  # (it used to linger)
    assert sorted(p.name for p in cwd.iterdir()) == ["empty.yaml"]  # no experiment, no FAILED run, no spec.yaml


@pytest.fixture
def not_ray() -> Iterator[int]:
    """A port that takes connections and closes them, as a server that is no Ray would."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize("scheme", ["ray://", ""], ids=["ray-client", "gcs"])
def test_a_cluster_address_that_is_no_ray_is_refused_in_seconds_writing_nothing(cwd: Path, not_ray: int, scheme: str) -> None:
    address = f"{scheme}127.0.0.1:{not_ray}"  # Ray's own client would wait minutes here (its GCS client: without end)
    line, _ = refused("run", "empty.yaml", "--set", "net.width=8", "--address", address)
    assert line.startswith(f"exitflow: {address} takes connections but is not a Ray cluster"), line
    assert sorted(p.name for p in cwd.iterdir()) == ["empty.yaml"]


def test_a_report_where_there_is_no_store_says_so_and_makes_none(cwd: Path, tmp_path: Path) -> None:
    line, _ = refused("report", NO_RUN)  # the default store: ./mlflow.db
    assert line == f"exitflow report: tracking store sqlite:///{cwd / 'mlflow.db'}: there is no store there ({cwd / 'mlflow.db'} does not exist)"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    line, _ = refused("report", NO_RUN, "--tracking-uri", f"sqlite:///{elsewhere / 'mlflow.db'}")
    assert "there is no store there" in line
    assert sorted(p.name for p in cwd.iterdir()) == ["empty.yaml"] and list(elsewhere.iterdir()) == []


def test_reading_a_study_where_there_is_no_store_makes_none(tmp_path: Path) -> None:
    from exitflow.pipeline.results import open_study
    from exitflow.pipeline.tracking import TrackingError

    with pytest.raises(TrackingError, match="there is no store there"):
        with open_study(NO_RUN, f"sqlite:///{tmp_path / 'mlflow.db'}"):
            pass
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- a store locked by another writer


@pytest.fixture
def locked(donor: tuple[Path, str]) -> Iterator[tuple[Path, sqlite3.Connection]]:
    """The donor store, its SQLite file held locked by another writer (an open exclusive transaction)."""
    folder, _ = donor
    con = sqlite3.connect(folder / "mlflow.db", isolation_level=None, check_same_thread=False)
    con.execute("BEGIN EXCLUSIVE")
    yield folder, con
    con.close()  # an open transaction ends with its connection


WAIT_S = 3


@pytest.mark.parametrize("command", ["run", "report"])
def test_a_locked_store_is_waited_on_for_the_stated_time_then_refused_in_one_line(
        cwd: Path, locked: tuple[Path, sqlite3.Connection], monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    folder, _ = locked
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.setenv("EXITFLOW_STORE_WAIT_S", str(WAIT_S))
    before = snapshot(folder)
    args = ["run", "empty.yaml", "--set", "net.width=8"] if command == "run" else ["report", NO_RUN]
    start = time.monotonic()
    code, lines, _ = invoke(*args, "--tracking-uri", uri)
    waited = time.monotonic() - start
    assert code == 2, lines
    prefix = "exitflow" if command == "run" else "exitflow report"
    assert lines == [f"exitflow: tracking store {uri}: locked by another writer, waiting up to {WAIT_S} s",
                     f"{prefix}: tracking store {uri}: still locked by another writer after {WAIT_S} s (a process holding "
                     f"a write transaction open on {folder / 'mlflow.db'}?); try again once it is done"], lines
    assert waited >= WAIT_S  # the stated wait, then one line (not the server's 24 s and its traceback)
    assert snapshot(folder) == before
    assert sorted(p.name for p in cwd.iterdir()) == ["empty.yaml"]
    assert not ray.is_initialized()


def test_a_store_unlocked_during_the_wait_is_served(locked: tuple[Path, sqlite3.Connection], monkeypatch: pytest.MonkeyPatch) -> None:
    from exitflow.pipeline.tracking import wait_unlocked

    folder, con = locked
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.setenv("EXITFLOW_STORE_WAIT_S", "120")
    said: list[str] = []

    def say(line: str) -> None:  # the command says it waits: then the other writer commits
        said.append(line)
        con.execute("ROLLBACK")

    wait_unlocked(uri, say)  # returns (a TrackingError after 120 s otherwise)
    assert said == [f"exitflow: tracking store {uri}: locked by another writer, waiting up to 120 s"]
    code, lines, _ = invoke("report", NO_RUN, "--tracking-uri", uri)  # served now: refused by the store, not the lock
    assert code == 2 and len(lines) == 1 and NO_RUN in lines[0] and "locked" not in lines[0], lines


# ----------------------------------------------------------------------------- where a store's locks and storage live


def test_key_locks_and_ray_storage_live_beside_a_sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from exitflow.pipeline.locks import lock_dir
    from exitflow.pipeline.runner import storage_path
    from exitflow.pipeline.spec import load_spec

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "team" / "mlflow.db"
    spec = load_spec(None, [])
    assert storage_path(spec, f"sqlite:///{store}") == str(store.parent / ".exitflow" / "ray")
    assert lock_dir(f"sqlite:///{store}", "/anywhere/ray") == store.parent / ".exitflow" / "locks"
    assert storage_path(spec) == str(tmp_path / ".exitflow" / "ray")  # the default store: ./mlflow.db, as before
    # A tracking server: the Ray storage every command of it shares holds the locks (per machine when remote)
    assert storage_path(spec, "http://127.0.0.1:5000") == str(tmp_path / ".exitflow" / "ray")
    assert lock_dir("http://127.0.0.1:5000", "/mnt/shared/ray") == Path("/mnt/shared/ray/locks")
    assert lock_dir("http://127.0.0.1:5000", "s3://bucket/ray") == Path.home() / ".exitflow" / "locks"
    explicit = load_spec(None, [f"tracking.storage_path={tmp_path / 'mine'}"])
    assert storage_path(explicit, f"sqlite:///{store}") == str(tmp_path / "mine")


# ----------------------------------------------------------------------------- many commands, one store

STUDIES = [("a", "[joint,disjoint]"), ("b", "[disjoint,mixed]"), ("a", "[mixed]")]  # (working folder, regimes): P1 shared
P1 = "seed0/P1"
TINY_RUN = ["net.width=8", "evaluation.thresholds=20", "resources.torch_threads=1",
            *[f"phases.{p}.{k}={v}" for p in ("P1", "P2", "P3") for k, v in (("max_epochs", 1), ("patience", 2))]]


def _started(err: Path, node: str) -> bool:
    """Whether the run logging to `err` has listed `node` among the nodes it runs (none of them cached then)."""
    return any(line.startswith("running ") and node in line for line in err.read_text().splitlines())


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_three_runs_of_overlapping_studies_on_one_store_from_two_folders_train_each_node_once(
        ray_address: str, tmp_path: Path) -> None:
    """P1 is held by an earlier command (its key lock, beside the store) while the three start, so
    each of them finds it uncached and must take its lock: one trains it, the other two wait for it and
    reuse it. The disjoint P3 (two studies) and the mixed P2 (two) are raced for as they come."""
    from exitflow.pipeline.graph import build_graph
    from exitflow.pipeline.locks import key_lock
    from exitflow.pipeline.results import open_study
    from exitflow.pipeline.spec import load_spec
    from exitflow.pipeline.tracking import client
    from exitflow.pipeline.tracking_server import serve_store

    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "EXITFLOW_FAULT")}
    env.update(PYTHONUNBUFFERED="1", RAY_TRAIN_METRICS_ENABLED="0")
    studies = [[*TINY_RUN, f"regimes={regimes}"] for _, regimes in STUDIES]
    graphs = [build_graph(load_spec(EXAMPLE, sets)) for sets in studies]
    errs = [tmp_path / f"run-{i}.err" for i in range(len(STUDIES))]
    procs = []
    with key_lock(store / ".exitflow" / "locks", graphs[0].nodes[P1].key):
        for (folder, _), sets, err in zip(STUDIES, studies, errs):
            work = tmp_path / f"work-{folder}"
            work.mkdir(exist_ok=True)
            cmd = [sys.executable, "-m", "exitflow.pipeline.cli", "run", str(EXAMPLE), "--address", ray_address, "--tracking-uri", uri,
                   *[a for s in sets for a in ("--set", s)]]
            with err.with_suffix(".out").open("w") as out, err.open("w") as e:  # files: no pipe fills up and stalls a run
                procs.append(subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=e))
        while not all(_started(err, P1) for err in errs):  # (the test's timeout guards a hang)
            assert all(p.poll() is None for p in procs), [e.read_text()[-2000:] for e in errs]
            time.sleep(1)
    for proc in procs:  # P1 released: each run ends on its own
        proc.wait()
    outs = [(err.with_suffix(".out").read_text(), err.read_text()) for err in errs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    p1_lines = sorted(line.split()[0] for _, err in outs for line in err.splitlines() if line.split()[1:2] == [P1])
    assert p1_lines == ["cached", "cached", "done"], p1_lines  # trained by one, waited for and reused by two

    # Every node of the three studies, by key: each trained (or computed) by exactly one run
    expected = {n.key: n.id for graph in graphs for n in graph.nodes.values()}
    phases = {k for k, nid in expected.items() if nid.rsplit("/", 1)[-1] in ("P1", "P2", "P3")}
    assert len(phases) == 4  # P1 (all three), joint P2, disjoint P3 (two), mixed P2 (two)
    trained = sum(int(re.search(r"(\d+) phases trained", out).group(1)) for out, _ in outs)  # type: ignore[union-attr]
    assert trained == len(phases)
    with serve_store(uri, create=False) as url:
        c = client(url)
        [exp] = [e for e in c.search_experiments() if e.name == "digits-study"]
        runs = c.search_runs([exp.experiment_id], max_results=1000)
        assert {r.info.status for r in runs} == {"FINISHED"}
        per_key = Counter(r.data.tags["exitflow.key"] for r in runs if r.data.tags.get("exitflow.stage") != "pipeline")
        assert per_key == Counter(set(expected)), {expected.get(k, k): n for k, n in per_key.items() if n != 1}
        pipelines = [r.info.run_id for r in runs if r.data.tags.get("exitflow.stage") == "pipeline"]
        assert len(pipelines) == 3
    for pipeline_run in pipelines:  # the store reads back: every study's tables
        with open_study(pipeline_run, uri) as study:
            assert not study.budgets().empty
    # The store's own folder holds the key locks and the Ray storage; the working folders hold nothing
    assert len(list((store / ".exitflow" / "locks").glob("*.lock"))) == len(expected)
    assert {p.name.rsplit("-", 1)[0] for p in (store / ".exitflow" / "ray").iterdir()} == phases
    assert [p.name for p in (tmp_path / "work-a").iterdir()] == [] and [p.name for p in (tmp_path / "work-b").iterdir()] == []
