"""Train/eval transforms per dataset kind. Only the train split is ever augmented."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from exitflow.stages.core.augment import Augmentations, erasing, image_ops

# Images at least this large get ImageNet-style crops; smaller ones (CIFAR-like) get pad-and-crop.
LARGE_IMAGE_SIDE = 64
# Eval resize before the centre crop: the usual ImageNet 0.875 crop ratio (256 -> 224).
CENTER_CROP_RATIO = 0.875

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std applied after ToTensor (values in [0, 1])."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


def is_large(img_size: int) -> bool:
    """Whether images of this side get ImageNet-style (resized-crop) transforms."""
    return img_size >= LARGE_IMAGE_SIDE


def build_transforms(img_size: int, norm: Normalization, imagenet_style: bool,
                     aug: Augmentations = Augmentations(), resize: bool = False) -> tuple[Transform, Transform]:
    """(train transform, eval transform) for PIL images; both end in a normalized float tensor.

    Small images: pad-4 random crop + horizontal flip for training, identity geometry for eval;
    with `resize` (`img_size` is not the images' own side) both first resize to `img_size`.
    ImageNet-like images: RandomResizedCrop + flip for training, resize + centre crop for eval
    (these scale any image to `img_size` already).
    `aug`'s rotation and contrast follow the crop and flip; its random erasing acts last, on the
    normalised tensor.
    """
    from torchvision import transforms as T  # image datasets only: digits never pays for torchvision

    to_tensor = [T.ToTensor(), T.Normalize(norm.mean, norm.std)]
    first = [T.Resize((img_size, img_size))] if resize and not imagenet_style else []
    if imagenet_style:
        train = T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), *image_ops(aug), *to_tensor, *erasing(aug)])
        before_crop = int(round(img_size / CENTER_CROP_RATIO))
        evaluate = T.Compose([T.Resize(before_crop), T.CenterCrop(img_size), *to_tensor])
    else:
        train = T.Compose([*first, T.RandomCrop(img_size, padding=4), T.RandomHorizontalFlip(), *image_ops(aug),
                           *to_tensor, *erasing(aug)])
        # CenterCrop is a no-op on square images of the right side; it only guards odd, non-square ones.
        evaluate = T.Compose([*first, T.CenterCrop(img_size), *to_tensor])
    return train, evaluate


def channel_stats(images: Sequence[Image.Image]) -> Normalization:
    """Per-channel mean/std over a sample of already-converted PIL images (for datasets without known stats)."""
    from torchvision import transforms as T

    to_tensor = T.ToTensor()
    pixels = torch.cat([to_tensor(img).flatten(1) for img in images], dim=1).double()
    mean = pixels.mean(dim=1)
    # Guard constant images (e.g. a synthetic test set): a zero std would blow up the normalization.
    std = pixels.std(dim=1).clamp_min(1e-3)
    return Normalization(tuple(float(m) for m in mean), tuple(float(s) for s in std))
