"""A local sqlite tracking store served over HTTP for the length of a command, and the links to its runs.

Many processes writing one SQLite file hit "database is locked", so for a local sqlite store
`exitflow` starts `mlflow server` on loopback for the duration of a command and every
process (driver, Ray tasks, Train workers) logs over HTTP, exactly as on a cluster. What a store
is and how runs are written to it is `pipeline.tracking`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from exitflow.pipeline.locks import file_lock
from exitflow.pipeline.loopback import free_loopback_port
from exitflow.pipeline.tracking import (CLIENT_ENV, DEFAULT_ARTIFACTS, TrackingError, check_store, sqlite_file, store_exists,
                                        wait_unlocked)

log = logging.getLogger(__name__)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TrackingError(f"mlflow server exited with {proc.returncode}: {_last_error(log_path)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    _stop(proc)
    raise TrackingError(f"mlflow server did not become healthy in {timeout:.0f}s: {_last_error(log_path)}")


def _last_error(log_path: Path) -> str:
    """The server's own error, as one line: the last line of its log that is not blank (the
    exception of a traceback); the terminal shows exitflow's lines, not MLflow's tracebacks."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    last = next((line for line in reversed(lines) if not line.startswith(("(Background on this error", "[SQL:"))), "")
    return last[:300] or "no output"


# MLflow 3's UI opens in its GenAI mode (traces, an assistant) whatever the experiment's kind; the
# mode comes from this URL parameter (or the browser's last choice), so links to a study's runs carry it.
RUNS_VIEW = "workflowType=machine_learning"


def runs_links(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 120.0) -> list[tuple[str, str]]:
    """(experiment, link to its runs in the UI) for each experiment of the server at `url`, the most
    recently updated first, once it answers; [] if it does not within `timeout` (or `proc` exits)."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url + "/ajax-api/2.0/mlflow/experiments/search", method="POST",
                                     data=json.dumps({"max_results": 50, "order_by": ["last_update_time DESC"]}).encode(),
                                     headers={"Content-Type": "application/json"})
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                experiments = json.load(r).get("experiments", [])
        except (OSError, ValueError):
            time.sleep(0.5)
            continue
        return [(e["name"], f"{url}/#/experiments/{e['experiment_id']}/runs?{RUNS_VIEW}") for e in experiments]
    return []


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and its worker processes (its own session: signal the whole group)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _start_lock(db: Path) -> contextlib.AbstractContextManager[None]:
    """Held while a server starts on `db`: two commands starting servers on one new store would both
    create its schema, so one at a time. A store that exists (and that no command is creating: its
    lock file was made before it) needs none, and gets no lock file: a command that fails on it
    leaves its folder as it was."""
    lock = db.parent / f".{db.name}.start.lock"
    if store_exists(f"sqlite:///{db}") and not lock.exists():  # in this order: the lock file comes first
        return contextlib.nullcontext()
    return file_lock(lock)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def serve_store(uri: str, artifacts_dir: Path | None = None, port: int | None = None, timeout: float = 90.0,
                create: bool = True, say: Callable[[str], None] = _stderr) -> Iterator[str]:
    """Yield an HTTP tracking URI for `uri`: sqlite is served on loopback, anything else passes through.

    `create=False`: a sqlite store that does not exist yet is a TrackingError, not a new store (the
    commands that only read). A store another writer holds locked is waited on (`wait_unlocked`)."""
    if not uri.startswith("sqlite:"):
        yield uri
        return
    check_store(uri)
    if not create and not store_exists(uri):
        raise TrackingError(f"tracking store {uri}: there is no store there ({sqlite_file(uri)} does not exist)")
    wait_unlocked(uri, say)
    db = Path(uri[len("sqlite:///"):])
    artifacts = (artifacts_dir or db.parent / DEFAULT_ARTIFACTS).resolve()  # the server makes it at its first upload
    port = port or free_loopback_port()
    fd, name = tempfile.mkstemp(prefix=f"exitflow-mlflow-{port}-", suffix=".log")
    log_path = Path(name)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", uri,
        "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",  # one process: SQLite sees a single writer
    ]
    # MLflow's job runner (GenAI jobs, trace rollups) is unused here and costs 8 processes.
    env = {**os.environ, **CLIENT_ENV, "MLFLOW_TRACKING_URI": uri, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # The guard takes the server down if this process dies without a chance to (SIGKILL).
    guarded = [sys.executable, "-m", "exitflow.pipeline.store_guard", str(os.getpid()), "--", *cmd]
    url = f"http://127.0.0.1:{port}"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with _start_lock(db):
            with os.fdopen(fd, "wb") as out:
                proc = subprocess.Popen(guarded, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            _wait_healthy(url, proc, timeout, log_path)
        log.info("tracking store %s served at %s", uri, url)
        yield url
    finally:
        if proc is not None:
            _stop(proc)
        with contextlib.suppress(FileNotFoundError):
            log_path.unlink()
