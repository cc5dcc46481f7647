"""check_dataset: validate a dataset up front, failing with a DataError that names the problem."""

from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from exitflow.stages.core.data import sources
from exitflow.stages.core.data.loading import SUBSET_SEED, dataset_info
from exitflow.stages.core.data.spec import DataError, DatasetInfo, DataSpec
from exitflow.stages.core.data.split import stratified_split, stratified_subset
from exitflow.stages.core.data.transforms import is_large

log = logging.getLogger(__name__)

# Files per header-check task (imagefolder: file I/O bound, so threads do help there).
VERIFY_CHUNK = 2048


def check_dataset(spec: DataSpec) -> DatasetInfo:
    """Validate `spec`'s dataset and return its info, or raise DataError naming what is wrong.

    Checks: the root and split files/folders exist, required columns, every image decodes (parquet:
    full decode; imagefolder: header of every file), labels within the classes, >= 2 classes, and
    enough samples per class for a stratified train/val split.
    """
    info = dataset_info(spec)
    if info.num_classes < 2:
        raise DataError(f"{spec.name}: {info.num_classes} class(es); early-exit classification needs at least 2")
    if spec.name == "digits":
        return info
    if spec.name == "parquet":
        train_labels, test_labels = _check_parquet(spec.root, info)
    elif spec.name == "imagefolder":
        train_labels, test_labels = _check_imagefolder(spec.root, info)
    else:
        train_labels = sources.cifar_split(spec.name, spec.root, train=True, download=spec.download).labels
        test_labels = sources.cifar_split(spec.name, spec.root, train=False, download=spec.download).labels
    for split, labels in (("train", train_labels), ("test", test_labels)):
        _check_labels(labels, info.num_classes, f"{spec.name} {split} split")
    counts = np.bincount(train_labels, minlength=info.num_classes)
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise DataError(f"{spec.name}: the train split holds only {len(present)} distinct class(es); need at least 2")
    rare = [int(c) for c in present if counts[c] < 2]
    if rare:
        raise DataError(
            f"{spec.name}: class(es) {rare} have a single training sample; a stratified val split needs >= 2"
        )
    # Dry-run the subset cap and val split now rather than failing inside a training task later.
    pool = stratified_subset(train_labels, spec.train_subset, SUBSET_SEED)
    stratified_split(train_labels[pool], spec.val_fraction, seed=0)
    stratified_subset(test_labels, spec.test_subset, SUBSET_SEED)
    log.info("%s: ok (%d classes, %d train, %d test)", spec.name, info.num_classes, len(train_labels), len(test_labels))
    return info


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if len(labels) == 0:
        raise DataError(f"{where}: no samples")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise DataError(
            f"{where}: label {int(labels[bad[0]])} at row {int(bad[0])} is outside [0, {num_classes}) "
            f"({len(bad)} such row(s))"
        )


def _check_parquet(root: str, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    # Small images are batched without resizing, so they must all share one size.
    fixed_size = not is_large(info.img_size)
    labels = []
    for split in ("train", "test"):
        path = sources.parquet_path(root, split)
        data = sources.read_parquet_split(path)
        _decode_all(data, path, fixed_size)
        labels.append(data.labels)
    return labels[0], labels[1]


def _decode_all(data: sources.EncodedImages, path: Path, fixed_size: bool) -> None:
    """Fully decode every image with PIL (what training will do) and report the first bad row.

    Serial on purpose: for small images Python overhead dominates and threads only add GIL
    contention (measured: 60k CIFAR JPEGs take ~3 s serially, longer with 2 threads).
    """
    sizes: set[tuple[int, int]] = set()
    for row in range(len(data)):
        try:
            with Image.open(io.BytesIO(data.raw(row))) as img:
                img.load()
                sizes.add(img.size)
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... on bad bytes
            raise DataError(f"corrupt image at row {row} of {path}: {type(err).__name__}: {err}") from err
    if fixed_size and len(sizes) > 1:
        raise DataError(f"{path}: small images must all share one size, found {sorted(sizes)[:5]}")


def _check_imagefolder(root: str, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    train = sources.imagefolder_split(root, "train")
    test = sources.imagefolder_split(root, "test")
    if train.dataset.classes != test.dataset.classes:
        raise DataError(
            f"imagefolder dataset: class folders differ between {train.dataset.root} and {test.dataset.root}"
        )
    for raw in (train, test):
        _verify_files([p for p, _ in raw.dataset.samples])
    return train.labels, test.labels


def _verify_files(paths: list[str]) -> None:
    """PIL header + structure check of every file (a full decode of ImageNet would take far too long)."""

    def verify(chunk: list[str]) -> tuple[str, str] | None:
        for path in chunk:
            try:
                with Image.open(path) as img:
                    img.verify()
            except Exception as err:  # PIL raises many types on bad files
                return path, f"{type(err).__name__}: {err}"
        return None

    chunks = [paths[i : i + VERIFY_CHUNK] for i in range(0, len(paths), VERIFY_CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, min(len(chunks), 4 * (os.cpu_count() or 1)))) as pool:
        for bad in pool.map(verify, chunks):
            if bad is not None:
                raise DataError(f"imagefolder dataset: corrupt image {bad[0]}: {bad[1]}")
