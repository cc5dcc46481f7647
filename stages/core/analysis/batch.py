"""The fixed batch an analysis looks at: a seeded random subset of the train, test or validation split."""

from __future__ import annotations

import torch
from torch import Tensor

from exitflow.stages.core.data import Splits

SPLITS = ("train", "test", "val")


def analysis_batch(splits: Splits, split: str, samples: int, seed: int) -> tuple[Tensor, Tensor]:
    """(images, labels) of `samples` items of `split`, always with eval transforms: "train" is the
    training images the phases learn from (the validation share excluded), never augmented."""
    if split not in SPLITS:
        raise ValueError(f"an analysis reads one of {', '.join(SPLITS)}, not {split!r}")
    dataset = {"train": splits.train_eval, "test": splits.test, "val": splits.val}[split]
    n = len(dataset)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(samples, n)]
    items = [dataset[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])
