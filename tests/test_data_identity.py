"""The data's identity in the cache keys: a digest of the files' content, never of their path.

Unit tests hash small image folders, Parquet folders and CIFAR layouts (no Ray): the digest follows
the bytes and the file list, not the folder's place or the files' mtimes, and a second look at
unchanged files reads none of them. Then as a new user would: `exitflow plan` against a real
tracking store after one Parquet row changes, and after the folder moves; and one tiny image-folder
study run on Ray, then an image added, removed, and the folder moved (`--set data.root=NEW`).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import TINY
from exitflow.pipeline.cli import app
from exitflow.pipeline.graph import build_graph
from exitflow.pipeline.keys import cache_key
from exitflow.pipeline.resolve import preflight
from exitflow.pipeline.spec import load_spec
from exitflow.stages.core.data import DataError, DataSpec
from exitflow.stages.core.data import file_hashes
from exitflow.stages.core.data.identity import identify
from exitflow.stages.core.data.memo import CACHE_DIR_ENV

LONG_AGO = time.time() - 3600  # older than file_hashes.RACY_SECONDS: such files' hashes are kept


@pytest.fixture(autouse=True)
def kept_hashes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test keeps its file hashes in a folder of its own."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(folder))
    return folder


def _png(seed: int, side: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _age(root: Path, when: float = LONG_AGO) -> None:
    """Every file under `root` last modified at `when` (as a data set copied in long ago)."""
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (when, when))


def image_folder(root: Path, train: int = 8, test: int = 3) -> Path:
    """train/ and val/ with two class folders of distinct 8x8 PNGs, last modified an hour ago."""
    for split, n in (("train", train), ("val", test)):
        for c, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / cls / f"{i}.png").write_bytes(_png(1000 * c + 100 * (split == "val") + i))
    _age(root)
    return root


def parquet_folder(root: Path, per_class: int = 8) -> Path:
    """train.parquet and test.parquet: two classes of distinct 8x8 PNGs, last modified an hour ago."""
    root.mkdir(parents=True)
    for s, split in enumerate(("train", "test")):
        images = [_png(10_000 * s + 1000 * c + i) for c in range(2) for i in range(per_class)]
        labels = [c for c in range(2) for _ in range(per_class)]
        table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())})
        pq.write_table(table.replace_schema_metadata({"classes": '["cat", "dog"]'}), root / f"{split}.parquet")
    _age(root)
    return root


def change_one_row(root: Path) -> None:
    """Train's row 0 gets another image: one row of one Parquet file changes."""
    path = root / "train.parquet"
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[0] = _png(99_999)
    pq.write_table(table.set_column(0, "image", pa.array(images, pa.binary())), path)


def _digest(name: str, root: Path) -> str:
    return identify(DataSpec(name=name, root=str(root))).digest


# ------------------------------------------------------------------ what the digest follows


def test_an_image_folders_digest_follows_each_images_bytes_and_the_file_list(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "images")
    base = _digest("imagefolder", root)
    assert base.startswith("sha256:") and len(base) == len("sha256:") + 64
    image = root / "train" / "cat" / "0.png"
    original = image.read_bytes()
    image.write_bytes(_png(424242))  # one image's bytes
    changed = _digest("imagefolder", root)
    image.write_bytes(original)
    assert changed != base and _digest("imagefolder", root) == base
    (root / "val" / "dog" / "new.png").write_bytes(_png(7))  # one image added
    added = _digest("imagefolder", root)
    (root / "val" / "dog" / "new.png").rename(root / "val" / "cat" / "new.png")  # relabelled: same bytes, other class
    assert len({base, added, _digest("imagefolder", root)}) == 3
    (root / "val" / "cat" / "new.png").unlink()
    (root / "train" / "notes.txt").write_text("not an image: ImageFolder never reads it")
    (root / "test").mkdir()  # neither: val/ is the test split when it exists
    assert _digest("imagefolder", root) == base


def test_a_parquet_folders_digest_follows_its_rows(tmp_path: Path) -> None:
    root = parquet_folder(tmp_path / "pq")
    base = _digest("parquet", root)
    change_one_row(root)
    assert _digest("parquet", root) != base


def test_moving_or_copying_the_folder_or_touching_its_files_keeps_the_digest(tmp_path: Path) -> None:
    for name, make in (("imagefolder", image_folder), ("parquet", parquet_folder)):
        root = make(tmp_path / name)
        base = _digest(name, root)
        copy = tmp_path / "elsewhere" / f"{name}-copy"
        shutil.copytree(root, copy)  # another place: every file's kept hash is missed, the content found the same
        assert _digest(name, copy) == base
        moved = tmp_path / f"{name}-moved"
        root.rename(moved)
        assert _digest(name, moved) == base
        _age(moved, LONG_AGO - 600)  # touched, not changed: hashed again, the same content found
        touched = identify(DataSpec(name=name, root=str(moved)))
        assert touched.digest == base and touched.kept == 0


def test_unchanged_files_are_not_read_a_second_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = image_folder(tmp_path / "images")
    first = identify(DataSpec(name="imagefolder", root=str(root)))
    assert (first.files, first.kept) == (22, 0)

    def unreadable(path: Path) -> str:
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(file_hashes, "file_sha256", unreadable)
    second = identify(DataSpec(name="imagefolder", root=str(root)))
    assert (second.digest, second.files, second.kept) == (first.digest, 22, 22)
    assert "(22 files, " in second.describe() and "22 cached)" in second.describe()


def test_a_file_written_just_now_is_hashed_again_until_its_mtime_can_be_trusted(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "images")
    identify(DataSpec(name="imagefolder", root=str(root)))  # every hash kept
    image = root / "train" / "cat" / "0.png"
    image.write_bytes(_png(1))  # now: a second write within the clock's tick could keep size and mtime
    fresh = identify(DataSpec(name="imagefolder", root=str(root)))
    again = identify(DataSpec(name="imagefolder", root=str(root)))
    assert (fresh.kept, again.kept) == (21, 21)  # every file but that one from the kept hashes
    blob = bytearray(image.read_bytes())
    blob[-20] ^= 1  # the same size, at once: the kept hashes must not answer for it
    image.write_bytes(bytes(blob))
    assert identify(DataSpec(name="imagefolder", root=str(root))).digest != again.digest


def test_torn_kept_hashes_are_computed_again_and_off_keeps_none(tmp_path: Path, kept_hashes: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root = parquet_folder(tmp_path / "pq")
    base = identify(DataSpec(name="parquet", root=str(root)))
    [kept] = list((kept_hashes / "hashes").glob("*.json"))
    kept.write_text('{"version": 1, "files": {"/x": [1, 2')  # a write cut short
    again = identify(DataSpec(name="parquet", root=str(root)))
    assert (again.digest, again.kept) == (base.digest, 0)
    assert identify(DataSpec(name="parquet", root=str(root))).kept == 2  # rewritten whole
    monkeypatch.setenv(CACHE_DIR_ENV, "off")
    shutil.rmtree(kept_hashes)
    assert identify(DataSpec(name="parquet", root=str(root))).digest == base.digest
    assert not kept_hashes.exists()


def test_cifar_files_and_digits_are_identified_by_content(tmp_path: Path) -> None:
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar" / CIFAR10.base_folder
    folder.mkdir(parents=True)
    names = [f for f, _ in [*CIFAR10.train_list, *CIFAR10.test_list]] + [CIFAR10.meta["filename"]]
    for name in names[:-1]:
        (folder / name).write_bytes(name.encode())
    with pytest.raises(DataError, match=r"lacks \['batches.meta'\].*download: true"):
        identify(DataSpec(name="cifar10", root=str(tmp_path / "cifar")))
    (folder / names[-1]).write_bytes(b"meta")
    (folder / "readme.html").write_text("not read by torchvision")
    found = identify(DataSpec(name="cifar10", root=str(tmp_path / "cifar")))
    assert found.files == 7
    (folder / "data_batch_3").write_bytes(b"other")
    assert _digest("cifar10", tmp_path / "cifar") != found.digest
    digits = identify(DataSpec(name="digits"))
    assert digits.source.endswith("digits.csv.gz") and digits.files == 1
    assert identify(DataSpec(name="digits", root="/ignored")).digest == digits.digest


def test_shared_cifar10_parquet_is_identified_and_kept() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
    if not (shared / "train.parquet").is_file():
        pytest.skip(f"no CIFAR-10 parquet at {shared}")
    first = identify(DataSpec(name="parquet", root=str(shared)))
    second = identify(DataSpec(name="parquet", root=str(shared)))
    assert second.digest == first.digest and (first.files, second.kept) == (2, 2)


# ------------------------------------------------------------------ keys


def _keys(*sets: str) -> dict[str, str]:
    """The study's keys as the driver computes them: the pre-flight identifies the data, then the graph."""
    spec = load_spec(None, [*TINY, "regimes=[joint, disjoint]", "data.val_fraction=0.25", *sets])
    preflight(spec)
    return {n.id: n.key for n in build_graph(spec).nodes.values()}


def test_keys_follow_the_data_content_not_its_path(tmp_path: Path) -> None:
    root = parquet_folder(tmp_path / "pq")
    base = _keys("data.name=parquet", f"data.root={root}")
    shutil.move(root, tmp_path / "moved")
    assert _keys("data.name=parquet", f"data.root={tmp_path / 'moved'}") == base
    change_one_row(tmp_path / "moved")
    changed = _keys("data.name=parquet", f"data.root={tmp_path / 'moved'}")
    assert changed.keys() == base.keys() and all(changed[n] != base[n] for n in base)  # every node reads the data, or follows one that does


@dataclass(frozen=True)
class _ReadsData:
    data: DataSpec


def test_a_node_whose_data_has_no_identity_has_no_key() -> None:
    """Its root is not in the key: without the content's digest two data sets would share one."""
    with pytest.raises(ValueError, match="no identity"):
        cache_key("evaluate", _ReadsData(DataSpec(name="parquet", root="/somewhere")), [])
    moved = [cache_key("evaluate", _ReadsData(DataSpec(name="parquet", root=root, identity="sha256:0")), []) for root in ("/a", "/b")]
    assert moved[0] == moved[1]


def test_a_graph_planned_without_its_data_keys_it_by_path() -> None:
    spec = load_spec(None, ["data.name=parquet", "data.root=/nowhere/pq"])
    assert build_graph(spec).nodes["seed0/P1"].config.data.identity == "unread:parquet:/nowhere/pq"


# ------------------------------------------------------------------ as a new user would: exitflow plan

STUDY = [*TINY, "regimes=[joint]", "phases.P2.max_epochs=1", "phases.P2.patience=2", "data.augment=false",
         "data.val_fraction=0.25"]
PLAN_LINE = re.compile(r"^  (\S+)\s+\S+\s+key=(\w+)\s+(cached|to run)")


def _plan(spec_file: Path, uri: str, *sets: str) -> tuple[str, dict[str, tuple[str, str]]]:
    """`exitflow plan`'s output, and per node its key and state (cached / to run)."""
    result = CliRunner().invoke(app, ["plan", str(spec_file), "--tracking-uri", uri, *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    nodes = {m[1]: (m[2], m[3]) for line in result.output.splitlines() if (m := PLAN_LINE.match(line))}
    return result.output, nodes


def _finish_runs(uri: str, experiment: str, keys: list[str]) -> None:
    """What a finished study leaves for `plan` to find: a FINISHED run under each node's key."""
    from exitflow.pipeline import tracking

    c = tracking.client(uri)
    exp = tracking.ensure_experiment(c, experiment)
    for key in keys:
        tracking.end_run(c, tracking.start_run(c, exp, key, {"exitflow.key": key}), "FINISHED")


def test_plan_names_the_data_and_sees_a_changed_parquet_row_and_a_moved_folder(tmp_path: Path, mlflow_uri: str) -> None:
    root = parquet_folder(tmp_path / "pq")
    spec_file = tmp_path / "study.yaml"
    spec_file.write_text("name: identity-parquet\ndata: {name: parquet}\n")
    sets = [*STUDY, f"data.root={root}"]
    out, first = _plan(spec_file, mlflow_uri, *sets)
    assert "3 nodes, 0 cached, 3 to run" in out
    digest = identify(DataSpec(name="parquet", root=str(root))).digest
    assert f"data: parquet {root} {digest[:19]}... (2 files, " in out
    _finish_runs(mlflow_uri, "identity-parquet", [key for key, _ in first.values()])
    assert "3 nodes, 3 cached, 0 to run" in _plan(spec_file, mlflow_uri, *sets)[0]

    saved = (root / "train.parquet").read_bytes()
    change_one_row(root)
    out, changed = _plan(spec_file, mlflow_uri, *sets)
    assert "3 nodes, 0 cached, 3 to run" in out, out
    assert all(state == "to run" for _, state in changed.values())
    (root / "train.parquet").write_bytes(saved)  # the same rows again: the same keys
    assert "3 nodes, 3 cached, 0 to run" in _plan(spec_file, mlflow_uri, *sets)[0]

    moved = tmp_path / "data" / "moved-pq"
    moved.parent.mkdir()
    shutil.move(root, moved)
    out, after = _plan(spec_file, mlflow_uri, *STUDY, f"data.root={moved}")
    assert "3 nodes, 3 cached, 0 to run" in out, out
    assert {n: key for n, (key, _) in after.items()} == {n: key for n, (key, _) in first.items()}
    assert f"data: parquet {moved} {digest[:19]}..." in out


def test_runs_that_log_a_new_data_set_at_once_all_record_it(mlflow_uri: str) -> None:
    """A study's first phases start together and each logs the data set, new to the store: MLflow's
    lookup-then-insert races there (seen as an IntegrityError that failed a digits P1). Each round, two
    threads log one new data set to two runs at the same instant; every run must record it."""
    import threading

    from exitflow.pipeline import tracking

    c = tracking.client(mlflow_uri)
    exp = tracking.ensure_experiment(c, "identity-race")
    for round_ in range(8):
        data = DataSpec(name="digits", identity=f"sha256:{round_:032x}{0:032x}")
        runs = [tracking.start_run(c, exp, f"race{round_}-{k}", {}) for k in range(2)]
        start, errors = threading.Barrier(2), []

        def log(run_id: str) -> None:
            start.wait()
            try:
                tracking.log_data_input(tracking.client(mlflow_uri), run_id, data, "training")
            except Exception as e:  # noqa: BLE001 - collected, asserted below
                errors.append(e)

        threads = [threading.Thread(target=log, args=(r,)) for r in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        for r in runs:
            [given] = c.get_run(r).inputs.dataset_inputs
            assert given.dataset.digest == f"{round_:032x}"


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_study_on_an_image_folder_reruns_when_an_image_is_added_and_not_when_moved(
        ray_session: None, mlflow_uri: str, tmp_path: Path) -> None:
    """The reported case: an ImageFolder study ran; an image added to its train folder must re-train
    what reads it; the folder moved (and the spec pointed at it) must reuse every node."""
    from mlflow.tracking import MlflowClient

    from exitflow.pipeline.runner import run_study

    root = image_folder(tmp_path / "images")
    spec_file = tmp_path / "study.yaml"
    spec_file.write_text("name: identity-images\ndata: {name: imagefolder}\n")
    sets = [*STUDY, f"data.root={root}", f"tracking.storage_path={tmp_path / 'ray'}"]
    result = run_study(load_spec(spec_file, sets), mlflow_uri, progress=lambda _: None)
    digest = identify(DataSpec(name="imagefolder", root=str(root))).digest

    # every run that read the data names it as its MLflow dataset input; the report read none
    c = MlflowClient(mlflow_uri)
    for node, context in (("seed0/joint/P2", "training"), ("seed0/joint/evaluate", "evaluation"), ("report", None)):
        inputs = c.get_run(result.results[node].run_id).inputs.dataset_inputs
        if context is None:
            assert inputs == [], node
            continue
        [given] = inputs
        tags = {t.key: t.value for t in given.tags}
        assert (given.dataset.name, given.dataset.digest) == ("imagefolder", digest.removeprefix("sha256:")[:32]), node
        assert tags == {"mlflow.data.context": context, "exitflow.data.identity": digest}, node
        assert str(root) in given.dataset.source

    out, ran = _plan(spec_file, mlflow_uri, *sets)
    assert "3 nodes, 3 cached, 0 to run" in out, out
    assert {node: key for node, (key, _) in ran.items()} == {n: r.key for n, r in result.results.items()}

    added = root / "train" / "cat" / "new.png"
    added.write_bytes(_png(31337))  # (a) one image more
    out, after = _plan(spec_file, mlflow_uri, *sets)
    assert "3 nodes, 0 cached, 3 to run" in out, out  # the phase and evaluate read it; the report follows them
    assert all(state == "to run" for _, state in after.values())
    added.unlink()
    assert "3 nodes, 3 cached, 0 to run" in _plan(spec_file, mlflow_uri, *sets)[0]

    moved = tmp_path / "elsewhere" / "images"  # (c) the folder moved, the spec pointed at it
    moved.parent.mkdir()
    shutil.move(root, moved)
    out, there = _plan(spec_file, mlflow_uri, *[s for s in sets if not s.startswith("data.root=")], f"data.root={moved}")
    assert "3 nodes, 3 cached, 0 to run" in out, out
    assert there == ran

