"""`exitflow data` readers for Tiny ImageNet and ImageNet (their labelled validation sets become the test
split: their test sets have no public labels). PNG and JPEG files are kept byte for byte."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from exitflow.stages.core.data.prepare_files import Layout, file_split, image_files, read_text
from exitflow.stages.core.data.spec import DataError


def class_folders(folder: Path, classes: tuple[str, ...] | None = None, sub: str = "") -> list[tuple[Path, int]]:
    """(file, label) of `folder/<class>/<sub>/*`; the classes are the folder's (sorted) unless given."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    names = classes if classes is not None else visible_folders(folder)
    index = {n: i for i, n in enumerate(names)}
    items = []
    for d in sorted(x for x in folder.iterdir() if x.is_dir() and not x.name.startswith(".")):
        if d.name not in index:
            raise DataError(f"{d}: class {d.name!r} is not one of the training classes")
        items += [(p, index[d.name]) for p in image_files(d / sub if sub else d)]
    return items


def visible_folders(folder: Path) -> tuple[str, ...]:
    """The names of `folder`'s sub-folders, sorted, hidden ones (`.ipynb_checkpoints`) left out."""
    return tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")))


def _eval_folder(source: Path) -> Path:
    for name in ("val", "test"):
        if (source / name).is_dir():
            return source / name
    raise DataError(f"{source}: no val or test folder")


def read_tinyimagenet(source: Path) -> Layout:
    wnids = tuple(sorted(line.strip() for line in read_text(source / "wnids.txt").splitlines() if line.strip()))
    index = {w: i for i, w in enumerate(wnids)}
    train = class_folders(source / "train", wnids, sub="images")
    annotations = source / "val" / "val_annotations.txt"
    test = []
    for n, line in enumerate(read_text(annotations).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise DataError(f"{annotations}, line {n}: expected 'file<TAB>wnid...' with a wnid of wnids.txt, got {line!r}")
        test.append((source / "val" / "images" / parts[0], index[parts[1]]))
    names = _synset_names(source / "words.txt", wnids, sep="\t")
    mapping = ("train/<wnid>/images/ -> train.parquet",
               "val/images/ (labelled by val/val_annotations.txt) -> test.parquet (Tiny ImageNet's test/ has no labels)")
    return Layout(names, {"train": file_split(train), "test": file_split(test)}, shape="Tiny ImageNet", mapping=mapping)


def read_imagenet(source: Path) -> Layout:
    train_dir = source / "train"
    classes = visible_folders(train_dir) if train_dir.is_dir() else ()
    if not classes:
        raise DataError(f"{train_dir}: no class folders")
    train = class_folders(train_dir, classes)
    val = _eval_folder(source)
    if visible_folders(val):
        test = class_folders(val, classes)
        how = f"{val.name}/<wnid>/"
    else:
        test = _val_solution(source / "LOC_val_solution.csv", val, {w: i for i, w in enumerate(classes)})
        how = f"{val.name}/ (labelled by LOC_val_solution.csv)"
    names = _synset_names(source / "LOC_synset_mapping.txt", classes, sep=" ")
    mapping = ("train/<wnid>/ -> train.parquet", f"{how} -> test.parquet (ImageNet's test set has no public labels)")
    return Layout(names, {"train": file_split(train), "test": file_split(test)}, shape="ImageNet", mapping=mapping)


def _val_solution(path: Path, folder: Path, index: dict[str, int]) -> list[tuple[Path, int]]:
    """ImageNet's flat validation folder, labelled by the Kaggle solution file (ImageId,PredictionString)."""
    rows = list(csv.reader(io.StringIO(read_text(path))))
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise DataError(f"{path}: expected the header 'ImageId,PredictionString'")
    files = {p.stem: p for p in image_files(folder)}
    items = []
    for n, row in enumerate(rows[1:], 2):
        wnid = row[1].split()[0] if len(row) > 1 and row[1].split() else ""
        if wnid not in index:
            raise DataError(f"{path}, line {n}: {wnid!r} is not a class of the train folder")
        if row[0] not in files:
            raise DataError(f"{path}, line {n}: no image {row[0]!r} in {folder}")
        items.append((files[row[0]], index[wnid]))
    return sorted(items)


def _synset_names(path: Path, wnids: tuple[str, ...], sep: str) -> tuple[str, ...]:
    """The first name of each wnid from a synset file (`wnid<sep>name, other names`), else the wnids."""
    if not path.is_file():
        return wnids
    names = {}
    for line in read_text(path).splitlines():
        wnid, _, rest = line.partition(sep)
        names[wnid.strip()] = rest.split(",")[0].strip() or wnid.strip()
    return tuple(names.get(w, w) for w in wnids)
