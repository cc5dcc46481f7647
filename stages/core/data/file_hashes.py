"""sha256 of files, kept by (absolute path, size, mtime_ns): a second look at an unchanged file is a stat.

A data set's identity (`identity.py`) hashes every file it is read from; a study computes it
before each `plan` and `run`, so after the first time it must cost no more than listing the
files. The hashes of one data set's files are kept in one small JSON file under the cache folder
(`memo.cache_root()`: $EXITFLOW_CACHE_DIR, $XDG_CACHE_HOME/exitflow or ~/.cache/exitflow; "off"
keeps nothing), written atomically; a file that cannot be read (torn, foreign) is ignored and
the hashes are computed again.

A kept hash is used only while the file's size and mtime_ns are unchanged. A file modified in the
last RACY_SECONDS is hashed but not kept: a filesystem's clock ticks coarser than a nanosecond, so
a second write within the same tick can leave size and mtime as they were (git's "racily clean"
entries). Touching a file without changing it only costs its hash being computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exitflow.stages.core.data.memo import cache_root

log = logging.getLogger(__name__)

HASHES_VERSION = 1  # bump when what a kept entry means changes
RACY_SECONDS = 2.0
BLOCK = 1 << 20
HASH_THREADS = 8  # hashlib releases the GIL on large blocks: threads overlap reads with hashing
HASH_CHUNK = 64  # files per thread task


@dataclass(frozen=True)
class HashedFile:
    """One file's content hash, as read (or kept) now."""

    path: str  # absolute
    size: int
    sha256: str  # hex
    kept: bool  # True: from the kept hashes (unchanged since), False: read now


def file_sha256(path: str) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_files(paths: Sequence[str | Path], scope: str) -> list[HashedFile]:
    """Each file's sha256, in order: kept ones where size and mtime_ns match, the rest read now.

    `scope` names the set of files (a data set and its folder): its kept hashes are one JSON file,
    rewritten with exactly these files' entries whenever one was read. Paths are handled as strings:
    pathlib's parsing cost more than the stats on a folder of 10k images."""
    store = _store_path(scope)
    kept = _read(store) if store is not None else {}
    now = time.time()
    absolute = [os.path.abspath(p) for p in paths]
    stats = [os.stat(p) for p in absolute]  # FileNotFoundError, PermissionError: the caller names the data set
    out: list[HashedFile | None] = [None] * len(paths)
    todo = []
    for i, (path, st) in enumerate(zip(absolute, stats)):
        entry = kept.get(path)
        if entry is not None and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            out[i] = HashedFile(path, st.st_size, entry[2], True)
        else:
            todo.append(i)
    if todo:
        # in chunks: a task per small image costs more than hashing it
        chunks = [todo[k : k + HASH_CHUNK] for k in range(0, len(todo), HASH_CHUNK)]
        with ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, len(chunks)))) as pool:
            for chunk, shas in zip(chunks, pool.map(lambda c: [file_sha256(absolute[j]) for j in c], chunks)):
                for i, sha in zip(chunk, shas):
                    out[i] = HashedFile(absolute[i], stats[i].st_size, sha, False)
    done = [f for f in out if f is not None]
    if store is not None:
        fresh = {f.path: [f.size, st.st_mtime_ns, f.sha256] for f, st in zip(done, stats)
                 if now - st.st_mtime_ns / 1e9 > RACY_SECONDS}  # too recent to trust size + mtime: not kept
        if fresh != kept:
            _write(store, scope, fresh)
    return done


def _store_path(scope: str) -> Path | None:
    root = cache_root()
    if root is None:
        return None
    return root / "hashes" / f"{hashlib.sha256(scope.encode()).hexdigest()[:24]}.json"


def _read(path: Path) -> dict[str, list[Any]]:
    """The kept entries (absolute path -> [size, mtime_ns, sha256]); {} when absent, torn or foreign."""
    try:
        doc = json.loads(path.read_text())
        files = doc["files"] if doc.get("version") == HASHES_VERSION else {}
        return {k: v for k, v in files.items()
                if isinstance(v, list) and len(v) == 3 and isinstance(v[0], int) and isinstance(v[1], int) and isinstance(v[2], str)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # torn or foreign: hash again
        log.debug("kept file hashes %s unreadable (%s): hashing again", path, e)
        return {}


def _write(path: Path, scope: str, files: dict[str, list[Any]]) -> None:
    """Atomically: a process reading at the same time sees the whole file or none."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.stem}-", suffix=".json", delete=False) as f:
            tmp = f.name
            json.dump({"version": HASHES_VERSION, "scope": scope, "files": files}, f)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home, a full disk: the hashes stand, only unkept
        log.debug("cannot keep file hashes in %s (%s)", path.parent, e)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
