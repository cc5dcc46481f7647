"""Allowed values the core enforces and the study spec validates against: one list, one range.

Torch-free on purpose: the spec (and so every command line, `--help` included) imports it.
Registries that live with their code (nets, methods, criteria) are checked by the spec against
the registry itself.
"""

DATASET_NAMES: tuple[str, ...] = ("digits", "parquet", "cifar10", "cifar100", "imagefolder")
# Layouts `exitflow data` turns into the parquet layout (stages.core.data.prepare)
PREPARE_FORMATS: tuple[str, ...] = ("cifar10", "cifar100", "svhn", "imagefolder", "tinyimagenet", "imagenet")
NEEDS_NO_ROOT: tuple[str, ...] = ("digits",)  # bundled with scikit-learn; every other set names its folder
VAL_FRACTION_BOUNDS = (0.0, 0.5)  # exclusive: at least half of the training pool trains
MIN_SUBSET = 10  # a stratified cap smaller than this leaves classes of a 10-class set empty
HEAD_KINDS: tuple[str, ...] = ("sdn", "linear", "mlp")  # IC heads: SDN pooling head (conv maps), linear or MLP (pooled maps or tokens)
# Libraries whose locally cached pretrained weights `net.init` reads as LIBRARY:NAME (stages.core.nets.pretrained)
PRETRAINED_LIBRARIES: tuple[str, ...] = ("torchvision", "timm")
# `net.init` naming a finished phase run of the tracking store: runs:/RUN_ID
RUN_PREFIX = "runs:/"
# data.resize: the square side images are resized to (e.g. CIFAR's 32 px to a pretrained ViT's 224)
RESIZE_BOUNDS = (8, 1024)


def pretrained_source(init: str) -> tuple[str, str] | None:
    """`net.init` as (library, weights name) when it reads LIBRARY:NAME; None for a file or a run.
    A library with no name after it is a ValueError."""
    library, sep, name = init.partition(":")
    if not sep or library not in PRETRAINED_LIBRARIES:
        return None
    if not name.strip():
        raise ValueError(f"{init!r}: name the weights after '{library}:', e.g. torchvision:resnet50.IMAGENET1K_V2")
    return library, name.strip()
