"""What the spec loader and pre-flight refuse (issue 35): every comparison variant is checked as the base
spec is, paths are the spec folder's, and YAML, numbers or weight files a machine cannot afford or
trust are refused. Each case: exit 2 from `plan` and `run`, one line naming the field (and the variant)
and the reason, no traceback, no torch advice, nothing written where the tracking store would be, no Ray."""

from __future__ import annotations

import pathlib
from pathlib import Path

import pytest
import ray
import torch
from typer.testing import CliRunner

from exitflow.pipeline.cli import app
from exitflow.pipeline.spec import SpecError, load_spec
from exitflow.stages.core.allowed import MAX_EPOCHS, MAX_THRESHOLDS, MAX_YAML_NODES
from exitflow.stages.core.nets import NetSpec, create_net
from test_cli_errors import write_parquet
from test_spec_fuzz import BOMB, assert_one_reason

COMMANDS = ["plan", "run"]


def refused(cwd: Path, command: str, args: list[str], *expected: str) -> str:
    """Run `exitflow COMMAND ARGS` in `cwd`: exit 2, one reason holding every `expected`, nothing new in
    `cwd` (the default store, its artifacts and Ray storage would land there), Ray never started."""
    before = sorted(p.name for p in cwd.iterdir())
    result = CliRunner().invoke(app, [command, *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code == 2, result.output
    assert_one_reason(result.output)
    for text in expected:
        assert text in result.output, result.output
    assert sorted(p.name for p in cwd.iterdir()) == before
    assert not ray.is_initialized()
    return result.output


def _weights(path: Path, width: int = 16) -> Path:
    """A resnet20 state dict for digits (width 16 is the study's; another width is another architecture)."""
    torch.save(create_net(NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, width=width)).state_dict(), path)
    return path


# ----------------------------------------------------------------------------- every variant is pre-flighted


@pytest.mark.parametrize("command", COMMANDS)
def test_a_variant_with_an_unknown_backbone(cwd: Path, command: str) -> None:
    (cwd / "s.yaml").write_text("compare: {net.backbone: [resnet20, nosuchnet]}\n")
    refused(cwd, command, ["s.yaml"], "compare net.backbone=nosuchnet: net:", "unknown net 'nosuchnet'")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_variant_whose_data_root_does_not_exist(cwd: Path, tmp_path: Path, command: str) -> None:
    good = write_parquet(tmp_path / "good", ["cat", "dog"], per_class=20)
    (cwd / "s.yaml").write_text(f"data: {{name: parquet, root: {good}}}\ncompare: {{data.root: [{good}, {tmp_path}/gone]}}\n")
    refused(cwd, command, ["s.yaml"], f"compare data.root={tmp_path}/gone: data:", "does not exist")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_variant_whose_start_is_another_architecture(cwd: Path, command: str) -> None:
    _weights(cwd / "mine.pt")
    _weights(cwd / "wide.pt", width=32)
    (cwd / "s.yaml").write_text("compare: {net.init: [mine.pt, wide.pt]}\n")
    refused(cwd, command, ["s.yaml"], f"compare net.init={cwd}/wide.pt: net.init: {cwd}/wide.pt:", "has shape")


def test_every_variant_that_passes_plans(cwd: Path) -> None:
    _weights(cwd / "mine.pt")
    (cwd / "s.yaml").write_text("compare: {net.init: [mine.pt, null], net.exit_every: [1, 2]}\n")
    result = CliRunner().invoke(app, ["plan", "s.yaml"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in cwd.iterdir()) == ["empty.yaml", "mine.pt", "s.yaml"]


# ----------------------------------------------------------------------------- paths: the spec's folder, ~ expanded


@pytest.mark.parametrize("command", COMMANDS)
def test_relative_compare_values_are_the_spec_folders(cwd: Path, command: str) -> None:
    # ./data exists in the working directory, not beside the spec: the variant names the spec folder's.
    write_parquet(cwd / "data", ["cat", "dog"])
    write_parquet(cwd / "specs" / "here", ["cat", "dog"], per_class=20)
    (cwd / "specs" / "s.yaml").write_text("data: {name: parquet, root: here}\ncompare: {data.root: [here, data]}\n")
    refused(cwd, command, ["specs/s.yaml"], f"compare data.root={cwd}/specs/data: data:", f"{cwd}/specs/data does not exist")


def test_every_path_field_resolves_against_the_spec_and_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "specs").mkdir()
    spec = tmp_path / "specs" / "s.yaml"
    spec.write_text("data: {name: parquet, root: ~/data}\nnet: {init: w.pt}\ntracking: {storage_path: ray}\n"
                    "compare: {data: [{name: parquet, root: d1}, {name: parquet, root: ~/d2}], net.init: [~/a.pt, ../b.pt, runs:/"
                    + "0" * 32 + "]}\n")
    s = load_spec(spec)
    assert s.data.root == str(tmp_path / "home" / "data")
    assert s.net.init == str(tmp_path / "specs" / "w.pt")
    assert s.tracking.storage_path == str(tmp_path / "specs" / "ray")
    assert [d["root"] for d in s.compare["data"]] == [str(tmp_path / "specs" / "d1"), str(tmp_path / "home" / "d2")]
    assert s.compare["net.init"] == [str(tmp_path / "home" / "a.pt"), str(tmp_path / "b.pt"), "runs:/" + "0" * 32]
    assert load_spec(spec, ["tracking.storage_path=~/r"]).tracking.storage_path == str(tmp_path / "home" / "r")


@pytest.mark.parametrize("command", COMMANDS)
def test_home_in_data_root_is_expanded(cwd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    refused(cwd, command, ["empty.yaml", "--set", "data.name=parquet", "--set", "data.root=~/cifar"],
             f"data: parquet dataset: root folder {tmp_path}/home/cifar does not exist")


def test_two_compare_values_naming_one_path_are_refused(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("compare: {net.init: [a.pt, ./a.pt]}\n")
    with pytest.raises(SpecError, match="two values name the same path"):
        load_spec(tmp_path / "s.yaml")


# ----------------------------------------------------------------------------- YAML the loader will not afford


@pytest.mark.parametrize("command", COMMANDS)
def test_an_alias_bomb_is_refused_unexpanded(cwd: Path, command: str) -> None:
    (cwd / "bomb.yaml").write_text(BOMB)  # 9 levels of 9: 387 million strings once expanded
    refused(cwd, command, ["bomb.yaml"], "bomb.yaml: YAML refused:", f"more than {MAX_YAML_NODES} values", "alias bomb")
    # the same in a --set value: 9^5 zeros from five short lists
    nested = "[&a [" + ",".join(["0"] * 9) + "]" + "".join(f", &{b} [{','.join([f'*{a}'] * 9)}]" for a, b in zip("abc", "bcd"))
    nested += ", [" + ",".join(["*d"] * 9) + "]]"
    refused(cwd, command, ["empty.yaml", "--set", f"seeds={nested}"], "--set seeds: value refused:", "alias bomb")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_duplicate_key_is_refused_naming_it_and_its_lines(cwd: Path, command: str) -> None:
    (cwd / "dup.yaml").write_text("seeds: [0]\nphases:\n  P1: {lr: 0.01}\n  P1: {lr: 0.1}\n")
    refused(cwd, command, ["dup.yaml"], "dup.yaml: YAML refused: duplicate key 'P1' (first at line 3) at line 4")


def test_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("phases:\n  P1: &p {lr: 0.01, max_epochs: 3}\n  P2:\n    <<: *p\n    lr: 0.1\n")
    s = load_spec(tmp_path / "s.yaml")
    assert (s.phases.P2.lr, s.phases.P2.max_epochs) == (0.1, 3)


# ----------------------------------------------------------------------------- caps


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("setting", "expected"), [
    ("evaluation.thresholds=1000000000000", f"evaluation.thresholds: Input should be less than or equal to {MAX_THRESHOLDS}"),
    ("phases.P1.max_epochs=1.0e+35", "phases.P1.max_epochs:"),
    (f"phases.P1.max_epochs={MAX_EPOCHS + 1}", f"phases.P1.max_epochs: Input should be less than or equal to {MAX_EPOCHS}"),
    ("phases.P2.batch_size=100000000", "phases.P2.batch_size: Input should be less than or equal to"),
    ("net.width=100000", "net.width: Input should be less than or equal to"),
    ("seeds=[" + ",".join(map(str, range(1001))) + "]", "seeds: List should have at most 1000 items"),
    ("compare={phases.P2.lr: [" + ",".join(f"{(i + 1) / 1000}" for i in range(40)) + "], net.exit_every: ["
     + ",".join(map(str, range(1, 41))) + "]}", "1600 variants"),
], ids=["thresholds", "epochs-1e35", "epochs", "batch", "width", "seeds", "variants"])
def test_sizes_past_their_caps_are_refused(cwd: Path, command: str, setting: str, expected: str) -> None:
    refused(cwd, command, ["empty.yaml", "--set", setting], "invalid spec:", expected)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_net_too_big_to_build_is_counted_not_built(cwd: Path, command: str) -> None:
    # Under every field's cap, but 67 billion parameters: counted on the meta device, never allocated.
    refused(cwd, command, ["empty.yaml", "--set", "net.width=8000"], "net: resnet20 with these settings has",
             "parameters; at most")


def test_a_spec_file_past_its_size_cap_is_refused_unread(tmp_path: Path) -> None:
    (tmp_path / "big.yaml").write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(SpecError, match="a spec file is at most"):
        load_spec(tmp_path / "big.yaml")


# ----------------------------------------------------------------------------- files that are not what they claim


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", ["parquet", "imagefolder"])
def test_a_data_root_that_is_a_file_says_so(cwd: Path, command: str, name: str) -> None:
    (cwd / "afile").write_text("not a folder")
    refused(cwd, command, ["empty.yaml", "--set", f"data.name={name}", "--set", "data.root=afile"],
             f"data: {name} dataset: root {cwd}/afile is a file, not a folder")


@pytest.mark.parametrize("command", COMMANDS)
def test_random_bytes_as_net_init(cwd: Path, command: str) -> None:
    for i, raw in enumerate([bytes(range(256)) * 4, b"\x80\x02]q\x00(K\x01e."[:5], b"PK\x03\x04 truncated zip"]):
        (cwd / f"r{i}.pt").write_bytes(raw)
        out = refused(cwd, command, ["empty.yaml", "--set", f"net.init=r{i}.pt"],
                       f"net.init: {cwd}/r{i}.pt: not a state dict torch can read safely: corrupt, or not written by torch.save")
        assert "IndexError: list index out of range" not in out


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - what a crafted file does: call something on load
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("command", COMMANDS)
def test_a_start_that_would_run_code_is_refused_without_torchs_advice(cwd: Path, tmp_path: Path, command: str) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"backbone.stem.0.weight": _RunsCode(marker)}, cwd / "evil.pt")
    out = refused(cwd, command, ["empty.yaml", "--set", "net.init=evil.pt"],
                   f"net.init: {cwd}/evil.pt: not a state dict torch can read safely: it names Python code", "refused unread")
    assert "weights_only" not in out and "Weights only load failed" not in out
    assert not marker.exists()


def test_no_torch_load_error_carries_torchs_advice(tmp_path: Path) -> None:
    from exitflow.stages.checkpoints import UnreadableCheckpoint, read_state
    from exitflow.stages.core.nets.start import read_state_file
    from exitflow.stages.core.tensor_file import UnreadableTensors

    marker = tmp_path / "code-ran"
    torch.save({"w": _RunsCode(marker)}, tmp_path / "evil.pt")
    (tmp_path / "random.pt").write_bytes(bytes(range(256)))
    for path in (tmp_path / "evil.pt", tmp_path / "random.pt"):
        for read, error in ((read_state_file, UnreadableTensors), (read_state, UnreadableCheckpoint)):
            with pytest.raises(error) as info:
                read(str(path))
            assert "weights_only" not in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_check_starts_reads_every_variants_run(tmp_path: Path) -> None:
    # runs:/ID starts are read once the store is open (the runner passes its reader): every variant's.
    from exitflow.pipeline.resolve import check_starts

    good, wide = "a" * 32, "b" * 32
    states = {good: create_net(NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8)).state_dict(),
              wide: create_net(NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, width=32)).state_dict()}
    read: list[str] = []

    def read_run(run_id: str) -> dict[str, torch.Tensor]:
        read.append(run_id)
        return states[run_id]

    check_starts(load_spec(None, [f"net.init=runs:/{good}"]), read_run)
    with pytest.raises(SpecError, match=f"^compare net.init=runs:/{wide}: net.init: runs:/{wide}: ValueError: key"):
        check_starts(load_spec(None, [f"compare={{net.init: [runs:/{good}, runs:/{wide}]}}"]), read_run)
    assert read == [good, good, wide]
