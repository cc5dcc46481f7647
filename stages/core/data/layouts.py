"""Which layout a folder is (`detect_format`) and the reader of each layout `exitflow data` knows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from exitflow.stages.core.data.image_folder import has_class_folders, read_imagefolder
from exitflow.stages.core.data.layout_help import unknown_layout
from exitflow.stages.core.data.layouts_arrays import read_cifar, read_svhn
from exitflow.stages.core.data.layouts_images import read_imagenet, read_tinyimagenet
from exitflow.stages.core.data.prepare_files import FolderOptions, Layout
from exitflow.stages.core.data.spec import DataError


def detect_format(source: Path) -> str:
    """The layout of `source`, from the files each one has, or a DataError drawing the layouts it knows."""
    if (source / "cifar-10-batches-py").is_dir() or (source / "batches.meta").is_file():
        return "cifar10"
    if (source / "cifar-100-python").is_dir() or ((source / "meta").is_file() and (source / "train").is_file()):
        return "cifar100"
    if (source / "train_32x32.mat").is_file():
        return "svhn"
    if (source / "wnids.txt").is_file():
        return "tinyimagenet"
    if (source / "LOC_val_solution.csv").is_file():
        return "imagenet"
    if (source / "train").is_dir() or has_class_folders(source):
        return "imagefolder"
    raise DataError(unknown_layout(source))


READERS: dict[str, Callable[[Path], Layout]] = {
    "cifar10": lambda s: read_cifar(s, "cifar10"),
    "cifar100": lambda s: read_cifar(s, "cifar100"),
    "svhn": read_svhn,
    "tinyimagenet": read_tinyimagenet,
    "imagenet": read_imagenet,
}


def read_layout(source: Path, fmt: str, options: FolderOptions) -> Layout:
    """What goes into each split of `source` read as `fmt`; the image-folder options only where they apply."""
    if fmt == "imagefolder":
        return read_imagefolder(source, options)
    given = [flag for flag, value in (("--test-fraction", options.test_fraction), ("--seed", options.seed),
                                      ("--test-folder", options.test_folder)) if value is not None]
    if given:
        raise DataError(f"{given[0]}: {fmt} has its own train and test splits; the option applies to image folders "
                        "(a flat folder of class folders, or train/ with val/ or test/)")
    return READERS[fmt](source)
