"""`exitflow data` on image folders as people keep them (torchvision's ImageFolder layouts).

- flat: `SOURCE/<class>/*` (files in sub-folders of a class folder count, as ImageFolder reads them):
  exitflow makes the test split, stratified per class and seeded (`split_per_class`), and records it;
- split already: `SOURCE/train/<class>/*` with `val/<class>/*` or `test/<class>/*`: train/ becomes
  train.parquet, the labelled evaluation folder test.parquet (val/ before test/ unless --test-folder
  names one); train/ with no labelled evaluation folder is split as a flat folder is.

Class names are the folder names, sorted (label order, as ImageFolder). Files that are not images
by their suffix, hidden files and folders, and folders without images are skipped, and the notes
say which; a file with an image suffix that does not decode is refused when it is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from exitflow.stages.core.data.layout_help import unknown_layout
from exitflow.stages.core.data.prepare_files import FolderOptions, Layout, SplitRecord, file_split, is_image
from exitflow.stages.core.data.spec import DataError

DEFAULT_TEST_FRACTION = 0.2
DEFAULT_SEED = 0
EVAL_FOLDERS = ("val", "test")
MIN_TRAIN_PER_CLASS = 2  # training holds out a stratified validation share of train: 1 each side
MIN_TO_SPLIT = MIN_TRAIN_PER_CLASS + 1  # and one image for test
JUNK_FOLDERS = frozenset({"__MACOSX"})  # macOS's zip resource forks
SPLIT_RULE = ("per class: round(fraction x its images) go to test, at least 1 and leaving at least "
              f"{MIN_TRAIN_PER_CLASS} to train; which ones: a shuffle seeded by the seed and the class name")
_NAMED = 4  # skipped files named in a note


@dataclass
class Scan:
    """A folder read as one folder per class."""

    classes: list[tuple[str, list[Path]]] = field(default_factory=list)  # name, its image files (sorted)
    skipped_files: list[Path] = field(default_factory=list)  # not images by their name
    skipped_folders: list[tuple[Path, str]] = field(default_factory=list)  # hidden, junk, or holding no image: why
    loose_images: list[Path] = field(default_factory=list)  # images beside the class folders


def scan_classes(folder: Path) -> Scan:
    scan = Scan()
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            if entry.name.startswith(".") or entry.name in JUNK_FOLDERS:
                scan.skipped_folders.append((entry, "hidden" if entry.name.startswith(".") else "macOS zip residue"))
                continue
            images, others = _walk(entry)
            scan.skipped_files += others
            if images:
                scan.classes.append((entry.name, images))
            else:
                scan.skipped_folders.append((entry, "no image files"))
        elif is_image(entry):
            scan.loose_images.append(entry)
        else:
            scan.skipped_files.append(entry)
    return scan


def has_class_folders(folder: Path) -> bool:
    """Whether `folder` holds a (visible) folder with an image file in it: a flat image folder."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.name.startswith(".") and entry.name not in JUNK_FOLDERS:
            for _, dirs, files in os.walk(entry):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                if any(is_image(Path(f)) for f in files):
                    return True
    return False


def _walk(folder: Path) -> tuple[list[Path], list[Path]]:
    """(images, other files) anywhere under `folder`, hidden folders left out; each sorted."""
    images, others = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            (images if is_image(Path(name)) else others).append(Path(root) / name)
    return sorted(images), sorted(others)


def read_imagefolder(source: Path, options: FolderOptions = FolderOptions()) -> Layout:
    if options.test_folder is not None:
        name = options.test_folder.rstrip("/")
        if not name or "/" in name or name in (".", ".."):
            raise DataError(f"--test-folder {options.test_folder!r}: the name of a folder beside train/, e.g. val or test")
        options = dataclasses.replace(options, test_folder=name)
    if (source / "train").is_dir():
        return _read_train_eval(source, options)
    if options.test_folder is not None:
        raise DataError(f"--test-folder {options.test_folder}: {source} has no train/ folder, so nothing to pair it with\n"
                        + unknown_layout(source, "not an image folder with train/"))
    scan = scan_classes(source)
    if not scan.classes:
        raise DataError(unknown_layout(source, "no class folders with images"))
    return _split_layout(source, source, scan, options, "a flat folder: one folder per class", ())


def _read_train_eval(source: Path, options: FolderOptions) -> Layout:
    train_dir = source / "train"
    scan = scan_classes(train_dir)
    if not scan.classes:
        raise DataError(unknown_layout(train_dir, "no class folders with images"))
    evals = _eval_scans(source, options)
    labelled = [name for name, s in evals.items() if s.classes]
    unused = [f"{name}/ holds no class folders (unlabelled images?): not used" for name, s in evals.items() if not s.classes]
    chosen = options.test_folder or (labelled[0] if labelled else None)
    if chosen is None:
        mapping = ("train/ -> train.parquet and test.parquet, split here (below): no labelled val/ or test/ beside it",)
        return _split_layout(source, train_dir, scan, options, "an image folder with train/ alone", mapping, tuple(unused))
    if options.test_fraction is not None or options.seed is not None:
        given = "--test-fraction" if options.test_fraction is not None else "--seed"
        raise DataError(f"{given}: {source} has its own test split ({chosen}/ -> test.parquet); "
                        "the split options apply to a flat folder, or train/ alone")
    if not evals[chosen].classes:
        raise DataError(f"--test-folder {chosen}: {source / chosen} holds no class folders with images")
    classes = tuple(name for name, _ in scan.classes)
    _refuse_small_classes(train_dir, scan, MIN_TRAIN_PER_CLASS, "training holds out a stratified validation share of train")
    index = {name: i for i, name in enumerate(classes)}
    test = []
    for name, files in evals[chosen].classes:
        if name not in index:
            raise DataError(f"{source / chosen / name}: class {name!r} is not one of train/'s classes {_listed(classes)}")
        test += [(p, index[name]) for p in files]
    train = [(p, index[name]) for name, files in scan.classes for p in files]
    notes = [*unused, *_scan_notes(source, scan), *_scan_notes(source, evals[chosen])]
    notes += [f"{name}/ is not used ({chosen}/ became test.parquet; --test-folder {name} takes it instead)"
              for name in labelled if name != chosen]
    missing = [n for n in classes if n not in {name for name, _ in evals[chosen].classes}]
    if missing:
        notes.append(f"{chosen}/ has no images of {len(missing)} class(es): {_listed(tuple(missing))}")
    mapping = ("train/ -> train.parquet",
               f"{chosen}/ -> test.parquet (the test split: evaluated only, never trained or stopped on)")
    return Layout(classes, {"train": file_split(train), "test": file_split(test)},
                  shape=f"an image folder with train/ and {chosen}/", mapping=mapping, notes=tuple(notes))


def _eval_scans(source: Path, options: FolderOptions) -> dict[str, Scan]:
    """The evaluation folders present (val/, test/, and --test-folder's), read as class folders."""
    names = list(EVAL_FOLDERS)
    if options.test_folder is not None:
        if options.test_folder == "train" or not (source / options.test_folder).is_dir():
            present = sorted(p.name + "/" for p in source.iterdir() if p.is_dir() and p.name != "train")
            raise DataError(f"--test-folder {options.test_folder}: no such folder beside train/ in {source} "
                            f"(folders there: {', '.join(present) or 'none'})")
        names = [options.test_folder] + [n for n in names if n != options.test_folder]
    return {n: scan_classes(source / n) for n in names if (source / n).is_dir()}


def _split_layout(source: Path, folder: Path, scan: Scan, options: FolderOptions, shape: str,
                  mapping: tuple[str, ...], notes: tuple[str, ...] = ()) -> Layout:
    fraction = DEFAULT_TEST_FRACTION if options.test_fraction is None else options.test_fraction
    seed = DEFAULT_SEED if options.seed is None else options.seed
    _check_split_options(fraction, seed)
    if len(scan.classes) < 2:
        raise DataError(f"{folder}: {len(scan.classes)} class folder(s) with images; a classifier needs at least 2")
    _refuse_small_classes(folder, scan, MIN_TO_SPLIT,
                          f"1 for test.parquet and {MIN_TRAIN_PER_CLASS} for train.parquet, where training holds out "
                          "a stratified validation share")
    record = split_per_class([files for _, files in scan.classes], [n for n, _ in scan.classes], fraction, seed, source)
    items: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    for side, label, rel in record.rows:
        items[side].append((source / rel, label))
    mapping = mapping or (f"{source.name}/<class>/ -> train.parquet and test.parquet, split here (below)",)
    splits = {side: file_split(sorted(v, key=lambda x: (x[1], x[0]))) for side, v in items.items()}  # by label, then file
    return Layout(tuple(n for n, _ in scan.classes), splits,
                  shape=shape, mapping=mapping, notes=(*notes, *_scan_notes(source, scan)), split=record)


def split_per_class(files: list[list[Path]], names: list[str], fraction: float, seed: int, source: Path) -> SplitRecord:
    """Each class's files to train or test: round(fraction x n) to test (at least 1, leaving at least
    MIN_TRAIN_PER_CLASS), chosen by a shuffle seeded by (seed, the class name), so a class's split
    does not move when another class changes."""
    _check_split_options(fraction, seed)
    rows = []
    for label, (name, paths) in enumerate(zip(names, files)):
        n = len(paths)
        k = min(n - MIN_TRAIN_PER_CLASS, max(1, math.floor(fraction * n + 0.5)))
        name_key = int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()[:8], "little")
        test = set(np.random.default_rng([seed, name_key]).permutation(n)[:k].tolist())
        rows += [("test" if i in test else "train", label, p.relative_to(source).as_posix()) for i, p in enumerate(paths)]
    return SplitRecord(fraction, seed, SPLIT_RULE, tuple(sorted(rows, key=lambda r: (r[1], r[2], r[0]))))


def _check_split_options(fraction: float, seed: int) -> None:
    if isinstance(fraction, bool) or not 0.0 < fraction < 1.0:
        raise DataError(f"--test-fraction must lie strictly between 0 and 1, got {fraction}")
    if isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise DataError(f"--seed must be an integer in [0, 2**63), got {seed}")


def _refuse_small_classes(folder: Path, scan: Scan, least: int, why: str) -> None:
    small = [(name, len(files)) for name, files in scan.classes if len(files) < least]
    if small:
        shown = ", ".join(f"{name!r} has {k} image{'s' if k != 1 else ''}" for name, k in small[:8])
        more = f" and {len(small) - 8} more" if len(small) > 8 else ""
        raise DataError(f"{folder}: too few images in {len(small)} class folder(s): {shown}{more}; every class needs "
                        f"at least {least} ({why}); add images, or remove the class folder")


def _scan_notes(source: Path, scan: Scan) -> list[str]:
    notes = []
    if scan.skipped_files:
        names = [p.relative_to(source).as_posix() for p in scan.skipped_files]
        more = f" and {len(names) - _NAMED} more" if len(names) > _NAMED else ""
        notes.append(f"skipped {len(names)} file(s) that are not images by their name: {', '.join(names[:_NAMED])}{more}")
    if scan.loose_images:
        where = scan.loose_images[0].parent.relative_to(source).as_posix()
        notes.append(f"skipped {len(scan.loose_images)} image(s) directly in {where if where != '.' else 'SOURCE'}/, "
                     "outside every class folder (no label)")
    if scan.skipped_folders:
        shown = [f"{p.relative_to(source).as_posix()}/ ({why})" for p, why in scan.skipped_folders]
        notes.append(f"skipped folder(s): {_listed(tuple(shown))}")
    return notes


def _listed(names: tuple[str, ...], shown: int = 6) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
