"""`exitflow data`: a dataset in its own layout -> the Parquet layout `data.name: parquet` reads.

Each split becomes one file, `<out>/train.parquet` and `<out>/test.parquet`: column `image`
(encoded PNG or JPEG bytes), column `label` (int16, int32 beyond 32,767 classes), the class names
in label order as the schema metadata key `classes` (a JSON list), and the split's content hash
(sha256 over every row's label and image bytes, in order) as the file metadata key `sha256`.
`<out>/dataset.json` repeats the classes, row counts and hashes.

Image files that are PNG or JPEG are stored as they are, after a full decode proves them sound
(no re-encoding loss); other image files and the array datasets (CIFAR, SVHN) are stored as PNG,
which is lossless. Everything is written in a folder beside `out` that replaces nothing until every
split is written, so a corrupt input leaves no partial output.

Layouts (the test split is the labelled validation set where the test set has no labels):
- cifar10, cifar100: torchvision's download folder (`cifar-10-batches-py/`, `cifar-100-python/`:
  the python pickles; unpickled with numpy arrays as the only objects allowed).
- svhn: torchvision's `train_32x32.mat` and `test_32x32.mat` (label 10 is the digit 0).
- imagefolder: `train/<class>/*` and `val/<class>/*` (or `test/<class>/*`).
- tinyimagenet: `wnids.txt`, `train/<wnid>/images/*`, `val/images/*` with `val/val_annotations.txt`;
  class names from `words.txt` when present.
- imagenet: `train/<wnid>/*`; `val/<wnid>/*`, or a flat `val/*` labelled by `LOC_val_solution.csv`
  (the Kaggle layout); class names from `LOC_synset_mapping.txt` when present.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from exitflow.stages.core.allowed import PREPARE_FORMATS
from exitflow.stages.core.data.spec import DataError

FORMATS = PREPARE_FORMATS
SPLITS: tuple[str, ...] = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
KEPT_FORMATS = ("JPEG", "PNG")  # stored as they are; anything else is re-encoded as PNG
ROW_GROUP = 5000
MANIFEST = "dataset.json"

Row = tuple[bytes, int, str]  # encoded image, label, where it came from (for error messages)


class Bar(Protocol):
    """What `prepare` reports progress to: tqdm's interface, `bar(total=, desc=, unit=)` as a context."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> Any: ...

    def update(self, n: int = 1) -> Any: ...


BarFactory = Callable[..., Bar]


@dataclass(frozen=True)
class SplitSource:
    count: int
    rows: Callable[[], Iterator[Row]]


@dataclass(frozen=True)
class Layout:
    classes: tuple[str, ...]
    splits: dict[str, SplitSource]


@dataclass(frozen=True)
class PreparedSplit:
    path: Path
    rows: int
    sha256: str


@dataclass(frozen=True)
class Prepared:
    format: str
    classes: tuple[str, ...]
    splits: dict[str, PreparedSplit]


def detect_format(source: Path) -> str:
    """The layout of `source`, from the files each one has, or a DataError listing the formats."""
    if (source / "cifar-10-batches-py").is_dir() or (source / "batches.meta").is_file():
        return "cifar10"
    if (source / "cifar-100-python").is_dir() or ((source / "meta").is_file() and (source / "train").is_file()):
        return "cifar100"
    if (source / "train_32x32.mat").is_file():
        return "svhn"
    if (source / "wnids.txt").is_file():
        return "tinyimagenet"
    if (source / "LOC_val_solution.csv").is_file():
        return "imagenet"
    if (source / "train").is_dir():
        return "imagefolder"
    raise DataError(f"{source}: not a layout exitflow knows; pass --format, one of {list(FORMATS)}")


def prepare(source: Path, out: Path, fmt: str | None = None, force: bool = False, bar: BarFactory | None = None) -> Prepared:
    """Write `source` (layout `fmt`, detected when None) as `out/{train,test}.parquet`."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise DataError(f"{source}: no such folder")
    fmt = fmt or detect_format(source)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; known: {list(FORMATS)}")
    existing = [out / f"{s}.parquet" for s in SPLITS if (out / f"{s}.parquet").exists()]
    if existing and not force:
        raise DataError(f"{existing[0]} exists; pass --force to replace it")
    layout = READERS[fmt](source)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        written = {name: _write_split(split, partial / f"{name}.parquet", layout.classes, f"{fmt} {name}", bar)
                   for name, split in layout.splits.items()}
        manifest = {"format": fmt, "classes": list(layout.classes),
                    "splits": {n: {"rows": w.rows, "sha256": w.sha256} for n, w in written.items()}}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        for file in [f"{name}.parquet" for name in written] + [MANIFEST]:
            os.replace(partial / file, out / file)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return Prepared(fmt, layout.classes, {n: PreparedSplit(out / w.path.name, w.rows, w.sha256) for n, w in written.items()})


def _write_split(split: SplitSource, path: Path, classes: tuple[str, ...], desc: str, bar: BarFactory | None) -> PreparedSplit:
    label_type = pa.int16() if len(classes) <= np.iinfo(np.int16).max else pa.int32()
    schema = pa.schema([("image", pa.binary()), ("label", label_type)],
                       metadata={"classes": json.dumps(list(classes)), "source": desc})
    digest = hashlib.sha256()
    images: list[bytes] = []
    labels: list[int] = []
    rows = 0
    with pq.ParquetWriter(path, schema) as writer, (bar or _no_bar)(total=split.count, desc=desc, unit="img") as progress:
        for blob, label, where in split.rows():
            if not 0 <= label < len(classes):
                raise DataError(f"{where}: label {label} outside the {len(classes)} classes")
            digest.update(label.to_bytes(4, "little") + len(blob).to_bytes(8, "little"))
            digest.update(blob)
            images.append(blob)
            labels.append(label)
            if len(images) == ROW_GROUP:
                writer.write_table(pa.table({"image": images, "label": pa.array(labels, label_type)}, schema=schema))
                rows += len(images)
                progress.update(len(images))
                images, labels = [], []
        if images:
            writer.write_table(pa.table({"image": images, "label": pa.array(labels, label_type)}, schema=schema))
            rows += len(images)
            progress.update(len(images))
        if rows == 0:
            raise DataError(f"{desc}: no images")
        writer.add_key_value_metadata({"sha256": digest.hexdigest()})
    return PreparedSplit(path, rows, digest.hexdigest())


class _NoBar:
    def __init__(self, **_: Any) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        pass


_no_bar: BarFactory = _NoBar


# ---------------------------------------------------------------- image files


def image_file(path: Path) -> bytes:
    """A file's bytes when it is a sound PNG or JPEG, else its pixels as PNG; a DataError naming it if
    it does not decode."""
    try:
        blob = path.read_bytes()
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
            if img.format in KEPT_FORMATS:
                return blob
            return _png(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"corrupt image {path}: {type(err).__name__}: {err}") from None


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _file_split(items: list[tuple[Path, int]]) -> SplitSource:
    return SplitSource(len(items), lambda: ((image_file(p), label, str(p)) for p, label in items))


def _class_folders(folder: Path, classes: tuple[str, ...] | None = None, sub: str = "") -> list[tuple[Path, int]]:
    """(file, label) of `folder/<class>/<sub>/*`; the classes are the folder's (sorted) unless given."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    names = classes if classes is not None else tuple(sorted(d.name for d in folder.iterdir() if d.is_dir()))
    index = {n: i for i, n in enumerate(names)}
    items = []
    for d in sorted(x for x in folder.iterdir() if x.is_dir()):
        if d.name not in index:
            raise DataError(f"{d}: class {d.name!r} is not one of the training classes")
        items += [(p, index[d.name]) for p in _files(d / sub if sub else d)]
    return items


def _eval_folder(source: Path) -> Path:
    for name in ("val", "test"):
        if (source / name).is_dir():
            return source / name
    raise DataError(f"{source}: no val or test folder")


def read_imagefolder(source: Path) -> Layout:
    train = _class_folders(source / "train")
    classes = tuple(sorted(d.name for d in (source / "train").iterdir() if d.is_dir()))
    if len(classes) < 2:
        raise DataError(f"{source / 'train'}: {len(classes)} class folder(s); a classifier needs at least 2")
    test = _class_folders(_eval_folder(source), classes)
    return Layout(classes, {"train": _file_split(train), "test": _file_split(test)})


def read_tinyimagenet(source: Path) -> Layout:
    wnids = tuple(sorted(line.strip() for line in _read_text(source / "wnids.txt").splitlines() if line.strip()))
    index = {w: i for i, w in enumerate(wnids)}
    train = _class_folders(source / "train", wnids, sub="images")
    annotations = source / "val" / "val_annotations.txt"
    test = []
    for n, line in enumerate(_read_text(annotations).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise DataError(f"{annotations}, line {n}: expected 'file<TAB>wnid...' with a wnid of wnids.txt, got {line!r}")
        test.append((source / "val" / "images" / parts[0], index[parts[1]]))
    names = _synset_names(source / "words.txt", wnids, sep="\t")
    return Layout(names, {"train": _file_split(train), "test": _file_split(test)})


def read_imagenet(source: Path) -> Layout:
    train_dir = source / "train"
    classes = tuple(sorted(d.name for d in train_dir.iterdir() if d.is_dir())) if train_dir.is_dir() else ()
    if not classes:
        raise DataError(f"{train_dir}: no class folders")
    train = _class_folders(train_dir, classes)
    val = _eval_folder(source)
    if any(d.is_dir() for d in val.iterdir()):
        test = _class_folders(val, classes)
    else:
        test = _val_solution(source / "LOC_val_solution.csv", val, {w: i for i, w in enumerate(classes)})
    names = _synset_names(source / "LOC_synset_mapping.txt", classes, sep=" ")
    return Layout(names, {"train": _file_split(train), "test": _file_split(test)})


def _val_solution(path: Path, folder: Path, index: dict[str, int]) -> list[tuple[Path, int]]:
    """ImageNet's flat validation folder, labelled by the Kaggle solution file (ImageId,PredictionString)."""
    rows = list(csv.reader(io.StringIO(_read_text(path))))
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise DataError(f"{path}: expected the header 'ImageId,PredictionString'")
    files = {p.stem: p for p in _files(folder)}
    items = []
    for n, row in enumerate(rows[1:], 2):
        wnid = row[1].split()[0] if len(row) > 1 and row[1].split() else ""
        if wnid not in index:
            raise DataError(f"{path}, line {n}: {wnid!r} is not a class of the train folder")
        if row[0] not in files:
            raise DataError(f"{path}, line {n}: no image {row[0]!r} in {folder}")
        items.append((files[row[0]], index[wnid]))
    return sorted(items)


def _synset_names(path: Path, wnids: tuple[str, ...], sep: str) -> tuple[str, ...]:
    """The first name of each wnid from a synset file (`wnid<sep>name, other names`), else the wnids."""
    if not path.is_file():
        return wnids
    names = {}
    for line in _read_text(path).splitlines():
        wnid, _, rest = line.partition(sep)
        names[wnid.strip()] = rest.split(",")[0].strip() or wnid.strip()
    return tuple(names.get(w, w) for w in wnids)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from None


# ---------------------------------------------------------------- array datasets


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's batches hold dicts, lists, bytes and numpy arrays: any other object is refused, so a
    tampered file cannot run code while it is read."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how a protocol-2 pickle written by Python 3 stores bytes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[bytes, Any]:
    try:
        with path.open("rb") as f:
            d = _ArraysOnly(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path} is missing") from None
    except Exception as err:  # noqa: BLE001 - unpickling raises anything on a corrupt file
        raise DataError(f"corrupt CIFAR file {path}: {type(err).__name__}: {err}") from None
    if not isinstance(d, dict):
        raise DataError(f"corrupt CIFAR file {path}: holds a {type(d).__name__}, not a dict")
    return d


def _cifar_arrays(path: Path, label_key: bytes) -> tuple[np.ndarray, list[int]]:
    d = _unpickle(path)
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = [int(x) for x in d[label_key]]
    except (KeyError, ValueError, TypeError) as err:
        raise DataError(f"corrupt CIFAR file {path}: {type(err).__name__}: {err}") from None
    if len(labels) != len(data):
        raise DataError(f"corrupt CIFAR file {path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def _array_split(arrays: list[tuple[np.ndarray, list[int], Path]]) -> SplitSource:
    def rows() -> Iterator[Row]:
        for data, labels, path in arrays:
            for i, (pixels, label) in enumerate(zip(data, labels)):
                yield _png(Image.fromarray(pixels)), label, f"{path}, image {i}"

    return SplitSource(sum(len(d) for d, _, _ in arrays), rows)


def read_cifar(source: Path, fmt: str) -> Layout:
    ten = fmt == "cifar10"
    base = source / ("cifar-10-batches-py" if ten else "cifar-100-python")
    base = base if base.is_dir() else source
    meta = _unpickle(base / ("batches.meta" if ten else "meta"))
    names_key = b"label_names" if ten else b"fine_label_names"
    if names_key not in meta:
        raise DataError(f"corrupt CIFAR file {base / ('batches.meta' if ten else 'meta')}: no {names_key.decode()}")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key])
    label_key = b"labels" if ten else b"fine_labels"
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"]
    test_files = ["test_batch"] if ten else ["test"]
    splits = {}
    for name, files in (("train", train_files), ("test", test_files)):
        splits[name] = _array_split([(*_cifar_arrays(base / f, label_key), base / f) for f in files])
    return Layout(classes, splits)


def read_svhn(source: Path) -> Layout:
    from scipy.io import loadmat

    splits = {}
    for name in SPLITS:
        path = source / f"{name}_32x32.mat"
        try:
            mat = loadmat(path)
            x = np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2)  # [32, 32, 3, N] -> [N, 32, 32, 3]
            y = [int(v) % 10 for v in np.asarray(mat["y"]).reshape(-1)]  # label 10 is the digit 0
        except FileNotFoundError:
            raise DataError(f"{path} is missing") from None
        except Exception as err:  # noqa: BLE001 - scipy raises many types on a corrupt .mat
            raise DataError(f"corrupt SVHN file {path}: {type(err).__name__}: {err}") from None
        if len(x) != len(y):
            raise DataError(f"corrupt SVHN file {path}: {len(x)} images but {len(y)} labels")
        splits[name] = _array_split([(x, y, path)])
    return Layout(tuple(str(d) for d in range(10)), splits)


READERS: dict[str, Callable[[Path], Layout]] = {
    "cifar10": lambda s: read_cifar(s, "cifar10"),
    "cifar100": lambda s: read_cifar(s, "cifar100"),
    "svhn": read_svhn,
    "imagefolder": read_imagefolder,
    "tinyimagenet": read_tinyimagenet,
    "imagenet": read_imagenet,
}
