"""A phase's checkpoints in Ray storage, written by the process that trains it.

Ray Train keeps a fit's checkpoints itself; a phase trained in its own stage's process (one worker,
`resources.trainer: auto`: `stages.ray_train.fit_in_this_process`) keeps them here, in the same place
and the same form: `<storage>/<run name>/checkpoint_<UTC time>/` holding `state.pt` and
`progress.json`, names that sort by time like Train's: a phase trained in process resumes from
the newest of either kind; Ray Train resumes only from its own (its snapshot lists them), so a
phase switched to `trainer: ray_train` mid-way starts afresh.

A checkpoint is whole once its `progress.json` exists: it is written last, under a temporary
name and then moved, so a process killed mid-save leaves a folder that is never read. The two
newest whole checkpoints are kept. Storage may be local or a URI (s3://, gs://).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.fs
import torch

from exitflow.stages.core.tensor_file import UnreadableTensors, load_tensors

STATE_FILE = "state.pt"  # the full resumable state (net, optimizer, schedule, early stopping, history)


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that does not load as tensors and plain values (corrupt, or crafted to run code)."""


def read_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state file, loaded as tensors and plain values only (`load_tensors`), so a file
    someone with write access to the storage replaced cannot run code in the process that resumes
    (the storage of a cluster is shared). Anything else raises UnreadableCheckpoint."""
    try:
        state = load_tensors(path)
    except UnreadableTensors as e:
        raise UnreadableCheckpoint(f"{Path(path).name} cannot be read as a checkpoint: {e}") from None
    if not isinstance(state, dict):
        raise UnreadableCheckpoint(f"{Path(path).name} holds a {type(state).__name__}, not a phase's state")
    return state
PROGRESS_FILE = "progress.json"  # beside it: history and early stopping, small enough to read for every trial
KEEP = 2  # whole checkpoints kept per run, as Ray Train is told to keep (CheckpointConfig(num_to_keep=2))


def storage_location(storage_path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The storage's filesystem, and `storage_path` as a path of it (a URI's bucket and prefix; a local path absolute)."""
    if "://" in storage_path:
        fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        return fs, root.rstrip("/")
    return pyarrow.fs.LocalFileSystem(), str(Path(storage_path).resolve())


def storage_fs(storage_path: str) -> pyarrow.fs.FileSystem:
    return storage_location(storage_path)[0]


def is_whole(fs: pyarrow.fs.FileSystem, path: str) -> bool:
    infos = fs.get_file_info([f"{path}/{STATE_FILE}", f"{path}/{PROGRESS_FILE}"])
    return all(i.type == pyarrow.fs.FileType.File for i in infos)


def whole_checkpoints(fs: pyarrow.fs.FileSystem, run_dir: str) -> list[str]:
    """The run's whole checkpoints, oldest first (their names sort by time)."""
    found = fs.get_file_info(pyarrow.fs.FileSelector(run_dir, allow_not_found=True))
    return sorted(i.path for i in found if i.type == pyarrow.fs.FileType.Directory
                  and i.base_name.startswith("checkpoint_") and is_whole(fs, i.path))


def local_copy(path: str, storage_path: str) -> Any:
    """A checkpoint as a local directory (a context manager): itself on local storage, else a download."""
    if "://" not in storage_path:
        return contextlib.nullcontext(path)
    from ray.train import Checkpoint  # only for a remote storage: its download

    return Checkpoint(path=path, filesystem=storage_fs(storage_path)).as_directory()


def progress_of(state: dict[str, Any]) -> dict[str, Any]:
    """What `progress.json` holds: a checkpoint's history and early stopping, without the model."""
    return {"history": state["history"], "early_stopping": state["early_stopping"],
            "max_epochs": state["config"]["max_epochs"]}


def write_checkpoint(state: dict[str, Any], folder: Path) -> None:
    """A checkpoint's two files in a local folder: what Train uploads, and what the store uploads."""
    torch.save(state, folder / STATE_FILE)
    (folder / PROGRESS_FILE).write_text(json.dumps(progress_of(state), default=float))


class CheckpointStore:
    """The checkpoints of one run (a phase, or one trial of a search) under `storage_path/name`."""

    def __init__(self, storage_path: str, name: str) -> None:
        self.storage_path = storage_path
        self.fs, root = storage_location(storage_path)
        self.run_dir = f"{root}/{name}"

    def latest(self) -> str | None:
        """The newest whole checkpoint, or None."""
        whole = whole_checkpoints(self.fs, self.run_dir)
        return whole[-1] if whole else None

    def load(self, path: str) -> dict[str, Any]:
        with local_copy(path, self.storage_path) as d:
            return read_state(Path(d) / STATE_FILE)

    def save(self, state: dict[str, Any]) -> str:
        """Write a new checkpoint of `state`; returns its path once whole. Older ones beyond KEEP go."""
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S.%f")
        path = f"{self.run_dir}/checkpoint_{stamp}"
        self.fs.create_dir(path)
        with tempfile.TemporaryDirectory() as d:
            local = Path(d)
            write_checkpoint(state, local)
            self._upload(local / STATE_FILE, f"{path}/{STATE_FILE}")
            self._upload(local / PROGRESS_FILE, f"{path}/{PROGRESS_FILE}.partial")
        self.fs.move(f"{path}/{PROGRESS_FILE}.partial", f"{path}/{PROGRESS_FILE}")  # now whole
        self._prune(keep=path)
        return path

    def _upload(self, local: Path, dest: str) -> None:
        with local.open("rb") as src, self.fs.open_output_stream(dest) as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)

    def _prune(self, keep: str) -> None:
        """Remove what is older than the KEEP newest whole checkpoints, and older unfinished saves."""
        whole = whole_checkpoints(self.fs, self.run_dir)
        if keep not in whole[-KEEP:]:
            return
        oldest_kept = whole[-KEEP:][0]
        found = self.fs.get_file_info(pyarrow.fs.FileSelector(self.run_dir, allow_not_found=True))
        for i in found:
            if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_") and i.path < oldest_kept:
                with contextlib.suppress(OSError):
                    self.fs.delete_dir(i.path)
