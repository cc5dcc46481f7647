"""One lock per cache key, so two concurrent runs of a study never train the same node twice.

The second run blocks on the lock, then finds the first run's finished result in the cache.
It is an OS file lock (fcntl) in the Ray storage folder: released by the kernel when its
holder dies, so a SIGKILLed run never leaves a stale lock behind. With remote storage
(s3://, gs://) the lock folder is per machine (~/.exitflow/locks).
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
def key_lock(storage_path: str, key: str) -> Iterator[None]:
    folder = lock_dir(storage_path)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("stage %s is running in another process; waiting for it", key)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
