"""Typed artifacts <-> MLflow: each kind has one writer and one reader that checks it.

Every file written is hashed (sha256) and the hash recorded as a tag on the stage's run, so
a reader refuses a missing, truncated or altered artifact with a clear error instead of
handing the next stage garbage (`ArtifactError`; the runner then re-runs the producer).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from mlflow.tracking import MlflowClient

from exitflow.pipeline.stage import TableKind, table_kind
from exitflow.stages.core import faults
from exitflow.stages.core.state_hash import state_dict_hash
from exitflow.stages.core.tensor_file import UnreadableTensors, load_tensors

log = logging.getLogger(__name__)

HASH_TAG = "exitflow.sha256."  # + artifact path, e.g. exitflow.sha256.checkpoint/model.pt


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupted or does not match its kind's schema."""


CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILES = ("model.pt", "spec.json")


@dataclass(frozen=True)
class ArtifactRef:
    """Where a stage's outputs live: results pass between stages as references, never pickled models."""

    run_id: str
    path: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def table_json(table: pa.Table) -> str:
    """A table as MLflow's table artifacts are (pandas' "split" orient: columns, data), values at full
    precision; NaN as null, which JSON has and the UI reads."""
    def plain(v: Any) -> Any:
        return None if isinstance(v, float) and math.isnan(v) else v

    rows = [[plain(v) for v in row.values()] for row in table.to_pylist()]
    return json.dumps({"columns": table.column_names, "data": rows}, default=str)


class ArtifactStore:
    """Load / save / exists / describe for typed artifacts, MLflow as the implementation."""

    def __init__(self, client: MlflowClient, fault_plan: faults.Plan = ()) -> None:
        self.client = client
        self.fault_plan = fault_plan  # a fault-injection test's kill point inside uploads

    # ------------------------------------------------------------------ writing
    def _log_dir(self, run_id: str, local_dir: Path, artifact_path: str | None) -> None:
        """Hash, then upload, every file of `local_dir`, one by one (a fault hook sits after the first)."""
        for i, f in enumerate(sorted(p for p in local_dir.rglob("*") if p.is_file())):
            rel = f.relative_to(local_dir)
            full = f"{artifact_path}/{rel.as_posix()}" if artifact_path else rel.as_posix()
            self.client.set_tag(run_id, HASH_TAG + full, sha256_file(f))
            folder = "/".join(p for p in (artifact_path, rel.parent.as_posix()) if p and p != ".")
            self.client.log_artifact(run_id, str(f), folder or None)
            if i == 0:
                faults.hit(self.fault_plan, "upload", path=full)

    def save_table(self, run_id: str, kind: str | TableKind, table: pa.Table, metadata: dict[str, str] | None = None) -> ArtifactRef:
        """`kind`: a table kind's name, or the writer stage's own TableKind (its schema)."""
        spec = kind if isinstance(kind, TableKind) else table_kind(kind)
        kind = spec.name
        missing = [c for c in spec.columns if c not in table.column_names]
        if missing:
            raise ArtifactError(f"{kind}: table lacks columns {missing}")
        if metadata:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in metadata.items()}})
        with tempfile.TemporaryDirectory() as d:
            pq.write_table(table, Path(d) / spec.path)
            if spec.ui:
                view = Path(spec.path).with_suffix(".json").as_posix()
                (Path(d) / view).write_text(table_json(table))
            self._log_dir(run_id, Path(d), None)
        if spec.ui:
            self._mark_ui_table(run_id, view)
        return ArtifactRef(run_id, spec.path)

    def _mark_ui_table(self, run_id: str, path: str) -> None:
        """List `path` among the run's table artifacts, as mlflow.log_table does, so the UI renders it."""
        tag = "mlflow.loggedArtifacts"
        listed = json.loads(self.client.get_run(run_id).data.tags.get(tag, "[]"))
        entry = {"path": path, "type": "table"}
        if entry not in listed:
            self.client.set_tag(run_id, tag, json.dumps([*listed, entry]))

    def save_checkpoint(self, run_id: str, state_dict: dict[str, torch.Tensor], spec: dict[str, Any]) -> ArtifactRef:
        """`checkpoint/`: model.pt (unwrapped state_dict) + spec.json (rebuilds the net)."""
        if "net" not in spec:
            raise ArtifactError("checkpoint spec.json needs a 'net' entry (NetSpec.to_dict())")
        spec = {**spec, "state_sha256": state_dict_hash(state_dict)}
        with tempfile.TemporaryDirectory() as d:
            torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, Path(d) / "model.pt")
            (Path(d) / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
            self._log_dir(run_id, Path(d), CHECKPOINT_DIR)
        return ArtifactRef(run_id, CHECKPOINT_DIR)

    def save_file(self, run_id: str, local_path: Path, artifact_path: str | None = None) -> ArtifactRef:
        """A plain file (plots, the resolved spec); hashed like the rest."""
        full = f"{artifact_path}/{local_path.name}" if artifact_path else local_path.name
        self.client.set_tag(run_id, HASH_TAG + full, sha256_file(local_path))
        self.client.log_artifact(run_id, str(local_path), artifact_path)
        return ArtifactRef(run_id, full)

    # ------------------------------------------------------------------ reading
    def _download(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_path, dst_path=str(dst), tracking_uri=self.client.tracking_uri
            )
        except Exception as e:  # MLflow raises several types for "not there"
            raise ArtifactError(f"run {run_id}: artifact {artifact_path!r} is missing ({type(e).__name__}: {e})") from None
        return Path(local)

    def _verify(self, run_id: str, artifact_path: str, local: Path, hashes: dict[str, str] | None = None) -> None:
        """`local` against the hash recorded for `artifact_path` (`hashes`: the run's, read once by a caller checking several)."""
        expected = (self.describe(run_id) if hashes is None else hashes).get(artifact_path)
        if expected is None:
            raise ArtifactError(f"run {run_id}: no recorded hash for {artifact_path!r}; refusing an unverifiable artifact")
        if not local.is_file():
            raise ArtifactError(f"run {run_id}: artifact {artifact_path!r} is missing")
        actual = sha256_file(local)
        if actual != expected:
            raise ArtifactError(f"run {run_id}: artifact {artifact_path!r} is corrupted (sha256 {actual[:12]} != recorded {expected[:12]})")

    def load_file(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        """A plain file saved with `save_file`, downloaded into `dst` and verified against its hash."""
        local = self._download(run_id, artifact_path, dst)
        self._verify(run_id, artifact_path, local)
        return local

    def load_table(self, run_id: str, kind: str) -> pa.Table:
        spec = table_kind(kind)  # its schema, declared by the stage kind that writes it
        with tempfile.TemporaryDirectory() as d:
            local = self._download(run_id, spec.path, Path(d))
            self._verify(run_id, spec.path, local)
            try:
                table = pq.read_table(local)
            except Exception as e:
                raise ArtifactError(f"run {run_id}: {spec.path} is not a readable Parquet file ({e})") from None
        missing = [c for c in spec.columns if c not in table.column_names]
        if missing:
            raise ArtifactError(f"run {run_id}: {spec.path} lacks columns {missing}")
        return table

    def load_checkpoint(self, run_id: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(state_dict, spec) of a `checkpoint/` artifact, verified file by file."""
        with tempfile.TemporaryDirectory() as d:
            local = self._download(run_id, CHECKPOINT_DIR, Path(d))
            hashes = self.describe(run_id)
            for name in CHECKPOINT_FILES:
                self._verify(run_id, f"{CHECKPOINT_DIR}/{name}", local / name, hashes)
            try:
                spec = json.loads((local / "spec.json").read_text())
            except (ValueError, OSError) as e:
                raise ArtifactError(f"run {run_id}: checkpoint/spec.json unreadable ({type(e).__name__}: {e})") from None
            try:
                state = load_tensors(io.BytesIO((local / "model.pt").read_bytes()))
            except UnreadableTensors as e:  # its reason, never torch's advice to load it unsafely
                raise ArtifactError(f"run {run_id}: checkpoint/model.pt cannot be read: {e}") from None
        if "net" not in spec:
            raise ArtifactError(f"run {run_id}: checkpoint/spec.json has no 'net' entry")
        return state, spec

    def exists(self, run_id: str, artifact_path: str) -> bool:
        parent = artifact_path.rpartition("/")[0]
        try:
            listing = self.client.list_artifacts(run_id, parent or None)
        except Exception:
            return False
        return any(f.path == artifact_path for f in listing)

    def describe(self, run_id: str) -> dict[str, str]:
        """Artifact path -> recorded sha256, for a run."""
        tags = self.client.get_run(run_id).data.tags
        return {k[len(HASH_TAG):]: v for k, v in tags.items() if k.startswith(HASH_TAG)}

    def verify_all(self, run_id: str) -> None:
        """Download and check every hashed artifact of a run (cache hits are verified this way)."""
        hashes = self.describe(run_id)
        with tempfile.TemporaryDirectory() as d:
            for path in hashes:
                local = self._download(run_id, path, Path(d))
                self._verify(run_id, path, local, hashes)
