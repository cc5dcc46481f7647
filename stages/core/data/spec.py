"""DataSpec (which dataset and how to split it), DatasetInfo (what a net needs to know) and DataError."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from exitflow.stages.core.allowed import DATASET_NAMES, MIN_SUBSET, NEEDS_NO_ROOT, RESIZE_BOUNDS, VAL_FRACTION_BOUNDS
from exitflow.stages.core.augment import Augmentations
from exitflow.stages.core.fields import reject_unknown


class DataError(ValueError):
    """A dataset is missing, malformed or unusable; the message names the problem and where it is."""


@dataclass(frozen=True)
class DataSpec:
    """A dataset and how to split it. `to_dict`/`from_dict` round-trip it through configs and artifacts.
    `root` says where the files are, `identity` what they hold (as `StartWeights`' source and identity)."""

    name: str = "digits"  # one of DATASET_NAMES
    root: str | None = None  # absolute path: parquet folder, imagefolder root or torchvision cifar root; digits: unused
    val_fraction: float = 0.1  # share of the training set held out (stratified) for early stopping
    augment: bool = True  # augment the train split (val and test are never augmented)
    download: bool = False  # let torchvision download cifar10/cifar100 when root lacks them
    train_subset: int | None = None  # stratified cap on the training pool (before the val split), for quick runs
    test_subset: int | None = None  # stratified cap on the test set, for quick runs
    num_workers: int = 0  # DataLoader worker processes
    augmentations: Augmentations = Augmentations()  # the paper's extra ones (rotation ... CutMix, Mixup); all off
    resize: int | None = None  # square side every split's images are resized to (None: the data set's own)
    # the content's digest (stages/core/data/identity.py), set by the driver: the cache keys hold it in
    # place of `root`, so a moved folder keys the same and a changed file does not ("": not identified)
    identity: str = ""

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            raise DataError(f"data spec: unknown dataset {self.name!r}; known: {list(DATASET_NAMES)}")
        low, high = VAL_FRACTION_BOUNDS
        if not low < self.val_fraction < high:
            raise DataError(f"data spec: val_fraction must lie in ({low}, {high}), got {self.val_fraction}")
        for field in ("train_subset", "test_subset"):
            cap = getattr(self, field)
            if cap is not None and cap < MIN_SUBSET:
                raise DataError(f"data spec: {field} must be >= {MIN_SUBSET} or None, got {cap}")
        if self.resize is not None and not RESIZE_BOUNDS[0] <= self.resize <= RESIZE_BOUNDS[1]:
            raise DataError(f"data spec: resize must lie in [{RESIZE_BOUNDS[0]}, {RESIZE_BOUNDS[1]}] or be None, got {self.resize}")
        if self.num_workers < 0:
            raise DataError(f"data spec: num_workers must be >= 0, got {self.num_workers}")
        if self.augmentations.any and not self.augment:
            raise DataError("data spec: augmentations are set but augment is false; turn augment on or the augmentations off")
        if self.name not in NEEDS_NO_ROOT and not self.root:
            raise DataError(f"data spec: dataset {self.name!r} needs a root folder")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataSpec":
        """Inverse of `to_dict`; unknown keys are an error, not silently dropped."""
        reject_unknown(cls, d, "data spec", DataError)
        try:
            aug = Augmentations.from_dict(d.get("augmentations") or {})
        except ValueError as err:
            raise DataError(f"data spec: {err}") from err
        return cls(**{**d, "augmentations": aug})


@dataclass(frozen=True)
class DatasetInfo:
    """What a net needs to know about its data."""

    num_classes: int  # labels lie in [0, num_classes)
    in_chans: int  # 1 (grayscale) or 3 (RGB)
    img_size: int  # square side of the tensors the loaders yield
    classes: tuple[str, ...]  # class names in label order
