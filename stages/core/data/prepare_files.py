"""What every layout reader of `exitflow data` shares: the layout it returns and sound image bytes.

A reader only lists what goes where (cheap); images are decoded while `prepare` writes them.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from exitflow.stages.core.data.spec import DataError

# torchvision ImageFolder's extensions: what a folder of images is read for
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
KEPT_FORMATS = ("JPEG", "PNG")  # stored as they are; anything else is re-encoded as PNG

Row = tuple[bytes, int, str]  # encoded image, label, where it came from (for error messages)


@dataclass(frozen=True)
class SplitSource:
    count: int
    rows: Callable[[], Iterator[Row]]


@dataclass(frozen=True)
class SplitRecord:
    """A test split `exitflow data` made itself: how, and every file's side (`rows`: split, label, file)."""

    fraction: float
    seed: int
    rule: str  # how each class's test share is counted, in words
    rows: tuple[tuple[str, int, str], ...]  # ("train" | "test", label, file relative to the source), sorted


@dataclass(frozen=True)
class Layout:
    classes: tuple[str, ...]
    splits: dict[str, SplitSource]
    shape: str = ""  # the layout found, in words (e.g. "a flat folder: one folder per class")
    mapping: tuple[str, ...] = ()  # which folder became which Parquet file, one line each
    notes: tuple[str, ...] = ()  # what was skipped or not used, one line each
    split: SplitRecord | None = None  # set when the test split was made here


@dataclass(frozen=True)
class FolderOptions:
    """`exitflow data`'s options for image folders; None: not given (the defaults apply where they are used)."""

    test_fraction: float | None = None
    seed: int | None = None
    test_folder: str | None = None


def image_file(path: Path) -> bytes:
    """A file's bytes when it is a sound PNG or JPEG, else its pixels as PNG; a DataError naming it if
    it does not decode."""
    try:
        blob = path.read_bytes()
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
            if img.format in KEPT_FORMATS:
                return blob
            return png(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"corrupt image {path}: {type(err).__name__}: {err}") from None


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def is_image(path: Path) -> bool:
    """An image file by its name: an image suffix, not hidden (macOS's `._x.jpg` are not images)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image(p))


def file_split(items: list[tuple[Path, int]]) -> SplitSource:
    return SplitSource(len(items), lambda: ((image_file(p), label, str(p)) for p, label in items))


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
