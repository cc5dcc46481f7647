"""`exitflow data` readers for the array datasets: torchvision's CIFAR-10/100 pickles and SVHN's .mat files.

Their images are stored as PNG, which is lossless.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from exitflow.stages.core.data.prepare_files import Layout, Row, SplitSource, png
from exitflow.stages.core.data.spec import DataError

SPLITS: tuple[str, ...] = ("train", "test")


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's batches hold dicts, lists, bytes and numpy arrays: any other object is refused, so a
    tampered file cannot run code while it is read."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how a protocol-2 pickle written by Python 3 stores bytes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[bytes, Any]:
    try:
        with path.open("rb") as f:
            d = _ArraysOnly(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path} is missing") from None
    except Exception as err:  # noqa: BLE001 - unpickling raises anything on a corrupt file
        raise DataError(f"corrupt CIFAR file {path}: {type(err).__name__}: {err}") from None
    if not isinstance(d, dict):
        raise DataError(f"corrupt CIFAR file {path}: holds a {type(d).__name__}, not a dict")
    return d


def _cifar_arrays(path: Path, label_key: bytes) -> tuple[np.ndarray, list[int]]:
    d = _unpickle(path)
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = [int(x) for x in d[label_key]]
    except (KeyError, ValueError, TypeError) as err:
        raise DataError(f"corrupt CIFAR file {path}: {type(err).__name__}: {err}") from None
    if len(labels) != len(data):
        raise DataError(f"corrupt CIFAR file {path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def _array_split(arrays: list[tuple[np.ndarray, list[int], Path]]) -> SplitSource:
    def rows() -> Iterator[Row]:
        for data, labels, path in arrays:
            for i, (pixels, label) in enumerate(zip(data, labels)):
                yield png(Image.fromarray(pixels)), label, f"{path}, image {i}"

    return SplitSource(sum(len(d) for d, _, _ in arrays), rows)


def read_cifar(source: Path, fmt: str) -> Layout:
    ten = fmt == "cifar10"
    folder = "cifar-10-batches-py" if ten else "cifar-100-python"
    base = source / folder
    base = base if base.is_dir() else source
    meta = _unpickle(base / ("batches.meta" if ten else "meta"))
    names_key = b"label_names" if ten else b"fine_label_names"
    if names_key not in meta:
        raise DataError(f"corrupt CIFAR file {base / ('batches.meta' if ten else 'meta')}: no {names_key.decode()}")
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key])
    label_key = b"labels" if ten else b"fine_labels"
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"]
    test_files = ["test_batch"] if ten else ["test"]
    splits = {}
    for name, files in (("train", train_files), ("test", test_files)):
        splits[name] = _array_split([(*_cifar_arrays(base / f, label_key), base / f) for f in files])
    mapping = (f"{', '.join(train_files)} -> train.parquet", f"{', '.join(test_files)} -> test.parquet")
    return Layout(classes, splits, shape=f"torchvision's {'CIFAR-10' if ten else 'CIFAR-100'} download folder", mapping=mapping)


def read_svhn(source: Path) -> Layout:
    from scipy.io import loadmat

    splits = {}
    for name in SPLITS:
        path = source / f"{name}_32x32.mat"
        try:
            mat = loadmat(path)
            x = np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2)  # [32, 32, 3, N] -> [N, 32, 32, 3]
            y = [int(v) % 10 for v in np.asarray(mat["y"]).reshape(-1)]  # label 10 is the digit 0
        except FileNotFoundError:
            raise DataError(f"{path} is missing") from None
        except Exception as err:  # noqa: BLE001 - scipy raises many types on a corrupt .mat
            raise DataError(f"corrupt SVHN file {path}: {type(err).__name__}: {err}") from None
        if len(x) != len(y):
            raise DataError(f"corrupt SVHN file {path}: {len(x)} images but {len(y)} labels")
        splits[name] = _array_split([(x, y, path)])
    mapping = ("train_32x32.mat -> train.parquet", "test_32x32.mat -> test.parquet")
    return Layout(tuple(str(d) for d in range(10)), splits, shape="SVHN's .mat files (label 10 is the digit 0)",
                  mapping=mapping)
