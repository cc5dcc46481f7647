"""`exitflow data` on image folders as people keep them: a flat folder of class folders is split here
(stratified per class, seeded, recorded), train/ + val/ (or test/) is mapped as the output states, and a
folder it does not know is answered with the layouts it does know, drawn as trees (exit 2)."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from exitflow.pipeline.cli import app
from exitflow.stages.core.data import DataError, DataSpec, check_dataset, dataset_info, load_splits

SIZES = {"cat": 10, "dog": 7, "owl": 5}  # test share at 0.2: round(2.0)=2, round(1.4)=1, round(1.0)=1
EXPECTED_TEST = {"cat": 2, "dog": 1, "owl": 1}


def _data(*args: object) -> object:
    return CliRunner().invoke(app, ["data", *map(str, args)])


def _png(path: Path, seed: int, size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


def _flat(root: Path, sizes: dict[str, int] = SIZES) -> Path:
    """root/<class>/*.png, with the junk real folders carry: a note, a .DS_Store, a notebook checkpoint folder."""
    for c, (name, n) in enumerate(sizes.items()):
        for k in range(n):
            _png(root / name / f"{name}_{k}.png", seed=100 * c + k)
    (root / "README.txt").write_text("my photos\n")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (root / ".ipynb_checkpoints").mkdir()
    return root


def _split_of(out: Path) -> dict[str, list[tuple[str, int, str]]]:
    """split.csv as {split: [(class, label, file)]}."""
    sides: dict[str, list[tuple[str, int, str]]] = {"train": [], "test": []}
    with (out / "split.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            sides[row["split"]].append((row["class"], int(row["label"]), row["file"]))
    return sides


def _nothing_written(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


def test_a_flat_folder_is_split_stratified_per_class_and_says_so(tmp_path: Path) -> None:
    src, out = _flat(tmp_path / "photos"), tmp_path / "out"
    result = _data(src, out)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "imagefolder: 3 classes (a flat folder: one folder per class)" in text
    assert "test fraction 0.2, seed 0, stratified per class" in text
    for name in SIZES:  # the per-class table: class, train, test
        assert [name, str(SIZES[name] - EXPECTED_TEST[name]), str(EXPECTED_TEST[name])] in [ln.split() for ln in text.splitlines()]
    assert "README.txt" in text and "cat/.DS_Store" in text and ".ipynb_checkpoints/ (hidden)" in text
    assert "data.val_fraction" in text and f"data: {{name: parquet, root: {out}}}" in text
    assert "images: 8x8 pixels, all of them" in text

    classes = list(SIZES)
    for side in ("train", "test"):
        schema = pq.read_schema(out / f"{side}.parquet")
        assert json.loads(schema.metadata[b"classes"]) == classes  # class names recorded as before
        counts = Counter(pq.read_table(out / f"{side}.parquet").column("label").to_pylist())
        want = {n: EXPECTED_TEST[n] if side == "test" else SIZES[n] - EXPECTED_TEST[n] for n in classes}
        assert {classes[k]: v for k, v in counts.items()} == want

    manifest = json.loads((out / "dataset.json").read_text())
    record = manifest["split"]
    assert (record["test_fraction"], record["seed"], record["stratified"]) == (0.2, 0, "per class")
    assert record["per_class"]["test"] == [EXPECTED_TEST[n] for n in classes]
    assert manifest["splits"]["train"]["per_class"] == [SIZES[n] - EXPECTED_TEST[n] for n in classes]
    assert record["files_sha256"] == hashlib.sha256((out / "split.csv").read_bytes()).hexdigest()

    # split.csv says where every image went, and the Parquet files hold exactly those files' bytes
    sides = _split_of(out)
    every = {f"{n}/{n}_{k}.png" for n, size in SIZES.items() for k in range(size)}
    assert {f for _, _, f in sides["train"]} | {f for _, _, f in sides["test"]} == every
    assert not {f for _, _, f in sides["train"]} & {f for _, _, f in sides["test"]}
    for side, rows in sides.items():
        table = pq.read_table(out / f"{side}.parquet")
        got = sorted(zip(table.column("image").to_pylist(), table.column("label").to_pylist()))
        assert got == sorted(((src / f).read_bytes(), label) for _, label, f in rows)  # PNGs kept byte for byte

    # a study can read it: the data set's shape, and the training pool's own validation split
    spec = DataSpec(name="parquet", root=str(out), val_fraction=0.2)
    assert (dataset_info(spec).num_classes, dataset_info(spec).classes) == (3, tuple(classes))
    splits = load_splits(spec, seed=0)
    assert len(splits.train) + len(splits.val) == 18 and len(splits.test) == 4


def test_the_same_seed_gives_the_same_split_and_another_seed_another(tmp_path: Path) -> None:
    src = _flat(tmp_path / "photos")
    for name, args in (("a", ()), ("b", ()), ("c", ("--seed", 7)), ("d", ("--test-fraction", 0.4, "--seed", 0))):
        assert _data(src, tmp_path / name, *args).exit_code == 0
    first, again, other, bigger = (_split_of(tmp_path / n) for n in "abcd")
    assert first == again
    assert (tmp_path / "a" / "test.parquet").read_bytes() == (tmp_path / "b" / "test.parquet").read_bytes()
    assert other["test"] != first["test"]  # seed 7 draws other images (a fixed, seeded draw: no luck)
    assert Counter(c for c, _, _ in other["test"]) == Counter(EXPECTED_TEST)  # the same stratified counts
    assert Counter(c for c, _, _ in bigger["test"]) == {"cat": 4, "dog": 3, "owl": 2}  # round(0.4 n)
    assert json.loads((tmp_path / "c" / "dataset.json").read_text())["split"]["seed"] == 7

    # a class's split depends on its own files and the seed: adding a dog leaves the cats where they were
    _png(src / "dog" / "dog_new.png", seed=999)
    assert _data(src, tmp_path / "e").exit_code == 0
    grown = _split_of(tmp_path / "e")
    assert [r for r in grown["test"] if r[0] == "cat"] == [r for r in first["test"] if r[0] == "cat"]


def test_format_imagefolder_on_a_flat_folder_works(tmp_path: Path) -> None:
    src = _flat(tmp_path / "photos")
    result = _data(src, tmp_path / "out", "--format", "imagefolder")
    assert result.exit_code == 0, result.output
    assert "no such folder" not in result.output
    assert pq.read_metadata(tmp_path / "out" / "test.parquet").num_rows == sum(EXPECTED_TEST.values())


def test_train_and_val_folders_state_the_mapping(tmp_path: Path) -> None:
    src = tmp_path / "kept"
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        for c, name in enumerate(("cat", "dog")):
            for k in range(n):
                _png(src / split / name / f"{k}.png", seed=1000 * c + 10 * k + len(split))
    out = tmp_path / "out"
    result = _data(src, out)
    assert result.exit_code == 0, result.output
    assert "train/ -> train.parquet" in result.output and "val/ -> test.parquet" in result.output
    assert "test/ is not used" in result.output and "--test-folder test" in result.output
    assert "no separate validation split" in result.output and "data.val_fraction" in result.output
    assert pq.read_metadata(out / "test.parquet").num_rows == 4 and not (out / "split.csv").exists()
    assert json.loads((out / "dataset.json").read_text())["mapping"][1].startswith("val/ -> test.parquet")

    chosen = _data(src, tmp_path / "out2", "--test-folder", "test")
    assert chosen.exit_code == 0, chosen.output
    assert "test/ -> test.parquet" in chosen.output and "val/ is not used" in chosen.output
    assert pq.read_metadata(tmp_path / "out2" / "test.parquet").num_rows == 6

    refused = _data(src, tmp_path / "out3", "--test-fraction", "0.3")
    assert refused.exit_code == 2 and "has its own test split" in refused.output and _nothing_written(tmp_path / "out3")
    outside = _data(src, tmp_path / "out4", "--test-folder", "../elsewhere")
    assert outside.exit_code == 2 and "the name of a folder beside train/" in outside.output


def test_train_alone_is_split_and_a_forced_rewrite_drops_a_stale_split_record(tmp_path: Path) -> None:
    src, out = tmp_path / "kept", tmp_path / "out"
    for name in ("cat", "dog"):
        for k in range(5):
            _png(src / "train" / name / f"{k}.png", seed=k + (50 if name == "dog" else 0))
    _png(src / "train" / "dog" / "big.png", seed=3, size=(12, 10))
    result = _data(src, out)
    assert result.exit_code == 0, result.output
    assert "images: from 8x8 to 12x10 pixels" in result.output and "data.resize" in result.output
    recorded = json.loads((out / "dataset.json").read_text())["splits"]
    assert [12, 10] in (recorded["train"]["largest_image"], recorded["test"]["largest_image"])  # where big.png went
    assert recorded["train"]["smallest_image"] == recorded["test"]["smallest_image"] == [8, 8]
    assert "train/ -> train.parquet and test.parquet, split here" in result.output
    assert Counter(c for c, _, _ in _split_of(out)["test"]) == {"cat": 1, "dog": 1}
    for name in ("cat", "dog"):  # now with a labelled val/: the split here no longer holds
        _png(src / "val" / name / "v.png", seed=7 if name == "cat" else 8)
    assert _data(src, out, "--force").exit_code == 0
    assert not (out / "split.csv").exists() and "split" not in json.loads((out / "dataset.json").read_text())


def test_an_unknown_layout_shows_the_layouts_it_knows(tmp_path: Path) -> None:
    src, out = tmp_path / "odd", tmp_path / "out"
    (src / "empty_folder").mkdir(parents=True)
    (src / "labels.csv").write_text("a,b\n")
    result = _data(src, out)
    assert result.exit_code == 2
    text = result.output
    assert "not a layout exitflow knows" in text and "empty_folder/" in text and "labels.csv" in text
    for tree_line in ("SOURCE/", "cat/  1.jpg  2.png", "train/  cat/ dog/", "val/    cat/ dog/",
                      "cifar-10-batches-py/", "train_32x32.mat", "wnids.txt", "LOC_val_solution.csv"):
        assert tree_line in text
    assert "Traceback" not in text and _nothing_written(out)
    named = _data(src, out, "--format", "imagefolder")  # named, it is answered the same way
    assert named.exit_code == 2 and "no class folders with images" in named.output and "SOURCE/" in named.output


@pytest.mark.parametrize(("sizes", "args", "message"), [
    ({"cat": 4, "dog": 1}, (), "'dog' has 1 image; every class needs at least 3"),
    ({"cat": 4}, (), "1 class folder(s) with images; a classifier needs at least 2"),
    ({"cat": 4, "dog": 4}, ("--test-fraction", "1.5"), "--test-fraction must lie strictly between 0 and 1"),
    ({"cat": 4, "dog": 4}, ("--seed", "-1"), "--seed must be an integer"),
])
def test_a_folder_that_cannot_be_split_is_refused_with_the_reason(tmp_path: Path, sizes: dict[str, int],
                                                                  args: tuple[str, ...], message: str) -> None:
    src, out = _flat(tmp_path / "photos", sizes), tmp_path / "out"
    result = _data(src, out, *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert _nothing_written(out)


def test_reading_a_flat_folder_as_data_name_imagefolder_points_to_exitflow_data(tmp_path: Path) -> None:
    src = _flat(tmp_path / "photos")
    with pytest.raises(DataError, match="split with `exitflow data SOURCE OUT`"):
        check_dataset(DataSpec(name="imagefolder", root=str(src)))


def test_an_image_that_does_not_decode_is_refused_by_name_not_skipped(tmp_path: Path) -> None:
    src, out = _flat(tmp_path / "photos"), tmp_path / "out"
    bad = src / "dog" / "dog_3.png"
    bad.write_bytes(bad.read_bytes()[:30])  # truncated: an image by its name, not by its bytes
    result = _data(src, out)
    assert result.exit_code == 2 and "corrupt image" in result.output and "dog_3.png" in result.output
    assert _nothing_written(out)
