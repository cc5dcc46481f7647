"""dataset_info, load_splits and make_loader: the data API the training and evaluation stages use."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from exitflow.stages.core.augment import MixingCollate, NormalisedTensorOps
from exitflow.stages.core.data import sources
from exitflow.stages.core.data.spec import DataError, DatasetInfo, DataSpec
from exitflow.stages.core.data.split import stratified_split, stratified_subset
from exitflow.stages.core.data.transforms import (
    CIFAR10_STATS,
    CIFAR100_STATS,
    IMAGENET_STATS,
    Normalization,
    Transform,
    build_transforms,
    channel_stats,
    is_large,
)

log = logging.getLogger(__name__)

# Subset caps use a fixed seed: every experiment seed sees the same data pool and the same test set;
# the experiment seed only moves the train/val split, the init and the batch order.
SUBSET_SEED = 0
# ImageNet-style inputs are cropped to at most this side.
MAX_IMG_SIZE = 224
# Images decoded to estimate a parquet dataset's channel mean/std (strided over the train split).
STATS_SAMPLE = 1000


@dataclass(frozen=True)
class Splits:
    """The three datasets of an experiment. Items are (float tensor [C, H, W], int64 label)."""

    train: Dataset  # augmented when spec.augment (digits: only by spec.augmentations)
    val: Dataset  # stratified share of the training set, eval transforms
    test: Dataset  # the dataset's own test split, eval transforms
    info: DatasetInfo
    train_eval: Dataset  # train's images with eval transforms (never augmented): what analyses read as "train"


class TransformedSubset(Dataset):
    """`indices` of a raw dataset, each item passed through `transform`.

    Train and val wrap the same raw dataset with their own transform: the raw dataset holds no
    transform, so augmentation can never leak into validation.
    """

    def __init__(self, base: Dataset, indices: np.ndarray, transform: Transform, base_labels: np.ndarray) -> None:
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.labels = np.asarray(base_labels, dtype=np.int64)[self.indices]  # int64 [len(self)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.base[int(self.indices[i])]
        return self.transform(img), int(label)


# ---------------------------------------------------------------- info


def image_side(width: int, height: int, imagenet_style: bool) -> int:
    """The square side the loaders produce for images of this size."""
    side = min(width, height)
    return min(MAX_IMG_SIZE, side) if imagenet_style else side


def dataset_info(spec: DataSpec) -> DatasetInfo:
    """Classes, channels and input size, cheaply (schema, folder names or one image; no full read).
    The input size is `spec.resize` when set."""
    info = _native_info(spec)
    return dataclasses.replace(info, img_size=spec.resize) if spec.resize else info


def _native_info(spec: DataSpec) -> DatasetInfo:
    if spec.name == "digits":
        return DatasetInfo(num_classes=10, in_chans=1, img_size=8, classes=sources.DIGITS_CLASSES)
    if spec.name == "parquet":
        return _parquet_info(spec.root)
    if spec.name in ("cifar10", "cifar100"):
        test = sources.cifar_split(spec.name, spec.root, train=False, download=spec.download)
        return DatasetInfo(len(test.dataset.classes), 3, 32, tuple(test.dataset.classes))
    return _imagefolder_info(spec.root)


def _parquet_info(root: str) -> DatasetInfo:
    train_path = sources.parquet_path(root, "train")
    test_path = sources.parquet_path(root, "test")
    schema = sources.parquet_schema(train_path)
    sources.parquet_schema(test_path)
    classes = sources.parquet_classes(schema)
    if classes is None:
        # No names stored: the classes are 0..max label, named by number.
        top = max(int(sources.read_parquet_labels(p).max(initial=-1)) for p in (train_path, test_path))
        classes = tuple(str(i) for i in range(top + 1))
    first = next(pq.ParquetFile(train_path).iter_batches(batch_size=1, columns=["image"]), None)
    if first is None or first.num_rows == 0:
        raise DataError(f"parquet dataset: {train_path} has no rows")
    img = sources.open_image(first.column(0)[0].as_py(), train_path, 0)
    mode = sources.pil_mode(img)
    side = image_side(*img.size, imagenet_style=is_large(min(img.size)))
    return DatasetInfo(len(classes), 1 if mode == "L" else 3, side, classes)


def _imagefolder_info(root: str) -> DatasetInfo:
    from torchvision.datasets.folder import find_classes

    train_dir = sources.imagefolder_dir(root, "train")
    try:
        classes, _ = find_classes(str(train_dir))
    except FileNotFoundError as err:
        raise DataError(f"imagefolder dataset: {train_dir}: {err}") from err
    first = _first_image_file(train_dir, classes)
    try:
        with Image.open(first) as img:
            size = img.size
    except OSError as err:
        raise DataError(f"imagefolder dataset: cannot open {first}: {err}") from err
    # ImageFolder's loader converts everything to RGB.
    return DatasetInfo(len(classes), 3, image_side(*size, imagenet_style=True), tuple(classes))


def _first_image_file(folder: Path, classes: list[str]) -> Path:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for name in classes:
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() in IMG_EXTENSIONS:
                return path
    raise DataError(f"imagefolder dataset: no image files under {folder}")


# ---------------------------------------------------------------- splits


def load_splits(spec: DataSpec, seed: int) -> Splits:
    """Train/val/test datasets: val is a stratified, `seed`-dependent share of train; only train is augmented."""
    info = dataset_info(spec)
    if spec.name == "digits":
        return _digits_splits(spec, seed, info)
    raw_train, raw_test, norm = _raw_splits(spec, info)
    for name, raw in (("train", raw_train), ("test", raw_test)):
        _check_label_range(raw.labels, info.num_classes, f"{spec.name} {name} split")
    train_tf, eval_tf = build_transforms(info.img_size, norm, imagenet_style=uses_imagenet_transforms(spec, info),
                                         aug=spec.augmentations, resize=spec.resize is not None)
    pool = stratified_subset(raw_train.labels, spec.train_subset, SUBSET_SEED)
    train_pos, val_pos = stratified_split(raw_train.labels[pool], spec.val_fraction, seed)
    test_idx = stratified_subset(raw_test.labels, spec.test_subset, SUBSET_SEED)
    train_eval = TransformedSubset(raw_train.dataset, pool[train_pos], eval_tf, raw_train.labels)
    splits = Splits(
        train=TransformedSubset(raw_train.dataset, pool[train_pos], train_tf, raw_train.labels)
        if spec.augment else train_eval,
        val=TransformedSubset(raw_train.dataset, pool[val_pos], eval_tf, raw_train.labels),
        test=TransformedSubset(raw_test.dataset, test_idx, eval_tf, raw_test.labels),
        info=info,
        train_eval=train_eval,
    )
    log.info("%s: %d train / %d val / %d test", spec.name, len(splits.train), len(splits.val), len(splits.test))
    return splits


def _digits_splits(spec: DataSpec, seed: int, info: DatasetInfo) -> Splits:
    train_full, test_full = sources.digits_splits(spec.resize)
    pool = train_full.subset(stratified_subset(train_full.labels, spec.train_subset, SUBSET_SEED))
    train_pos, val_pos = stratified_split(pool.labels, spec.val_fraction, seed)
    test = test_full.subset(stratified_subset(test_full.labels, spec.test_subset, SUBSET_SEED))
    train_eval = pool.subset(train_pos)
    train: Dataset = train_eval
    if spec.augment and spec.augmentations.per_image:
        # Digits gets no crop or flip (a flipped 2 is no 2), only the per-image operations asked for.
        train = NormalisedTensorOps(train_eval, *sources.digits_normalisation(), spec.augmentations)
    return Splits(train=train, val=pool.subset(val_pos), test=test, info=info, train_eval=train_eval)


def uses_imagenet_transforms(spec: DataSpec, info: DatasetInfo) -> bool:
    """ImageNet-style crops for image folders and for any images of LARGE_IMAGE_SIDE or more."""
    return spec.name == "imagefolder" or is_large(info.img_size)


def _raw_splits(spec: DataSpec, info: DatasetInfo) -> tuple[sources.RawSplit, sources.RawSplit, Normalization]:
    if spec.name == "parquet":
        mode = "L" if info.in_chans == 1 else "RGB"
        train = sources.read_parquet_split(sources.parquet_path(spec.root, "train"), mode)
        test = sources.read_parquet_split(sources.parquet_path(spec.root, "test"), mode)
        # No published statistics for an arbitrary parquet set: estimate them from a strided train sample.
        step = max(1, len(train) // STATS_SAMPLE)
        norm = channel_stats([train[i][0] for i in range(0, len(train), step)])
        return sources.RawSplit(train, train.labels), sources.RawSplit(test, test.labels), norm
    if spec.name in ("cifar10", "cifar100"):
        stats = CIFAR10_STATS if spec.name == "cifar10" else CIFAR100_STATS
        train = sources.cifar_split(spec.name, spec.root, train=True, download=spec.download)
        test = sources.cifar_split(spec.name, spec.root, train=False, download=spec.download)
        return train, test, Normalization(*stats)
    if spec.name == "imagefolder":
        train = sources.imagefolder_split(spec.root, "train")
        test = sources.imagefolder_split(spec.root, "test")
        return train, test, Normalization(*IMAGENET_STATS)
    raise DataError(f"unknown dataset {spec.name!r}")


def _check_label_range(labels: np.ndarray, num_classes: int, where: str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
        raise DataError(f"{where}: label {int(labels[bad])} at row {bad} is outside [0, {num_classes})")


# ---------------------------------------------------------------- loaders


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    collate_fn: Any = None,
) -> DataLoader:
    """A DataLoader whose shuffling (and per-worker RNG seeds) follow `seed`; `collate_fn`: see
    `train_collate`."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate_fn,
    )


def train_collate(spec: DataSpec, num_classes: int) -> MixingCollate | None:
    """The train loader's collate: CutMix/Mixup when the spec asks for them, else the default."""
    return MixingCollate(spec.augmentations, num_classes) if spec.augment and spec.augmentations.mixes else None
