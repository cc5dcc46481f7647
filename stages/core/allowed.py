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
# `net.backbone: timm:NAME`: any timm model as a backbone (stages.core.nets.timm_backbone)
TIMM_PREFIX = "timm:"
# `net.init` naming a finished phase run of the tracking store: runs:/RUN_ID
RUN_PREFIX = "runs:/"
# data.resize: the square side images are resized to (e.g. CIFAR's 32 px to a pretrained ViT's 224)
RESIZE_BOUNDS = (8, 1024)

# Caps: far above what any study needs, low enough that a typo (`max_epochs: 1.0e+35`, `thresholds:
# 1000000000000`) is refused by the spec, before anything allocates, loops or waits on it.
MAX_INT = 2**31 - 1  # every integer field: a C int, what torch's and numpy's size arguments take
MAX_EPOCHS = 10_000  # max_epochs, patience, warmup/step/kaya epochs, ASHA's grace period (the paper: <= 300)
MAX_BATCH = 65_536  # phases.*.batch_size, evaluation.batch_size (the largest published batches)
MAX_WIDTH = 8_192  # net.width, head_hidden, l2w_hidden (ViT-H/14: 1280; the paper's heads: 2048)
MAX_HEAD_LAYERS = 8  # an mlp head's hidden layers (the paper's: one or two)
MAX_DEPTH = 1_024  # net.depth, exit positions (ResNet-1202 has 600 blocks)
MAX_PARAMETERS = 1_000_000_000  # the net pre-flight builds (counted on torch's meta device first): 4 GB of float32 (ViT-H: 632M)
MAX_THRESHOLDS = 10_000  # evaluation.thresholds: the curve compares [thresholds, exits, test images] at once
MAX_PROCESSES = 4_096  # data/resources workers, torch threads, concurrent trials, worker restarts
MAX_TRIALS = 10_000  # a searched phase's learning rates: a grid's length, a range's num_samples
MAX_GRID = 1_000  # the analyses' points per line or grid axis (the paper: 150)
MAX_SAMPLES = 1_000_000  # the analyses' samples and features, every-N-steps intervals
MAX_VARIANTS = 1_000  # a study's comparison variants (the product of its `compare` axes' lengths)
MAX_SEEDS = 1_000  # a study's seeds
# The spec file itself, before pydantic sees it: its size, and its YAML's nesting and node count
# counted with every alias expanded (a billion-laughs file is a few hundred bytes)
MAX_SPEC_BYTES = 1 << 20
MAX_YAML_DEPTH = 64  # the spec's own deepest field is 5 levels down (phases.P1.lr.loguniform[0])
MAX_YAML_NODES = 10_000  # the largest example spec has under 200


def pretrained_source(init: str) -> tuple[str, str] | None:
    """`net.init` as (library, weights name) when it reads LIBRARY:NAME; None for a file or a run.
    A library with no name after it is a ValueError."""
    library, sep, name = init.partition(":")
    if not sep or library not in PRETRAINED_LIBRARIES:
        return None
    if not name.strip():
        raise ValueError(f"{init!r}: name the weights after '{library}:', e.g. torchvision:resnet50.IMAGENET1K_V2")
    return library, name.strip()
