"""Raw datasets per source, before any transform: items are (PIL image, int label), digits (tensor, label).

Every source yields a `RawSplit`: the dataset plus its labels as one int64 array, so that splitting
and subsetting never have to touch (or decode) the images.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset

from exitflow.stages.core.data.memo import memoized, sklearn_version
from exitflow.stages.core.data.spec import DataError
from exitflow.stages.core.data.split import sklearn_split

log = logging.getLogger(__name__)

# Digits: a fixed split, so the test set is the same whatever the experiment seed.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_MAX_VALUE = 16.0  # sklearn digits pixels are integers in [0, 16]
PARQUET_COLUMNS = ("image", "label")
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
IMAGEFOLDER_EVAL_DIRS = ("val", "test")


@dataclass(frozen=True)
class RawSplit:
    """One split of a source, untransformed."""

    dataset: Dataset  # items: (PIL image, label), or (normalized tensor, label) for digits
    labels: np.ndarray  # int64 [N], the label of every item, in item order


class TensorImages(Dataset):
    """Pre-stacked image tensors and labels: no per-item work beyond indexing."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.targets = labels

    @property
    def labels(self) -> np.ndarray:
        """Labels as an int64 numpy array (the common interface of every exitflow dataset)."""
        return self.targets.numpy()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.targets[i]

    def subset(self, indices: np.ndarray) -> "TensorImages":
        """A new dataset holding only `indices` (copied once, so indexing stays cheap)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorImages(self.images[idx], self.targets[idx])


def digits_splits(side: int | None = None) -> tuple[TensorImages, TensorImages]:
    """(train, test) of sklearn's bundled 8x8 digits as normalized [1, 8, 8] float tensors.

    Pixels are scaled to [0, 1], then standardized with the mean/std of the fixed train part;
    `side` resizes them (bilinear: it commutes with the standardisation) to [1, side, side].
    """
    x, y, train_idx, test_idx = _digits_arrays()
    mean, std = _train_stats(x, train_idx)
    images = torch.from_numpy((x - mean) / std).unsqueeze(1)  # [N, 1, 8, 8]
    if side is not None and side != images.shape[-1]:
        images = torch.nn.functional.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(y)
    full = TensorImages(images, labels)
    return full.subset(train_idx), full.subset(test_idx)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixels in [0, 1], labels, and the fixed train/test indices (sorted). Kept on disk (`memo`):
    loading them imports sklearn, a second of CPU in every process that trains or evaluates."""

    def compute() -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        y = bunch.target.astype(np.int64)
        train_idx, test_idx = sklearn_split(y, DIGITS_SPLIT_SEED, test_size=DIGITS_TEST_FRACTION)
        return {"x": bunch.images.astype(np.float32) / DIGITS_MAX_VALUE, "y": y, "train": train_idx, "test": test_idx}

    kept = memoized("digits", (DIGITS_MAX_VALUE, DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, sklearn_version()), compute)
    return kept["x"], kept["y"], kept["train"], kept["test"]


def digits_normalisation() -> tuple[float, float]:
    """(mean, std) of the fixed train part's [0, 1] pixels: what digits' tensors are standardized with."""
    x, _, train_idx, _ = _digits_arrays()
    return _train_stats(x, train_idx)


def _train_stats(x: np.ndarray, train_idx: np.ndarray) -> tuple[float, float]:
    return float(x[train_idx].mean()), float(x[train_idx].std())


DIGITS_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))


# ---------------------------------------------------------------- parquet


class EncodedImages(Dataset):
    """Encoded image bytes (PNG/JPEG) in one contiguous buffer, decoded lazily with PIL.

    One buffer + offsets instead of a pyarrow table or 50k bytes objects: it pickles to DataLoader
    workers and Ray tasks as two arrays, and decoding per item keeps memory at the encoded size.
    """

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray, labels: np.ndarray, mode: str) -> None:
        self.buffer = buffer  # uint8 [total bytes]
        self.offsets = offsets  # int64 [N + 1]; item i is buffer[offsets[i]:offsets[i+1]]
        self.labels = labels  # int64 [N]
        self.mode = mode  # PIL mode every image is converted to: "L" or "RGB"

    @classmethod
    def from_bytes(cls, blobs: list[bytes], labels: np.ndarray, mode: str) -> "EncodedImages":
        """Pack a list of encoded images."""
        lengths = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
        offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        return cls(buffer, offsets, labels, mode)

    def __len__(self) -> int:
        return len(self.labels)

    def raw(self, i: int) -> bytes:
        """The encoded bytes of item i."""
        return self.buffer[self.offsets[i] : self.offsets[i + 1]].tobytes()

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        img = Image.open(io.BytesIO(self.raw(i)))
        return img.convert(self.mode), int(self.labels[i])


def root_folder(kind: str, root: str) -> Path:
    """`root` as a folder, or a DataError saying that it does not exist or is not a folder."""
    folder = Path(root)
    if folder.is_dir():
        return folder
    if folder.exists():
        raise DataError(f"{kind} dataset: root {folder} is a file, not a folder")
    raise DataError(f"{kind} dataset: root folder {folder} does not exist")


def parquet_path(root: str, split: str) -> Path:
    """`root/<split>.parquet`, or a DataError naming what is missing."""
    folder = root_folder("parquet", root)
    path = folder / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"parquet dataset: {path} is missing (expected train.parquet and test.parquet in {folder})")
    return path


def parquet_schema(path: Path) -> pa.Schema:
    """The Arrow schema of a parquet file, checked for the `image` and `label` columns."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"parquet dataset: cannot read {path}: {err}") from err
    missing = [c for c in PARQUET_COLUMNS if c not in schema.names]
    if missing:
        raise DataError(f"parquet dataset: {path} lacks column(s) {missing}; has {schema.names}")
    image_type = schema.field("image").type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise DataError(f"parquet dataset: {path} column 'image' must hold encoded bytes, is {image_type}")
    if not pa.types.is_integer(schema.field("label").type):
        raise DataError(f"parquet dataset: {path} column 'label' must be integer, is {schema.field('label').type}")
    return schema


def parquet_classes(schema: pa.Schema) -> tuple[str, ...] | None:
    """Class names from the schema metadata key `classes`: a JSON list or a comma-separated string."""
    raw = (schema.metadata or {}).get(b"classes")
    if raw is None:
        return None
    text = raw.decode("utf-8").strip()
    if text.startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"parquet dataset: schema metadata 'classes' is not valid JSON: {err}") from err
        return tuple(str(n) for n in names)
    return tuple(n.strip() for n in text.split(",") if n.strip())


def read_parquet_labels(path: Path) -> np.ndarray:
    """The label column alone (cheap: parquet is columnar), as int64; nulls are an error."""
    column = pq.read_table(path, columns=["label"]).column("label")
    if column.null_count:
        raise DataError(f"parquet dataset: {path} has {column.null_count} null label(s)")
    return column.to_numpy().astype(np.int64)


def read_parquet_split(path: Path, mode: str | None = None) -> EncodedImages:
    """Read a whole parquet split into memory (encoded); `mode` None -> taken from the first image."""
    parquet_schema(path)
    table = pq.read_table(path, columns=list(PARQUET_COLUMNS))
    image_col = table.column("image")
    if image_col.null_count:
        raise DataError(f"parquet dataset: {path} has {image_col.null_count} null image(s)")
    labels = read_parquet_labels(path)
    blobs = image_col.to_pylist()
    if not blobs:
        raise DataError(f"parquet dataset: {path} has no rows")
    if mode is None:
        mode = pil_mode(open_image(blobs[0], path, 0))
    log.debug("read %d images from %s (mode %s)", len(blobs), path, mode)
    return EncodedImages.from_bytes(blobs, labels, mode)


def open_image(blob: bytes, path: Path | str, row: int) -> Image.Image:
    """Fully decode one encoded image, or a DataError naming the file and row."""
    try:
        img = Image.open(io.BytesIO(blob))
        img.load()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError...) on bad bytes
        raise DataError(f"corrupt image at row {row} of {path}: {type(err).__name__}: {err}") from err
    return img


def pil_mode(img: Image.Image) -> str:
    """The mode a dataset converts every image to: "L" for grayscale sources, else "RGB"."""
    return "L" if img.mode in GRAYSCALE_MODES else "RGB"


# ---------------------------------------------------------------- torchvision


def cifar_split(name: str, root: str, train: bool, download: bool) -> RawSplit:
    """torchvision CIFAR-10/100 (PIL images, no transform)."""
    from torchvision import datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    if Path(root).exists():
        root_folder(name, root)  # a file there: say so (torchvision would say "not found or corrupted")
    try:
        ds = cls(root=root, train=train, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DataError(f"{name}: not found under {root} ({err}); set download: true to fetch it") from err
    return RawSplit(ds, np.asarray(ds.targets, dtype=np.int64))


def imagefolder_dir(root: str, split: str) -> Path:
    """`root/train`, or `root/val` (falling back to `root/test`) for the test split."""
    base = root_folder("imagefolder", root)
    names = ("train",) if split == "train" else IMAGEFOLDER_EVAL_DIRS
    for name in names:
        if (base / name).is_dir():
            return base / name
    hint = ("; a flat folder of class folders (SOURCE/<class>/*) is split with `exitflow data SOURCE OUT`, then read "
            "with data: {name: parquet, root: OUT}") if split == "train" else ""
    raise DataError(f"imagefolder dataset: {base} has no {' or '.join(names)} folder (data.name: imagefolder reads "
                    f"root/train/<class>/* and root/val/<class>/* or root/test/<class>/*){hint}")


def imagefolder_split(root: str, split: str) -> RawSplit:
    """torchvision ImageFolder over `root/train` or `root/val|test` (class folders)."""
    from torchvision import datasets as tvd

    folder = imagefolder_dir(root, split)
    try:
        ds = tvd.ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as err:  # no class folders / no valid image files
        raise DataError(f"imagefolder dataset: {folder}: {err}") from err
    return RawSplit(ds, np.asarray(ds.targets, dtype=np.int64))
