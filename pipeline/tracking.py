"""The tracking store: resolve the URI, check the store, make clients, write runs. A local sqlite
store is served over HTTP while a command runs (`pipeline.tracking_server`).

Two commands on one store are two such servers on one file: SQLite serialises their writes
(MLflow waits up to 20 s for the file's lock on every session), which `bench/store_writers.py`
measured to lose nothing. A store that another writer holds locked when a command starts is
waited on for `EXITFLOW_STORE_WAIT_S` seconds (60 by default), saying so, then refused.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient


log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
PARENT_TAG = "mlflow.parentRunId"
# MLflow's store schemes that need a server or database we cannot check from here.
REMOTE_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc", "postgresql", "mysql", "mssql")
SQLITE_MAGIC = b"SQLite format 3\x00"
STORE_WAIT_ENV = "EXITFLOW_STORE_WAIT_S"  # how long a command waits for a store another writer locked
STORE_WAIT_S = 60.0

# Every process that talks to MLflow: no telemetry (it races on an env var when several threads
# log at once, and this is often an offline machine), no per-download progress bar, no
# "View run" URL on every run end: noise in a pipeline of many runs.
CLIENT_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or written."""


def resolve_uri(cli_uri: str | None, spec_uri: str | None) -> str:
    """--tracking-uri, then the spec, then $MLFLOW_TRACKING_URI, then sqlite:///mlflow.db (absolute)."""
    uri = cli_uri or spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri:  # a bare folder means a file store
        uri = Path(uri).resolve().as_uri()
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a resolved `sqlite:///` URI; None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") and uri != "sqlite:///" else None


def store_exists(uri: str) -> bool:
    """False for a local sqlite store whose file is not there (or empty: SQLite's own empty
    database, no MLflow schema yet); True otherwise (a server is asked when it is used)."""
    db = sqlite_file(uri)
    return db is None or (db.is_file() and db.stat().st_size > 0)


def check_store(uri: str) -> None:
    """Fail with TrackingError, writing nothing, when a resolved tracking URI cannot work.

    A sqlite store needs an existing, writable folder and, if the file exists, a writable
    SQLite file (anything else makes `mlflow server` retry for minutes); a file store is
    refused by MLflow 3; an HTTP server must answer; an unknown scheme is refused by MLflow's client.
    """
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme.startswith("sqlite"):
        if not uri.startswith("sqlite:///") or uri == "sqlite:///":
            raise TrackingError(f"tracking store {uri}: a sqlite store needs a file: sqlite:///path/to/mlflow.db")
        db = Path(uri[len("sqlite:///"):])
        folder = db.parent
        if not folder.exists():
            raise TrackingError(f"tracking store {uri}: folder {folder} does not exist")
        if not folder.is_dir():
            raise TrackingError(f"tracking store {uri}: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise TrackingError(f"tracking store {uri}: folder {folder} is not writable")
        if db.exists():
            if not db.is_file():
                raise TrackingError(f"tracking store {uri}: {db} is not a file")
            if not os.access(db, os.R_OK | os.W_OK):
                raise TrackingError(f"tracking store {uri}: {db} is not writable")
            with open(db, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
            if head and head != SQLITE_MAGIC:
                raise TrackingError(f"tracking store {uri}: {db} is not a SQLite database")
    elif scheme == "file":
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
            raise TrackingError(
                f"tracking store {uri}: MLflow 3 refuses file stores; use sqlite:///path/to/mlflow.db "
                "(or set MLFLOW_ALLOW_FILE_STORE=true)"
            )
    elif scheme in ("http", "https"):
        _check_answers(uri)
    elif scheme not in REMOTE_SCHEMES:
        known = ", ".join(("sqlite", "file", *REMOTE_SCHEMES))
        raise TrackingError(f"tracking store {uri}: unknown scheme {scheme!r}; known: {known}")


def _check_answers(uri: str, timeout_s: float = 10.0) -> None:
    """A tracking server must answer, with any status (a proxy's 401 is an answer): MLflow's client
    would otherwise retry every call for minutes before it fails."""
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise TrackingError(f"tracking server {uri} does not answer ({getattr(e, 'reason', e)}): is it running, "
                            "and reachable from where this runs?") from None


def _locked(db: Path, busy_s: float) -> bool:
    """Whether another connection holds a write lock on `db` (waiting up to `busy_s` for it).

    Takes and gives back SQLite's write lock without writing anything (`BEGIN IMMEDIATE`, then
    `ROLLBACK`); opened read-write without create, so it never makes a database."""
    import sqlite3

    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=rw", uri=True, timeout=busy_s, isolation_level=None)
    except sqlite3.OperationalError:
        return False  # not there or not openable: check_store and the server say why
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError as e:
        return "locked" in str(e) or "busy" in str(e)
    finally:
        con.close()


def store_wait_s() -> float:
    """How long a command waits for a store another writer holds locked ($EXITFLOW_STORE_WAIT_S)."""
    raw = os.environ.get(STORE_WAIT_ENV, "")
    try:
        return max(0.0, float(raw)) if raw else STORE_WAIT_S
    except ValueError:
        raise TrackingError(f"{STORE_WAIT_ENV}={raw!r}: expected a number of seconds") from None


def wait_unlocked(uri: str, say: Callable[[str], None]) -> None:
    """Return once no other writer holds the sqlite store `uri` locked; `say` why we wait (one line),
    and give up with a TrackingError after `store_wait_s()`. A writer's lock usually lasts
    milliseconds (another command's server committing): only a lock held past SQLite's own short
    wait is announced."""
    db = sqlite_file(uri)
    if db is None or not store_exists(uri):
        return
    limit = store_wait_s()
    deadline = time.monotonic() + limit  # the stated wait is the whole wait
    if not _locked(db, busy_s=min(1.0, limit)):
        return
    say(f"exitflow: tracking store {uri}: locked by another writer, waiting up to {limit:.0f} s")
    while (left := deadline - time.monotonic()) > 0:
        if not _locked(db, busy_s=min(1.0, left)):
            return
    raise TrackingError(f"tracking store {uri}: still locked by another writer after {limit:.0f} s (a process holding "
                        f"a write transaction open on {db}?); try again once it is done")


def client(uri: str) -> MlflowClient:
    """An MLflow client, with this process set up as CLIENT_ENV says (unless the user chose otherwise)."""
    for k, v in CLIENT_ENV.items():
        os.environ.setdefault(k, v)
    return MlflowClient(tracking_uri=uri)


# The MLflow UI opens an experiment by its kind: without one it may guess GenAI (traces, an
# assistant) and hide the runs; a study's experiment is model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(c: MlflowClient, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, tags=EXPERIMENT_KIND)
        except Exception:  # another process created it between the two calls
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
    for k, v in EXPERIMENT_KIND.items():  # experiments made before exitflow set it
        if exp.tags.get(k) is None:
            c.set_experiment_tag(exp.experiment_id, k, v)
    return exp.experiment_id


def owner_tags() -> dict[str, str]:
    """Which process holds a run open: a later run closes it if that process is gone."""
    return {"exitflow.host": socket.gethostname(), "exitflow.pid": str(os.getpid())}


def set_owner(c: MlflowClient, run_id: str) -> None:
    for k, v in owner_tags().items():
        c.set_tag(run_id, k, v)


def start_run(c: MlflowClient, experiment_id: str, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
    """A run in another process's hierarchy: nesting across processes is the parentRunId tag."""
    tags = dict(tags)
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    return c.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def log_params(c: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(c: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v == v]
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i : i + 1000])


DATA_IDENTITY_TAG = "exitflow.data.identity"  # on a run's dataset input: the whole digest its keys hold
MLFLOW_DIGEST_CHARS = 32  # MLflow keeps at most 36 characters of a dataset's digest
DIGEST_PREFIX = "sha256:"


def log_data_input(c: MlflowClient, run_id: str, data: Any, context: str) -> None:
    """The data set a stage run read, as its MLflow dataset input: named as the spec names it, its
    folder as the source, and its content identity (`data.identity`, which the run's key holds) as
    the digest: its first hex digits there, the whole of it in the input's DATA_IDENTITY_TAG."""
    import hashlib
    import warnings

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    identity = data.identity
    # an identity that is no sha256 (unread data: its path) is hashed into one, to fit MLflow's digest
    hexdigest = identity.removeprefix(DIGEST_PREFIX) if identity.startswith(DIGEST_PREFIX) else hashlib.sha256(identity.encode()).hexdigest()
    if data.root:
        with warnings.catch_warnings():  # MLflow registers its local source twice, and says so
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(data.root)
    else:  # digits: scikit-learn's bundled copy
        source = CodeDatasetSource({"loader": "sklearn.datasets.load_digits"})
    meta = MetaDataset(source, name=data.name, digest=hexdigest[:MLFLOW_DIGEST_CHARS]).to_dict()
    dataset = Dataset(name=meta["name"], digest=meta["digest"], source_type=meta["source_type"], source=meta["source"])
    tags = [InputTag("mlflow.data.context", context), InputTag(DATA_IDENTITY_TAG, identity)]
    for attempt in range(DATASET_ATTEMPTS):
        try:
            c.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])
            return
        except MlflowException:
            # MLflow's store looks the dataset up, then inserts it: two runs logging a new data set at
            # once (a study's first phases start together) race, and one insert breaks the table's
            # uniqueness. Again, it finds the row the other wrote.
            if attempt == DATASET_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


DATASET_ATTEMPTS = 3


def end_run(c: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    c.set_terminated(run_id, status=status)


def find_finished(c: MlflowClient, experiment_id: str, key: str) -> str | None:
    """The newest FINISHED stage run with this cache key, or None."""
    runs = c.search_runs(
        [experiment_id],
        filter_string=f"tags.`exitflow.key` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def find_stale(c: MlflowClient, experiment_id: str, key: str) -> list[str]:
    """RUNNING stage runs with this key (left behind by a killed process)."""
    runs = c.search_runs([experiment_id], filter_string=f"tags.`exitflow.key` = '{key}' and attributes.status = 'RUNNING'")
    return [r.info.run_id for r in runs]


@dataclass(frozen=True)
class MetricsSink:
    """A picklable handle a Train worker (rank 0) uses to log per-epoch metrics to a stage run."""

    tracking_uri: str
    run_id: str

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        if not values:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        client(self.tracking_uri).log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in values.items()])

    def close(self, status: str) -> None:
        """End the run (FINISHED, FAILED, KILLED)."""
        client(self.tracking_uri).set_terminated(self.run_id, status=status)


RUN_STATUS_FINISHED = RunStatus.to_string(RunStatus.FINISHED)
