"""The paper's extra augmentations (its appendix E): rotation, contrast, random erasing per image;
CutMix and Mixup per batch. All from torchvision.transforms.v2; the training split only.

Per-image operations join the train transform (`image_ops`, `erasing`); the batch ones run in the
train loader's collate (`MixingCollate`), so the loop receives soft targets ([B, classes] rows
summing to 1), which cross-entropy takes as they are.

Torch-free at import: the study spec validates its section with `Augmentations` itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from exitflow.stages.core.fields import reject_unknown


@dataclass(frozen=True)
class Augmentations:
    """Strengths of the extra augmentations; 0 switches one off (the default: all off)."""

    rotation: float = 0.0  # degrees: each image turns by a uniform angle in [-rotation, rotation]
    contrast: float = 0.0  # contrast factor drawn uniformly from [max(0, 1 - contrast), 1 + contrast]
    random_erasing: float = 0.0  # probability that a rectangle of the (normalised) image is erased
    mixup: float = 0.0  # Beta(alpha, alpha) of Mixup (Zhang et al. 2018); the paper's setups use it with CutMix
    cutmix: float = 0.0  # Beta(alpha, alpha) of CutMix (Yun et al. 2019); with mixup, each batch takes one at random

    def __post_init__(self) -> None:
        if not 0 <= self.rotation <= 180:
            raise ValueError(f"augmentations.rotation must lie in [0, 180] degrees, got {self.rotation}")
        if not 0 <= self.random_erasing <= 1:
            raise ValueError(f"augmentations.random_erasing is a probability in [0, 1], got {self.random_erasing}")
        for name in ("contrast", "mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ValueError(f"augmentations.{name} must be >= 0 (0: off), got {getattr(self, name)}")

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) for f in dataclasses.fields(self))

    @property
    def mixes(self) -> bool:
        """Batch-level mixing (the train loader's collate)."""
        return bool(self.mixup or self.cutmix)

    @property
    def per_image(self) -> bool:
        """Any operation on single images (the train transform)."""
        return bool(self.rotation or self.contrast or self.random_erasing)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Augmentations:
        reject_unknown(cls, d, "augmentations")
        return cls(**d)


def image_ops(aug: Augmentations) -> list[Any]:
    """Rotation and contrast: on the image before it becomes a normalised tensor (PIL or [0, 1] tensor)."""
    from torchvision.transforms import v2

    ops: list[Any] = []
    if aug.rotation:
        ops.append(v2.RandomRotation(aug.rotation))
    if aug.contrast:
        ops.append(v2.ColorJitter(contrast=aug.contrast))
    return ops


def erasing(aug: Augmentations) -> list[Any]:
    """Random erasing: on the normalised tensor, so an erased rectangle is 0, the data's mean."""
    from torchvision.transforms import v2

    return [v2.RandomErasing(p=aug.random_erasing)] if aug.random_erasing else []


class MixingCollate:
    """The train loader's collate: stack the batch, then CutMix or Mixup it (one of them per batch when
    both are on). Draws from torch's global RNG (in the loader's worker when there are workers), which
    the loop's resumable RNG state covers."""

    def __init__(self, aug: Augmentations, num_classes: int) -> None:
        from torchvision.transforms import v2

        mixers = ([v2.CutMix(alpha=aug.cutmix, num_classes=num_classes)] if aug.cutmix else []) + (
            [v2.MixUp(alpha=aug.mixup, num_classes=num_classes)] if aug.mixup else [])
        if not mixers:
            raise ValueError("MixingCollate needs mixup or cutmix > 0")
        self.mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    def __call__(self, batch: list[Any]) -> tuple[Any, Any]:
        import torch
        from torch.utils.data import default_collate

        x, y = default_collate(batch)
        return self.mix(x, torch.as_tensor(y, dtype=torch.int64))


class NormalisedTensorOps:
    """Per-image operations on a dataset of already-normalised tensors (digits): each image is taken
    back to [0, 1] (so contrast clamps and rotation fills with the true background), transformed,
    then normalised again; random erasing acts on the normalised tensor as for image datasets."""

    def __init__(self, base: Any, mean: float, std: float, aug: Augmentations) -> None:
        from torchvision.transforms import v2

        self.base = base
        self.mean, self.std = mean, std
        ops = image_ops(aug)
        self.ops = v2.Compose(ops) if ops else None
        self.erase = v2.Compose(erasing(aug)) if aug.random_erasing else None

    @property
    def labels(self) -> Any:
        return self.base.labels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x, y = self.base[i]
        if self.ops is not None:
            x = (self.ops((x * self.std + self.mean).clamp(0, 1)) - self.mean) / self.std
        if self.erase is not None:
            x = self.erase(x)
        return x, y
