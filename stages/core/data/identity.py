"""A data set's identity: a digest of the content of every file it is read from, never of its path.

The cache keys hold it in place of `data.root` (`pipeline/resolve.py`, `docs/cache-keys.md`): a
changed image or Parquet row re-keys what reads the data, a moved folder keys the same. Per kind:

- parquet: the bytes of `train.parquet` and `test.parquet` (not the sha256 `exitflow data` records
  in their metadata: an edit could leave it stale);
- imagefolder: every file torchvision's ImageFolder reads (image extensions under the class
  folders of `train/` and of `val/`, else `test/`), each by its path relative to the root, its
  size and its bytes' sha256; adding, removing, renaming or changing an image changes the digest;
- cifar10 / cifar100: the files torchvision's loader reads (`cifar-10-batches-py/data_batch_1`...,
  `cifar-100-python/train`...), by name and content;
- digits: scikit-learn's own `digits.csv.gz`, which `load_digits` reads.

Each file's hash is kept by (absolute path, size, mtime_ns) (`file_hashes.py`): after the first
time, identifying a data set costs a listing and a stat per file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

from exitflow.stages.core.data import sources
from exitflow.stages.core.data.file_hashes import hash_files
from exitflow.stages.core.data.spec import DataError, DataSpec

IDENTITY_VERSION = 1  # bump when what the digest covers changes: every key that reads data changes with it
DIGEST_PREFIX = "sha256:"
UNREAD_PREFIX = "unread:"
SHOWN_HEX = 12  # hex digits of the digest a plan line shows
DIGITS_FILE = ("datasets", "data", "digits.csv.gz")  # under scikit-learn's package folder: what load_digits reads
PARQUET_SPLITS = ("train", "test")


@dataclass(frozen=True)
class DataIdentity:
    """What identifying a data set found: its digest (what the cache keys hold), and what it cost."""

    name: str  # the data set's kind (DataSpec.name)
    source: str  # the folder read (digits: scikit-learn's file)
    digest: str  # "sha256:<hex>" over every file's relative path, size and content hash
    files: int
    size: int  # bytes, all files together
    seconds: float  # what computing it took now
    kept: int  # file hashes reused from the kept ones (unchanged files): files - kept were read

    def describe(self) -> str:
        """One line for `exitflow plan`: kind, folder, digest, and what identifying it cost."""
        shown = self.digest[: len(DIGEST_PREFIX) + SHOWN_HEX]
        files = f"{self.files} file{'s' if self.files != 1 else ''}"
        return f"{self.name} {self.source} {shown}... ({files}, {_size(self.size)}; {self.seconds:.2f} s, {self.kept} cached)"


def identify(spec: DataSpec) -> DataIdentity:
    """Hash `spec`'s data set (kept hashes where files are unchanged); DataError when its files cannot be listed."""
    start = time.monotonic()
    base, files = data_files(spec)
    try:
        hashed = hash_files([path for _, path in files], scope=f"{spec.name}:{base}")
    except OSError as e:  # a file gone or unreadable since it was listed
        raise DataError(f"{spec.name} dataset: cannot read {getattr(e, 'filename', '') or base}: {e.strerror or e}") from e
    digest = hashlib.sha256(f"exitflow-data-v{IDENTITY_VERSION}\0{spec.name}\n".encode())
    for (name, _), f in zip(files, hashed):
        digest.update(f"{name}\0{f.size}\0{f.sha256}\n".encode())
    return DataIdentity(name=spec.name, source=str(base), digest=DIGEST_PREFIX + digest.hexdigest(), files=len(files),
                        size=sum(f.size for f in hashed), seconds=time.monotonic() - start, kept=sum(f.kept for f in hashed))


def unread_identity(spec: DataSpec) -> str:
    """What stands for a data set whose files cannot be read here (a spec planned without its data):
    its kind and path, so two such data sets never share a key; `run` and `plan` refuse one before."""
    return f"{UNREAD_PREFIX}{spec.name}:{spec.root}"


def data_files(spec: DataSpec) -> tuple[Path, list[tuple[str, str]]]:
    """The folder `spec`'s data set is read from, and each file read: (its path relative to that
    folder, posix, sorted; its absolute path). DataError naming what is missing."""
    if spec.name == "digits":
        return _digits_file()
    if spec.root is None or "://" in spec.root:
        raise DataError(f"{spec.name} dataset: {spec.root!r} is not a local folder; its files cannot be hashed")
    root = Path(spec.root).absolute()
    if spec.name == "parquet":
        paths = [str(sources.parquet_path(str(root), split)) for split in PARQUET_SPLITS]
    elif spec.name == "imagefolder":
        paths = _imagefolder_files(root)
    else:
        paths = _cifar_files(spec.name, root)
    prefix = str(root) + os.sep  # every path lies under it: as strings, for folders of many small images
    return root, sorted((p.removeprefix(prefix).replace(os.sep, "/"), p) for p in paths)


def _digits_file() -> tuple[Path, list[tuple[str, str]]]:
    found = importlib.util.find_spec("sklearn")  # not imported: a second of CPU
    if found is None or not found.origin:
        raise DataError("digits dataset: scikit-learn is not installed")
    path = Path(found.origin).parent.joinpath(*DIGITS_FILE)
    if not path.is_file():
        raise DataError(f"digits dataset: scikit-learn's data file {path} is missing")
    return path, [(path.name, str(path))]


def _imagefolder_files(root: Path) -> list[str]:
    """Exactly the files torchvision's ImageFolder reads for the train and test splits (`sources.imagefolder_split`)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    paths = []
    for split in ("train", "test"):
        folder = sources.imagefolder_dir(str(root), split)
        try:
            _, class_to_idx = find_classes(str(folder))
            paths += [p for p, _ in make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)]
        except (FileNotFoundError, RuntimeError) as err:  # no class folders / a class without images
            raise DataError(f"imagefolder dataset: {folder}: {err}") from err
    return paths


def _cifar_files(name: str, root: Path) -> list[str]:
    """The files torchvision's CIFAR loader reads: its batches and its meta file."""
    from torchvision import datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    folder = root / cls.base_folder
    paths = [folder / f for f, _ in [*cls.train_list, *cls.test_list]] + [folder / cls.meta["filename"]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{name}: {folder} lacks {missing} (set download: true to fetch it)")
    return [str(p) for p in paths]


def _size(n: int) -> str:
    """Bytes in decimal units, as `ls -h --si` shows them: 57.5 kB, 55.6 MB."""
    value, unit = float(n), "B"
    for bigger in ("kB", "MB", "GB", "TB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
