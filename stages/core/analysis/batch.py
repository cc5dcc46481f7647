"""The fixed batch an analysis looks at: a seeded random subset of the test or validation split."""

from __future__ import annotations

import torch
from torch import Tensor

from stages.core.data import Splits


def analysis_batch(splits: Splits, split: str, samples: int, seed: int) -> tuple[Tensor, Tensor]:
    """(images, labels) of `samples` items of `split` ("test" or "val": eval transforms, never augmented)."""
    if split not in ("test", "val"):
        raise ValueError(f"an analysis reads the test or val split, not {split!r}")
    dataset = splits.test if split == "test" else splits.val
    n = len(dataset)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(samples, n)]
    items = [dataset[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])
