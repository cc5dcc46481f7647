"""Deterministic stratified index splits: train/val and the quick-run subset caps."""

from __future__ import annotations

import numpy as np

from exitflow.stages.core.data.memo import memoized, sklearn_version
from exitflow.stages.core.data.spec import DataError


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions 0..N-1 into (train_idx, val_idx), class-stratified; same seed -> same split.

    Both index arrays come back sorted so that datasets read their storage in order.
    """
    labels = np.asarray(labels)
    n = len(labels)
    num_classes = len(np.unique(labels))
    n_val = int(round(val_fraction * n))
    # sklearn refuses a stratified split whose either side cannot hold one sample per class.
    if n_val < num_classes or n - n_val < num_classes:
        raise DataError(
            f"cannot split {n} samples of {num_classes} classes with val_fraction={val_fraction}: "
            f"each side needs at least one sample per class"
        )
    counts = np.bincount(np.unique(labels, return_inverse=True)[1])
    if counts.min() < 2:
        raise DataError(f"cannot stratify: a class has only {counts.min()} sample(s); every class needs >= 2")
    return sklearn_split(labels, seed, test_size=n_val)


def stratified_subset(labels: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """Sorted positions of a class-stratified subset of `size` samples (all positions when size is None or >= N)."""
    labels = np.asarray(labels)
    n = len(labels)
    if size is None or size >= n:
        return np.arange(n)
    num_classes = len(np.unique(labels))
    if size < num_classes:
        raise DataError(f"subset of {size} cannot hold one sample of each of {num_classes} classes")
    counts = np.bincount(np.unique(labels, return_inverse=True)[1])
    if counts.min() < 2:
        raise DataError(f"cannot stratify a subset: a class has only {counts.min()} sample(s); every class needs >= 2")
    keep, _ = sklearn_split(labels, seed, train_size=size)
    return keep


def sklearn_split(labels: np.ndarray, seed: int, **size: float | int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's stratified, shuffled `train_test_split` of positions 0..N-1: both parts, sorted.
    Kept on disk (`memo`): every process of a study asks for the same splits, and sklearn costs a
    second of CPU to import."""
    labels = np.asarray(labels)

    def compute() -> dict[str, np.ndarray]:
        from sklearn.model_selection import train_test_split

        first, second = train_test_split(np.arange(len(labels)), stratify=labels, random_state=seed, shuffle=True, **size)
        return {"first": np.sort(first), "second": np.sort(second)}

    kept = memoized("split", (labels, seed, sorted(size.items()), sklearn_version()), compute)
    return kept["first"], kept["second"]
