"""`exitflow data`: datasets in their own layouts, made here in miniature, become the parquet layout
that a study loads with the same labels and pixels; corrupt input exits 2 and leaves nothing behind."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from typer.testing import CliRunner

from exitflow.pipeline.cli import app
from exitflow.stages.core.data import DataSpec, dataset_info
from exitflow.stages.core.data.sources import read_parquet_split


def _data(*args: str) -> object:
    return CliRunner().invoke(app, ["data", *args])


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def _jpeg(path: Path, seed: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format="JPEG", quality=90)


def _nothing_left(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


# ---------------------------------------------------------------- CIFAR


def _cifar10(root: Path, per_batch: int = 3) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """torchvision's cifar-10-batches-py, in miniature: 5 train batches and a test batch."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with (base / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    train_x, train_y = [], []
    for i in range(1, 7):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        with (base / ("test_batch" if i == 6 else f"data_batch_{i}")).open("wb") as f:
            pickle.dump({b"data": x, b"labels": y, b"batch_label": b"x"}, f, protocol=2)
        if i < 6:
            train_x.append(x)
            train_y += y
    hwc = lambda x: x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # noqa: E731
    return hwc(np.concatenate(train_x)), train_y, hwc(x), y


def test_a_torchvision_cifar10_folder_round_trips(tmp_path: Path) -> None:
    train_x, train_y, test_x, test_y = _cifar10(tmp_path / "src")
    out = tmp_path / "cifar10"
    result = _data(str(tmp_path / "src"), str(out))  # the layout is detected
    assert result.exit_code == 0, result.output
    assert "cifar10: 10 classes" in result.output
    info = dataset_info(DataSpec(name="parquet", root=str(out)))
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 3, 32)
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        split = read_parquet_split(out / f"{name}.parquet")
        assert split.labels.tolist() == y
        for i in range(len(y)):
            assert np.array_equal(_pixels(split[i][0]), x[i])  # PNG: lossless
    schema = pq.read_schema(out / "train.parquet")
    assert json.loads(schema.metadata[b"classes"])[:2] == ["airplane", "automobile"]
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 15
    assert pq.read_metadata(out / "train.parquet").metadata[b"sha256"].decode() == manifest["splits"]["train"]["sha256"]


def test_a_cifar_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    _cifar10(tmp_path / "src")

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("true",))

    with (tmp_path / "src" / "cifar-10-batches-py" / "data_batch_3").open("wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    out = tmp_path / "out"
    result = _data(str(tmp_path / "src"), str(out), "--format", "cifar10")
    assert result.exit_code == 2
    assert "data_batch_3" in result.output and "not allowed" in result.output
    assert _nothing_left(out)


def test_svhn_mat_files_round_trip_with_ten_as_zero(tmp_path: Path) -> None:
    from scipy.io import savemat

    src = tmp_path / "svhn"
    src.mkdir()
    rng = np.random.default_rng(1)
    expected = {}
    for name, n in (("train", 7), ("test", 4)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [10], [5], [9], [3]][:n], dtype=np.uint8)
        savemat(src / f"{name}_32x32.mat", {"X": x, "y": y})
        expected[name] = (x.transpose(3, 0, 1, 2), [int(v) % 10 for v in y.reshape(-1)])
    out = tmp_path / "out"
    result = _data(str(src), str(out))
    assert result.exit_code == 0, result.output
    for name, (x, y) in expected.items():
        split = read_parquet_split(out / f"{name}.parquet")
        assert split.labels.tolist() == y and y[0] == 0
        assert all(np.array_equal(_pixels(split[i][0]), x[i]) for i in range(len(y)))


# ---------------------------------------------------------------- image files


def _tinyimagenet(root: Path) -> dict[str, list[tuple[Path, int]]]:
    """Tiny ImageNet's layout, in miniature: 3 classes, train/<wnid>/images, a flat val with annotations."""
    wnids = ["n02", "n01", "n03"]  # label order: sorted
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tsalamander\nn03\tbullfrog, Rana\nn09\tother\n")
    train = []
    for c, wnid in enumerate(sorted(wnids)):
        for k in range(2):
            path = root / "train" / wnid / "images" / f"{wnid}_{k}.JPEG"
            _jpeg(path, seed=10 * c + k)
            train.append((path, c))
    val, lines = [], []
    for k, wnid in enumerate(["n03", "n01", "n02", "n01"]):
        path = root / "val" / "images" / f"val_{k}.JPEG"
        _jpeg(path, seed=100 + k)
        val.append((path, sorted(wnids).index(wnid)))
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t11\t11")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return {"train": sorted(train), "test": sorted(val)}


def test_a_tiny_imagenet_folder_round_trips_with_its_annotation_labels(tmp_path: Path) -> None:
    expected = _tinyimagenet(tmp_path / "tiny")
    out = tmp_path / "out"
    result = _data(str(tmp_path / "tiny"), str(out), "--format", "tinyimagenet")
    assert result.exit_code == 0, result.output
    assert json.loads(pq.read_schema(out / "test.parquet").metadata[b"classes"]) == ["goldfish", "salamander", "bullfrog"]
    for name, items in expected.items():
        table = pq.read_table(out / f"{name}.parquet")
        got = sorted(zip(table.column("image").to_pylist(), table.column("label").to_pylist()))
        want = sorted((p.read_bytes(), label) for p, label in items)
        assert got == want  # JPEG files are stored byte for byte, with their annotation labels
    info = dataset_info(DataSpec(name="parquet", root=str(out)))
    assert (info.num_classes, info.img_size) == (3, 12)


def test_a_corrupt_image_exits_2_naming_it_and_leaves_no_partial_output(tmp_path: Path) -> None:
    _tinyimagenet(tmp_path / "tiny")
    bad = tmp_path / "tiny" / "val" / "images" / "val_2.JPEG"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    out = tmp_path / "out"
    result = _data(str(tmp_path / "tiny"), str(out))
    assert result.exit_code == 2
    assert "corrupt image" in result.output and "val_2.JPEG" in result.output
    assert "Traceback" not in result.output
    assert _nothing_left(out)


def test_existing_output_is_kept_unless_forced(tmp_path: Path) -> None:
    _tinyimagenet(tmp_path / "tiny")
    out = tmp_path / "out"
    assert _data(str(tmp_path / "tiny"), str(out)).exit_code == 0
    before = (out / "train.parquet").read_bytes()
    refused = _data(str(tmp_path / "tiny"), str(out))
    assert refused.exit_code == 2 and "--force" in refused.output
    assert (out / "train.parquet").read_bytes() == before
    assert _data(str(tmp_path / "tiny"), str(out), "--force").exit_code == 0


def test_imagenet_flat_val_takes_its_labels_from_the_solution_file(tmp_path: Path) -> None:
    src = tmp_path / "imagenet"
    for c, wnid in enumerate(["n01440764", "n01443537"]):
        for k in range(2):
            _jpeg(src / "train" / wnid / f"{wnid}_{k}.JPEG", seed=c * 2 + k)
    labels = {"ILSVRC2012_val_00000001": "n01443537", "ILSVRC2012_val_00000002": "n01440764"}
    for k, stem in enumerate(labels):
        _jpeg(src / "val" / f"{stem}.JPEG", seed=50 + k)
    (src / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"{s},{w} 1 2 3 4 {w} 5 6 7 8\n" for s, w in labels.items()))
    (src / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    out = tmp_path / "out"
    result = _data(str(src), str(out))
    assert result.exit_code == 0, result.output
    table = pq.read_table(out / "test.parquet")
    assert table.column("label").to_pylist() == [1, 0]
    assert json.loads(pq.read_schema(out / "test.parquet").metadata[b"classes"]) == ["tench", "goldfish"]
    img = Image.open(io.BytesIO(table.column("image")[0].as_py()))
    assert img.format == "JPEG"


def test_an_unknown_layout_names_the_formats(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    result = _data(str(tmp_path / "src"), str(tmp_path / "out"))
    assert result.exit_code == 2 and "--format" in result.output and "tinyimagenet" in result.output
