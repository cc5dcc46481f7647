"""OS file locks: one per cache key, so two concurrent runs on one store never train the same node twice.

The second run blocks on the lock, then finds the first run's finished result in the cache.
The locks are fcntl locks: released by the kernel when their holder dies, so a SIGKILLed run
never leaves a stale lock behind.

They belong to the store, not to a command: every command on one store must find the same
lock, whatever its working directory or Ray storage. A local sqlite store keeps them beside its
file (`<store folder>/.exitflow/locks`). A tracking server's store has no folder here: its locks
live in the Ray storage (`<storage_path>/locks`), which every command and node of a cluster shares
(it must, to resume: a shared mount whose locks hold across machines, NFSv4 or EFS); with object
storage (s3://, gs://) there is no file to lock, so they are per machine (~/.exitflow/locks) and two
commands running one node on two machines at once are not kept apart (README, "A store for a team").
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

STORE_STATE = ".exitflow"  # beside a sqlite store: its key locks (and, by default, its Ray storage)


def lock_dir(tracking_uri: str, storage_path: str) -> Path:
    """Where the key locks of the store at `tracking_uri` live (see the module docstring)."""
    if tracking_uri.startswith("sqlite:///") and tracking_uri != "sqlite:///":
        return Path(tracking_uri[len("sqlite:///"):]).parent / STORE_STATE / "locks"
    base = Path.home() / ".exitflow" if "://" in storage_path else Path(storage_path)
    return base / "locks"


@contextlib.contextmanager
def file_lock(path: Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if need be); log `waiting` if another holder makes us wait."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                log.info(waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


@contextlib.contextmanager
def key_lock(folder: str | Path, key: str) -> Iterator[None]:
    """The lock of one stage's cache key, in the store's lock folder (`lock_dir`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / f"{key}.lock", f"stage {key} is running in another process; waiting for it"):
        yield
