"""OS file locks: one per cache key, so two concurrent runs of a study never train the same node twice.

The second run blocks on the lock, then finds the first run's finished result in the cache.
The locks are fcntl locks: released by the kernel when their holder dies, so a SIGKILLed run
never leaves a stale lock behind. Key locks live in the Ray storage folder; with remote
storage (s3://, gs://) the lock folder is per machine (~/.exitflow/locks).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def lock_dir(storage_path: str) -> Path:
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
def key_lock(storage_path: str, key: str) -> Iterator[None]:
    """The lock of one stage's cache key."""
    folder = lock_dir(storage_path)
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / f"{key}.lock", f"stage {key} is running in another process; waiting for it"):
        yield
