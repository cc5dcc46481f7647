"""`exitflow run` / `exitflow plan` on bad input: status 2, a message naming the problem, no Ray, no writes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image
from typer.testing import CliRunner

from exitflow.pipeline.cli import app

WRITTEN = ("mlflow.db", "mlartifacts", ".exitflow")


def _png(value: int, side: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), value, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(root: Path, classes: list[str], per_class: int = 6, garbage_row: bool = False) -> Path:
    """A tiny parquet data set: train/test with PNG bytes + int labels, class names in the schema metadata."""
    root.mkdir(parents=True)
    for split in ("train", "test"):
        images = [_png(40 * c + i) for c in range(len(classes)) for i in range(per_class)]
        labels = [c for c in range(len(classes)) for _ in range(per_class)]
        if garbage_row and split == "train":
            images.append(b"\x89PNG but not really an image")
            labels.append(0)
        table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())})
        table = table.replace_schema_metadata({"classes": json.dumps(classes)})
        pq.write_table(table, root / f"{split}.parquet")
    return root


def _invoke(cwd: Path, command: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [command, *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"exitflow {command} raised {type(result.exception).__name__}: {result.exception}\n{result.output}")
    return result.exit_code, result.output


def _assert_refused(cwd: Path, command: str, args: list[str], *expected: str) -> str:
    code, out = _invoke(cwd, command, *args)
    assert code == 2, out
    for text in expected:
        assert text in out, out
    assert "Traceback" not in out
    assert not ray.is_initialized()
    assert [p for p in WRITTEN if (cwd / p).exists()] == []
    return out


COMMANDS = ["run", "plan"]

SPEC_CASES: dict[str, tuple[list[str], list[str]]] = {
    "unknown top-level key": (["--set", "epochs=3"], ["epochs", "unknown key"]),
    "unknown nested key": (["--set", "net.depth_multiplier=2"], ["net.depth_multiplier", "unknown key"]),
    "wrong type": (["--set", "seeds=abc"], ["seeds", "valid list"]),
    "boolean number": (["--set", "phases.P1.patience=true"], ["phases.P1.patience", "boolean"]),
    "negative lr": (["--set", "phases.P1.lr=-0.1"], ["phases.P1.lr", "> 0"]),
    "zero in lr grid": (["--set", "phases.P2.lr=[0.01, 0]"], ["phases.P2.lr", "> 0"]),
    "patience 0": (["--set", "phases.P2.patience=0"], ["phases.P2.patience", "greater than or equal to 1"]),
    "budget 1.5": (["--set", "evaluation.budgets=[0.5, 1.5]"], ["evaluation.budgets", "(0, 1]"]),
    "empty regimes": (["--set", "regimes=[]"], ["regimes", "at least 1 item"]),
    "duplicate seeds": (["--set", "seeds=[1, 1]"], ["seeds", "duplicates"]),
    "parquet without root": (["--set", "data.name=parquet"], ["data", "data.root is required"]),
    "cifar10 without root": (["--set", "data.name=cifar10"], ["data", "data.root is required"]),
    "bad --set": (["--set", "seeds"], ["--set", "key=value"]),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_bad_spec_values(cwd: Path, command: str, case: str) -> None:
    args, expected = SPEC_CASES[case]
    _assert_refused(cwd, command, ["empty.yaml", *args], "invalid spec" if "--set" not in expected else "--set", *expected)


@pytest.mark.parametrize("command", COMMANDS)
def test_malformed_yaml(cwd: Path, command: str) -> None:
    (cwd / "bad.yaml").write_text("name: x\nseeds: [0, 1\n")
    _assert_refused(cwd, command, ["bad.yaml"], "bad.yaml", "malformed YAML")


@pytest.mark.parametrize("command", COMMANDS)
def test_top_level_not_a_mapping(cwd: Path, command: str) -> None:
    (cwd / "list.yaml").write_text("- joint\n- mixed\n")
    _assert_refused(cwd, command, ["list.yaml"], "list.yaml", "mapping")


@pytest.mark.parametrize("command", COMMANDS)
def test_spec_errors_in_the_file(cwd: Path, command: str) -> None:
    (cwd / "spec.yaml").write_text("seeds: [0]\nphases:\n  P1: {lr: -1, pateince: 3}\nregimes: []\n")
    out = _assert_refused(cwd, command, ["spec.yaml"], "phases.P1.lr", "phases.P1.pateince", "unknown key", "regimes")
    assert out.count("phases.P1.lr") == 1


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_spec_file(cwd: Path, command: str) -> None:
    _assert_refused(cwd, command, ["nope.yaml"], "nope.yaml", "not found")


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_data_path(cwd: Path, command: str) -> None:
    _assert_refused(cwd, command, ["empty.yaml", "--set", "data.name=parquet", "--set", "data.root=/nonexistent"],
                    "data:", "/nonexistent", "does not exist")


@pytest.mark.parametrize("command", COMMANDS)
def test_corrupt_image_bytes(cwd: Path, tmp_path: Path, command: str) -> None:
    root = write_parquet(tmp_path / "corrupt", ["cat", "dog"], garbage_row=True)
    _assert_refused(cwd, command, ["empty.yaml", "--set", "data.name=parquet", "--set", f"data.root={root}"],
                    "data:", "corrupt image", "row 12", "train.parquet")


@pytest.mark.parametrize("command", COMMANDS)
def test_one_class(cwd: Path, tmp_path: Path, command: str) -> None:
    root = write_parquet(tmp_path / "one", ["cat"])
    _assert_refused(cwd, command, ["empty.yaml", "--set", "data.name=parquet", "--set", f"data.root={root}"],
                    "data:", "1 class", "at least 2")


@pytest.mark.parametrize("command", COMMANDS)
def test_relative_data_root_is_the_spec_folders(cwd: Path, command: str) -> None:
    # root "data" resolves to <spec folder>/specs/data, which does not exist even though ./data would.
    write_parquet(cwd / "data", ["cat", "dog"])
    (cwd / "specs").mkdir()
    (cwd / "specs" / "s.yaml").write_text("data: {name: parquet, root: data}\n")
    _assert_refused(cwd, command, ["specs/s.yaml"], str(cwd / "specs" / "data"), "does not exist")


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_backbone(cwd: Path, command: str) -> None:
    _assert_refused(cwd, command, ["empty.yaml", "--set", "net.backbone=alexnet"], "net:", "alexnet", "resnet20")


@pytest.mark.parametrize("command", COMMANDS)
def test_exits_out_of_range(cwd: Path, command: str) -> None:
    _assert_refused(cwd, command, ["empty.yaml", "--set", "net.exits=[100]"], "net:", "exits", "100")


def _uri_cases(tmp_path: Path) -> dict[str, tuple[list[str], list[str]]]:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    not_db = tmp_path / "not-a-db.db"
    not_db.write_text("plain text, not SQLite")
    return {
        "folder missing": (["--tracking-uri", "sqlite:////nonexistent-dir/x.db"], ["/nonexistent-dir", "does not exist"]),
        "file in place of the folder": (["--tracking-uri", f"sqlite:///{blocker}/x.db"], [str(blocker), "not a folder"]),
        "folder in place of the db": (["--tracking-uri", f"sqlite:///{tmp_path}"], [str(tmp_path), "not a file"]),
        "not a sqlite file": (["--tracking-uri", f"sqlite:///{not_db}"], [str(not_db), "not a SQLite database"]),
        "from the spec": (["--set", f"tracking.uri=sqlite:///{blocker}/x.db"], [str(blocker), "not a folder"]),
        "unknown scheme": (["--tracking-uri", "ftp://host/store"], ["ftp", "unknown scheme"]),
        "file store": (["--tracking-uri", "/nonexistent-dir/store"], ["file store", "sqlite:///"]),
        "storage under a file": (["--set", f"tracking.storage_path={blocker}/ray"], ["tracking.storage_path", "not a folder"]),
        "server not answering": (["--tracking-uri", "http://127.0.0.1:1"], ["http://127.0.0.1:1", "does not answer"]),
    }


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    "case",
    ["folder missing", "file in place of the folder", "folder in place of the db", "not a sqlite file",
     "from the spec", "unknown scheme", "file store", "storage under a file", "server not answering"],
)
def test_tracking_store_cannot_be_written(cwd: Path, tmp_path: Path, command: str, case: str) -> None:
    args, expected = _uri_cases(tmp_path)[case]
    _assert_refused(cwd, command, ["empty.yaml", *args], *expected)


@pytest.mark.parametrize("command", COMMANDS)
def test_env_tracking_uri_is_checked(cwd: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent-dir/env.db")
    _assert_refused(cwd, command, ["empty.yaml"], "/nonexistent-dir", "does not exist")


@pytest.mark.parametrize("command", COMMANDS)
def test_read_only_folder(cwd: Path, tmp_path: Path, command: str) -> None:
    import os

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        _assert_refused(cwd, command, ["empty.yaml", "--tracking-uri", f"sqlite:///{folder}/x.db"], str(folder), "not writable")
    finally:
        folder.chmod(0o755)


def test_plan_on_a_fresh_dir_prints_every_node_and_creates_nothing(cwd: Path) -> None:
    code, out = _invoke(cwd, "plan", "empty.yaml", "--set", "seeds=[0,1]")
    assert code == 0, out
    from exitflow.pipeline.graph import build_graph
    from exitflow.pipeline.spec import load_spec

    graph = build_graph(load_spec(None, ["seeds=[0,1]"]))
    lines = out.splitlines()
    assert lines[0] == f"study digits-study: {len(graph.nodes)} nodes, 0 cached, {len(graph.nodes)} to run"
    for node in graph.nodes.values():
        [line] = [ln for ln in lines if ln.split()[:1] == [node.id] and "key=" in ln]
        assert node.kind in line and f"key={node.key}" in line and "to run" in line
    for src, dst in graph.edges():
        assert f"  {src} -> {dst}" in lines
    assert not ray.is_initialized()
    assert sorted(p.name for p in cwd.iterdir()) == ["empty.yaml"]


def test_plan_example_runs_nothing(cwd: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "digits.yaml"
    code, out = _invoke(cwd, "plan", str(example))
    assert code == 0, out
    assert "8 nodes, 0 cached, 8 to run" in out
    assert sorted(p.name for p in cwd.iterdir()) == ["empty.yaml"]


def _closed_port() -> int:
    from exitflow.pipeline.loopback import free_loopback_port

    return free_loopback_port()  # free once closed: nothing listens there


@pytest.mark.parametrize(("address", "expected"), [
    (f"127.0.0.1:{_closed_port()}", "cannot reach the Ray cluster at 127.0.0.1:"),
    ("head-without-port", "expected HOST:PORT"),
], ids=["closed-port", "no-port"])  # fixed ids: each pytest-xdist worker picks its own closed port
def test_an_unreachable_cluster_address_is_refused_before_anything_is_stored(cwd: Path, address: str, expected: str) -> None:
    _assert_refused(cwd, "run", ["empty.yaml", "--address", address], expected)
