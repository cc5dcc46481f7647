"""Arrays from deterministic computations, kept on disk so that the next process reads them back.

Every process of a study derives the same splits: the driver's checks, each node's task, each
trial. scikit-learn, which computes them, costs about a second of CPU to import per process, more
than a digits phase's training. A kept result is a pure function of its key, which hashes every
input (the arrays' dtype, shape and bytes, the parameters), scikit-learn's version and
`MEMO_VERSION`: what is read back is what the computation returns. A file that cannot be read is
computed again; a folder that cannot be written only costs the saving.

Where: $EXITFLOW_CACHE_DIR, else $XDG_CACHE_HOME/exitflow, else ~/.cache/exitflow; "off" keeps nothing.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MEMO_VERSION = 1  # bump when a memoized computation changes what it returns for the same inputs
CACHE_DIR_ENV = "EXITFLOW_CACHE_DIR"
OFF = "off"
Arrays = dict[str, np.ndarray]


def cache_root() -> Path | None:
    """exitflow's cache folder (kept arrays, kept file hashes: `file_hashes`); None when keeping is off."""
    chosen = os.environ.get(CACHE_DIR_ENV)
    if chosen:
        return None if chosen.lower() == OFF else Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "exitflow"


def cache_dir() -> Path | None:
    """The folder kept results live in; None when keeping is off."""
    root = cache_root()
    return None if root is None else root / "arrays"


@functools.cache
def sklearn_version() -> str:
    """scikit-learn's version, read from its metadata without importing it: from the package's own
    dist-info folder (`metadata.version` scans every installed package: a quarter second)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin:
        found = sorted(Path(spec.origin).parents[1].glob("scikit_learn-*.dist-info"))
        if len(found) == 1:
            return str(metadata.PathDistribution(found[0]).version)
    return metadata.version("scikit-learn")


def memo_key(parts: Iterable[Any]) -> str:
    """A hash of every part: arrays by dtype, shape and bytes; anything else by its repr."""
    h = hashlib.sha256(f"memo-v{MEMO_VERSION}".encode())
    for part in parts:
        if isinstance(part, np.ndarray):
            a = np.ascontiguousarray(part)
            h.update(f"array {a.dtype.str} {a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(f"value {part!r}".encode())
        h.update(b"\0")
    return h.hexdigest()


def memoized(name: str, parts: Iterable[Any], compute: Callable[[], Arrays]) -> Arrays:
    """`compute()`, or what an earlier call with the same `name` and `parts` kept."""
    folder = cache_dir()
    if folder is None:
        return compute()
    path = folder / f"{name}-{memo_key([name, *parts])[:40]}.npz"
    kept = _read(path)
    if kept is not None:
        return kept
    arrays = compute()
    _write(path, arrays)
    return arrays


def _read(path: Path) -> Arrays | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # torn or foreign: compute again
        log.debug("kept arrays %s unreadable (%s): computing them again", path, e)
        return None


def _write(path: Path, arrays: Arrays) -> None:
    """Atomically: a process reading at the same time sees the whole file or none."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}-", suffix=".npz", delete=False) as f:
            tmp = f.name
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home, a full disk: the result stands, only unkept
        log.debug("cannot keep arrays in %s (%s)", path.parent, e)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
