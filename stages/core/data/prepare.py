"""`exitflow data`: a dataset in its own layout -> the Parquet layout `data.name: parquet` reads.

Each split becomes one file, `<out>/train.parquet` and `<out>/test.parquet`: column `image`
(encoded PNG or JPEG bytes), column `label` (int16, int32 beyond 32,767 classes), the class names
in label order as the schema metadata key `classes` (a JSON list), and the split's content hash
(sha256 over every row's label and image bytes, in order) as the file metadata key `sha256`.
`<out>/dataset.json` repeats the classes, row and per-class counts and hashes, the layout and which
folder became which file; where exitflow made the test split itself (a flat image folder), it also
records the fraction, the seed, the rule and the per-class counts, and `<out>/split.csv` lists every
file's side (its sha256 is in dataset.json).

Image files that are PNG or JPEG are stored as they are, after a full decode proves them sound
(no re-encoding loss); other image files and the array datasets (CIFAR, SVHN) are stored as PNG,
which is lossless. Everything is written in a folder beside `out` that replaces nothing until every
split is written, so a corrupt input leaves no partial output.

Layouts (`layout_help.ACCEPTED_LAYOUTS` draws them; the readers: `layouts`, `image_folder`,
`layouts_arrays`, `layouts_images`): cifar10, cifar100, svhn, imagefolder (flat, or train/ with
val/ or test/), tinyimagenet, imagenet.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from exitflow.stages.core.allowed import PREPARE_FORMATS
from exitflow.stages.core.data.layouts import detect_format, read_layout
from exitflow.stages.core.data.prepare_files import FolderOptions, Layout, SplitSource
from exitflow.stages.core.data.spec import DataError

FORMATS = PREPARE_FORMATS
SPLITS: tuple[str, ...] = ("train", "test")
ROW_GROUP = 5000
MANIFEST = "dataset.json"
SPLIT_FILES = "split.csv"  # every file's side, where exitflow made the test split
VAL_NOTE = ("validation: exitflow has no separate validation split; every run holds out a stratified share of "
            "train.parquet for early stopping (data.val_fraction, default 0.1, drawn per seed)")
_CLASS_TABLE = 20  # classes listed one per line up to this many

__all__ = ["FolderOptions", "Prepared", "PreparedSplit", "detect_format", "prepare", "summary_lines"]


class Bar(Protocol):
    """What `prepare` reports progress to: tqdm's interface, `bar(total=, desc=, unit=)` as a context."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> Any: ...

    def update(self, n: int = 1) -> Any: ...


BarFactory = Callable[..., Bar]


@dataclass(frozen=True)
class PreparedSplit:
    path: Path
    rows: int
    sha256: str
    per_class: tuple[int, ...] = ()  # images of each class, in label order
    sizes: tuple[tuple[int, int], tuple[int, int]] | None = None  # the smallest and largest (width, height), by area


@dataclass(frozen=True)
class Prepared:
    format: str
    classes: tuple[str, ...]
    splits: dict[str, PreparedSplit]
    layout: Layout | None = None  # what was found: its shape, mapping, notes and the split made here
    manifest: Path | None = None


def prepare(source: Path, out: Path, fmt: str | None = None, force: bool = False, bar: BarFactory | None = None,
            options: FolderOptions = FolderOptions()) -> Prepared:
    """Write `source` (layout `fmt`, detected when None) as `out/{train,test}.parquet` and `out/dataset.json`."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise DataError(f"{source}: no such folder")
    fmt = fmt or detect_format(source)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; known: {list(FORMATS)}")
    existing = [out / f"{s}.parquet" for s in SPLITS if (out / f"{s}.parquet").exists()]
    if existing and not force:
        raise DataError(f"{existing[0]} exists; pass --force to replace it")
    layout = read_layout(source, fmt, options)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        written = {name: _write_split(split, partial / f"{name}.parquet", layout.classes, f"{fmt} {name}", bar)
                   for name, split in layout.splits.items()}
        files = [f"{name}.parquet" for name in written] + [MANIFEST]
        manifest = _manifest(fmt, layout, written)
        if layout.split is not None:
            manifest["split"]["files_sha256"] = _write_split_files(layout, partial / SPLIT_FILES)
            files.append(SPLIT_FILES)
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        for file in files:
            os.replace(partial / file, out / file)
        if layout.split is None and (out / SPLIT_FILES).is_file():
            (out / SPLIT_FILES).unlink()  # a split record of what was replaced would no longer hold
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    splits = {n: PreparedSplit(out / w.path.name, w.rows, w.sha256, w.per_class, w.sizes) for n, w in written.items()}
    return Prepared(fmt, layout.classes, splits, layout, out / MANIFEST)


def _manifest(fmt: str, layout: Layout, written: dict[str, PreparedSplit]) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "format": fmt, "layout": layout.shape, "mapping": list(layout.mapping), "classes": list(layout.classes),
        "splits": {n: {"rows": w.rows, "sha256": w.sha256, "per_class": list(w.per_class),
                       "smallest_image": list(w.sizes[0]) if w.sizes else None,
                       "largest_image": list(w.sizes[1]) if w.sizes else None} for n, w in written.items()},
        "notes": list(layout.notes)}
    if layout.split is not None:
        manifest["split"] = {"made_by": "exitflow data", "test_fraction": layout.split.fraction, "seed": layout.split.seed,
                             "stratified": "per class", "rule": layout.split.rule,
                             "per_class": {n: list(w.per_class) for n, w in written.items()}, "files": SPLIT_FILES}
    return manifest


def _write_split_files(layout: Layout, path: Path) -> str:
    """`split.csv` (split, label, class, file relative to the source; one row per image); its sha256."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["split", "label", "class", "file"])
    for side, label, rel in layout.split.rows if layout.split else ():
        writer.writerow([side, label, layout.classes[label], rel])
    data = buf.getvalue().encode("utf-8", "surrogateescape")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _write_split(split: SplitSource, path: Path, classes: tuple[str, ...], desc: str, bar: BarFactory | None) -> PreparedSplit:
    label_type = pa.int16() if len(classes) <= np.iinfo(np.int16).max else pa.int32()
    schema = pa.schema([("image", pa.binary()), ("label", label_type)],
                       metadata={"classes": json.dumps(list(classes)), "source": desc})
    digest = hashlib.sha256()
    counts = np.zeros(len(classes), dtype=np.int64)
    sizes: tuple[tuple[int, int], tuple[int, int]] | None = None
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
            counts[label] += 1
            sizes = _extremes(sizes, _size(blob, where))
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
    return PreparedSplit(path, rows, digest.hexdigest(), tuple(int(c) for c in counts), sizes)


def _size(blob: bytes, where: str) -> tuple[int, int]:
    """(width, height) from the image's header (the bytes were decoded in full when they were read)."""
    try:
        with Image.open(io.BytesIO(blob)) as img:
            return img.size
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"corrupt image {where}: {type(err).__name__}: {err}") from None


def _extremes(known: tuple[tuple[int, int], tuple[int, int]] | None,
              size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    if known is None:
        return size, size
    area = size[0] * size[1]
    small, large = known
    return (size if area < small[0] * small[1] else small), (size if area > large[0] * large[1] else large)


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


def summary_lines(done: Prepared) -> list[str]:
    """What `exitflow data` prints once it has written: the layout found, which folder went where, the
    split it made (fraction, seed, per-class counts), the files, what it skipped, and the spec lines."""
    layout = done.layout or Layout(done.classes, {})
    shape = f" ({layout.shape})" if layout.shape else ""
    lines = [f"{done.format}: {len(done.classes)} classes{shape}"]
    lines += [f"  {m}" for m in layout.mapping]
    if layout.split is not None:
        lines.append(f"  the split: test fraction {layout.split.fraction}, seed {layout.split.seed}, stratified per "
                     f"class ({layout.split.rule})")
    lines += _per_class_lines(done)
    lines += [f"  {s.path}  {s.rows} images  sha256 {s.sha256}" for s in done.splits.values()]
    lines += _size_lines(done)
    if done.manifest is not None:
        what = f"; every file's side in {SPLIT_FILES}" if layout.split is not None else ""
        lines.append(f"  recorded in {done.manifest}{what}")
    lines += [f"  note: {n}" for n in layout.notes]
    lines.append(VAL_NOTE)
    root = done.manifest.parent if done.manifest is not None else "OUT"
    lines.append(f"a study reads it with: data: {{name: parquet, root: {root}}}")
    return lines


def _per_class_lines(done: Prepared) -> list[str]:
    names = [n for n in SPLITS if n in done.splits and done.splits[n].per_class]
    if not names:
        return []
    if len(done.classes) > _CLASS_TABLE:
        return [f"  per class, {n}: {min(done.splits[n].per_class)} to {max(done.splits[n].per_class)} images"
                for n in names]
    width = max(len("class"), *(len(c) for c in done.classes))
    lines = ["  " + "class".ljust(width) + "".join(f"  {n:>6}" for n in names)]
    for label, name in enumerate(done.classes):
        lines.append("  " + name.ljust(width) + "".join(f"  {done.splits[n].per_class[label]:>6}" for n in names))
    return lines


def _size_lines(done: Prepared) -> list[str]:
    found = [s.sizes for s in done.splits.values() if s.sizes]
    if not found:
        return []
    small = min((lo for lo, _ in found), key=lambda wh: wh[0] * wh[1])
    large = max((hi for _, hi in found), key=lambda wh: wh[0] * wh[1])
    if small == large:
        return [f"  images: {small[0]}x{small[1]} pixels, all of them"]
    return [f"  images: from {small[0]}x{small[1]} to {large[0]}x{large[1]} pixels; a study reads them at the first "
            "train image's shorter side (224 at most from 64 up), or at data.resize"]
