"""Data: digits, parquet folders, the shared CIFAR-10 parquet, splits and check_dataset."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from exitflow.pipeline.spec import SpecError, load_spec
from exitflow.stages.core.data import (
    DataError,
    DatasetInfo,
    DataSpec,
    check_dataset,
    dataset_info,
    load_splits,
    make_loader,
    stratified_split,
)

CIFAR_PARQUET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def _png(rng: np.random.Generator, side: int, mode: str) -> bytes:
    shape = (side, side, 3) if mode == "RGB" else (side, side)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet_folder(
    root: Path,
    n_train: int = 60,
    n_test: int = 20,
    num_classes: int = 3,
    side: int = 16,
    mode: str = "RGB",
    classes_meta: bytes | None = b"cat,dog,bird",
    corrupt_test_row: int | None = None,
) -> Path:
    """A tiny parquet dataset folder: train.parquet / test.parquet with PNG bytes and int labels."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        images = [_png(rng, side, mode) for _ in range(n)]
        if split == "test" and corrupt_test_row is not None:
            images[corrupt_test_row] = images[corrupt_test_row][:40]  # truncated PNG
        labels = np.arange(n) % num_classes
        table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int16())})
        if classes_meta is not None:
            table = table.replace_schema_metadata({"classes": classes_meta})
        pq.write_table(table, root / f"{split}.parquet")
    return root


# ---------------------------------------------------------------- spec


def test_spec_round_trip_and_validation() -> None:
    spec = DataSpec(name="parquet", root="/data/x", train_subset=100)
    assert DataSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(DataError, match="unknown dataset"):
        DataSpec(name="mnist")
    with pytest.raises(DataError, match="root"):
        DataSpec(name="parquet")
    with pytest.raises(DataError, match="unknown field"):
        DataSpec.from_dict({"name": "digits", "bogus": 1})


# ---------------------------------------------------------------- digits


def test_digits_shapes_and_info() -> None:
    spec = DataSpec()
    info = dataset_info(spec)
    assert info == DatasetInfo(10, 1, 8, tuple(str(i) for i in range(10)))
    assert check_dataset(spec) == info
    splits = load_splits(spec, seed=0)
    x, y = splits.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert 0 <= int(y) < 10
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert len(splits.test) == 360
    assert len(splits.val) == round(0.1 * (1797 - 360))
    # Standardized with the fixed train part's statistics.
    assert abs(float(splits.train.images.mean())) < 0.1 and abs(float(splits.train.images.std()) - 1) < 0.1


def test_digits_stratified_deterministic_disjoint() -> None:
    spec = DataSpec()
    a, b, c = load_splits(spec, 0), load_splits(spec, 0), load_splits(spec, 1)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.targets, b.train.targets)
    assert not torch.equal(a.val.images, c.val.images)
    # The test set never depends on the seed.
    assert torch.equal(a.test.images, c.test.images)
    # No sample in both train and val (digits rows are distinct images, so compare the pixels).
    train_rows = {tuple(r.tolist()) for r in a.train.images.flatten(1)}
    assert not any(tuple(r.tolist()) in train_rows for r in a.val.images.flatten(1))
    full = np.bincount(np.concatenate([a.train.labels, a.val.labels]), minlength=10) / (len(a.train) + len(a.val))
    for part in (a.val, a.test):
        share = np.bincount(part.labels, minlength=10) / len(part)
        assert np.abs(share - full).max() < 0.02


def test_digits_subsets_are_stratified_caps() -> None:
    splits = load_splits(DataSpec(train_subset=200, test_subset=100), seed=0)
    assert len(splits.train) + len(splits.val) == 200
    assert len(splits.test) == 100
    assert np.bincount(splits.test.labels, minlength=10).min() >= 9


def test_stratified_split_deterministic() -> None:
    labels = np.repeat(np.arange(4), 25)
    tr, va = stratified_split(labels, 0.2, seed=3)
    tr2, va2 = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert len(va) == 20 and not set(tr) & set(va) and len(tr) + len(va) == 100
    assert np.array_equal(np.bincount(labels[va]), [5, 5, 5, 5])


def test_make_loader_seeded() -> None:
    splits = load_splits(DataSpec(), seed=0)
    first = [next(iter(make_loader(splits.train, 32, shuffle=True, seed=7)))[1] for _ in range(2)]
    other = next(iter(make_loader(splits.train, 32, shuffle=True, seed=8)))[1]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], other)
    batches = list(make_loader(splits.val, 50, shuffle=False, seed=0, drop_last=True))
    assert all(x.shape == (50, 1, 8, 8) for x, _ in batches)


# ---------------------------------------------------------------- parquet


def test_parquet_info_and_splits(tmp_path: Path) -> None:
    root = write_parquet_folder(tmp_path / "ds")
    spec = DataSpec(name="parquet", root=str(root), val_fraction=0.2)
    info = check_dataset(spec)
    assert info == DatasetInfo(3, 3, 16, ("cat", "dog", "bird"))
    splits = load_splits(spec, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (48, 12, 20)
    assert np.array_equal(np.bincount(splits.val.labels), [4, 4, 4])
    assert not set(splits.train.indices) & set(splits.val.indices)
    x, y = splits.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    # Val and test are never augmented: the same item twice is the same tensor.
    for ds in (splits.val, splits.test):
        assert torch.equal(ds[3][0], ds[3][0])
    # Train is: random crops/flips differ across draws of one item.
    draws = [splits.train[0][0] for _ in range(10)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    # The val split shares the raw images with train but not its transform.
    assert splits.val.base is splits.train.base and splits.val.transform is not splits.train.transform
    batch = next(iter(make_loader(splits.train, 8, shuffle=True, seed=0, num_workers=1)))
    assert batch[0].shape == (8, 3, 16, 16)
    # What analyses read as "train": the same images as train, through val's (eval) transform.
    assert np.array_equal(splits.train_eval.indices, splits.train.indices)
    assert splits.train_eval.transform is splits.val.transform and torch.equal(splits.train_eval[0][0], splits.train_eval[0][0])


def test_analysis_batches_read_train_unaugmented_and_never_val_images() -> None:
    from exitflow.stages.core.analysis.batch import analysis_batch
    from exitflow.stages.core.augment import Augmentations

    plain = load_splits(DataSpec(name="digits"), seed=0)
    aug = load_splits(DataSpec(name="digits", augmentations=Augmentations(rotation=90, random_erasing=1.0)), seed=0)
    x, y = analysis_batch(aug, "train", 50, seed=3)
    x0, y0 = analysis_batch(plain, "train", 50, seed=3)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # the augmentations never reach an analysis
    every = analysis_batch(plain, "train", 10_000, seed=3)[0]
    assert len(every) == len(plain.train)  # capped at the split
    val = {tuple(plain.val[i][0].flatten().tolist()) for i in range(len(plain.val))}
    assert not any(tuple(row.flatten().tolist()) in val for row in x0)
    with pytest.raises(ValueError, match="train, test, val"):
        analysis_batch(plain, "everything", 5, seed=0)


def test_parquet_grayscale_json_classes(tmp_path: Path) -> None:
    meta = json.dumps(["zero", "one"]).encode()
    root = write_parquet_folder(tmp_path / "ds", num_classes=2, mode="L", classes_meta=meta, side=12)
    spec = DataSpec(name="parquet", root=str(root), augment=False)
    assert check_dataset(spec) == DatasetInfo(2, 1, 12, ("zero", "one"))
    splits = load_splits(spec, seed=0)
    assert splits.train[0][0].shape == (1, 12, 12)
    assert torch.equal(splits.train[0][0], splits.train[0][0])  # augment=False: train is deterministic too


def test_parquet_without_classes_metadata(tmp_path: Path) -> None:
    root = write_parquet_folder(tmp_path / "ds", classes_meta=None, num_classes=4)
    assert dataset_info(DataSpec(name="parquet", root=str(root))).classes == ("0", "1", "2", "3")


def test_parquet_large_images_use_imagenet_transforms(tmp_path: Path) -> None:
    root = write_parquet_folder(tmp_path / "ds", n_train=20, n_test=6, side=80)
    splits = load_splits(DataSpec(name="parquet", root=str(root), val_fraction=0.2), seed=0)
    assert splits.info.img_size == 80
    assert splits.train[0][0].shape == (3, 80, 80) and splits.test[0][0].shape == (3, 80, 80)


def test_check_dataset_corrupt_bytes(tmp_path: Path) -> None:
    root = write_parquet_folder(tmp_path / "ds", corrupt_test_row=7)
    with pytest.raises(DataError, match=r"corrupt image at row 7 of .*test\.parquet"):
        check_dataset(DataSpec(name="parquet", root=str(root)))


def test_check_dataset_one_class(tmp_path: Path) -> None:
    root = write_parquet_folder(tmp_path / "ds", num_classes=1, classes_meta=b"only")
    with pytest.raises(DataError, match="at least 2"):
        check_dataset(DataSpec(name="parquet", root=str(root)))


def test_check_dataset_label_out_of_range(tmp_path: Path) -> None:
    root = write_parquet_folder(tmp_path / "ds", num_classes=4, classes_meta=b"a,b,c")
    with pytest.raises(DataError, match=r"label 3 at row 3 is outside \[0, 3\)"):
        check_dataset(DataSpec(name="parquet", root=str(root)))


def test_check_dataset_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        check_dataset(DataSpec(name="parquet", root=str(tmp_path / "nope")))
    (tmp_path / "half").mkdir()
    pq.write_table(pa.table({"image": pa.array([b""], pa.binary()), "label": [0]}), tmp_path / "half" / "train.parquet")
    with pytest.raises(DataError, match=r"test\.parquet is missing"):
        check_dataset(DataSpec(name="parquet", root=str(tmp_path / "half")))
    (tmp_path / "cols").mkdir()
    for split in ("train", "test"):
        table = pa.table({"img": pa.array([b""], pa.binary()), "label": [0]})
        pq.write_table(table, tmp_path / "cols" / f"{split}.parquet")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['image'\]"):
        check_dataset(DataSpec(name="parquet", root=str(tmp_path / "cols")))
    with pytest.raises(DataError, match="does not exist"):
        check_dataset(DataSpec(name="imagefolder", root=str(tmp_path / "nope")))


def test_imagefolder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    spec = DataSpec(name="imagefolder", root=str(tmp_path), val_fraction=0.34)
    assert check_dataset(spec) == DatasetInfo(2, 3, 40, ("a", "b"))
    splits = load_splits(spec, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 4, 4)
    assert splits.train[0][0].shape == (3, 40, 40) and splits.test[0][0].shape == (3, 40, 40)
    (tmp_path / "val" / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(DataError, match=r"corrupt image .*0\.png"):
        check_dataset(spec)


@pytest.mark.cifar
def test_shared_cifar10_parquet() -> None:
    if not (CIFAR_PARQUET / "train.parquet").is_file():
        pytest.skip(f"{CIFAR_PARQUET} is absent")
    spec = DataSpec(name="parquet", root=str(CIFAR_PARQUET), train_subset=2000, test_subset=500)
    info = dataset_info(spec)
    assert info.num_classes == 10 and info.in_chans == 3 and info.img_size == 32
    assert info.classes[0] == "airplane" and info.classes[-1] == "truck"
    splits = load_splits(spec, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1800, 200, 500)
    assert np.array_equal(np.bincount(splits.test.labels), [50] * 10)
    x = torch.stack([splits.val[i][0] for i in range(0, 200, 4)])
    assert x.shape == (50, 3, 32, 32)
    # Normalized with the estimated train statistics: roughly zero mean, unit std per channel.
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.3 and (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.3


def test_check_dataset_missing_torchvision_cifar(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar10: not found under"):
        check_dataset(DataSpec(name="cifar10", root=str(tmp_path)))


# ---------------------------------------------------------------- resize


def test_resize_sets_the_input_side_of_every_split(tmp_path: Path) -> None:
    root = write_parquet_folder(tmp_path / "ds")  # 16 px images
    for side in (24, 64):  # pad-and-crop style; ImageNet style (>= 64 px)
        spec = DataSpec(name="parquet", root=str(root), val_fraction=0.2, resize=side)
        assert dataset_info(spec).img_size == side
        splits = load_splits(spec, seed=0)
        for ds in (splits.train, splits.val, splits.test, splits.train_eval):
            assert ds[0][0].shape == (3, side, side)
        names = [type(t).__name__ for t in splits.test.transform.transforms]
        assert names[0] == "Resize" and "CenterCrop" in names  # small: resize first; ImageNet style: resize, centre crop
    native = load_splits(DataSpec(name="parquet", root=str(root), val_fraction=0.2), seed=0)
    assert native.test[0][0].shape == (3, 16, 16) and type(native.test.transform.transforms[0]).__name__ == "CenterCrop"


def test_digits_resize_is_the_bilinear_image_of_the_standardised_pixels() -> None:
    plain = load_splits(DataSpec(name="digits"), seed=0)
    big = load_splits(DataSpec(name="digits", resize=16), seed=0)
    assert dataset_info(DataSpec(name="digits", resize=16)).img_size == 16
    x, y = big.test[5]
    x0, y0 = plain.test[5]
    assert x.shape == (1, 16, 16) and int(y) == int(y0)
    expected = torch.nn.functional.interpolate(x0[None], size=(16, 16), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(x, expected, atol=1e-6)
    # bilinear weights sum to one: a 2x2 block's mean stays near the original pixel's value
    assert torch.allclose(x.mean(), x0.mean(), atol=0.05)


def test_resize_out_of_bounds_is_refused_naming_the_field() -> None:
    with pytest.raises(DataError, match="resize"):
        DataSpec(resize=4)
    with pytest.raises(SpecError, match="data.resize"):
        load_spec(None, ["data.resize=2000"])
