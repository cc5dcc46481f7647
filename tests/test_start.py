"""Starting points (`net.init`): a from-scratch phase starts from given backbone weights, exactly.

Unit tests check which keys load and which are refused; the CLI refuses a missing or mismatched
file with exit 2 before Ray; the cache key follows the weights' content, not their path; and on
Ray, a phase's recorded start hash equals the hash of the weights it was given: a file, then
another study's P1 run (`runs:/RUN_ID`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from helpers import tiny_spec
from exitflow.pipeline.artifacts import state_dict_hash
from exitflow.pipeline.cli import app
from exitflow.pipeline.graph import build_graph
from exitflow.pipeline.spec import SpecError, load_spec
from exitflow.stages.core.nets import NetSpec, create_net
from exitflow.stages.core.nets.start import backbone_weights, load_start

SMALL = dict(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exit_every=2, exit_start=2)


def _net(width: int = 8, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_net(NetSpec(width=width, **SMALL))  # type: ignore[arg-type]


def _backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("backbone.")}


def test_a_whole_net_or_a_backbone_alone_loads_its_backbone_and_leaves_the_ics() -> None:
    source, target = _net(seed=1), _net(seed=2)
    ics_before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("ics.")}
    loaded = load_start(target, source.state_dict())  # a whole net: its ICs are skipped
    assert state_dict_hash(loaded) == state_dict_hash(_backbone(source.state_dict()))
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in ics_before.items())
    fresh = _net(seed=3)
    load_start(fresh, source.backbone.state_dict())  # the backbone's own keys, unprefixed
    assert state_dict_hash(_backbone(fresh.state_dict())) == state_dict_hash(_backbone(source.state_dict()))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: {**s, "backbone.extra.weight": torch.zeros(1)}, "'backbone.extra.weight' is not in this net's backbone"),
    (lambda s: {k: v for k, v in s.items() if k != "backbone.stem.0.weight"}, "missing, e.g. 'stem.0.weight'"),
    (lambda s: {**s, "backbone.stem.0.weight": torch.zeros(3, 3)}, "has shape (3, 3)"),
    (lambda s: {"fc.weight": torch.zeros(10, 64)}, "'fc.weight' is not in this net's backbone"),
])
def test_weights_of_another_architecture_are_refused_naming_the_key(edit: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        backbone_weights(_net(), edit(dict(_net().state_dict())))


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_missing_or_mismatched_file_exits_2_naming_it_before_ray(cwd: Path, command: str) -> None:
    (cwd / "study.yaml").write_text("net: {width: 8}\n")
    torch.save(_net(width=16).state_dict(), cwd / "wide.pt")
    for init, expected in (("nope.pt", "nope.pt: no such file"), ("wide.pt", "wide.pt: ValueError: key")):
        result = CliRunner().invoke(app, [command, "study.yaml", "--set", f"net.init={init}"])
        assert result.exit_code == 2, result.output
        assert "net.init" in result.output and expected in result.output and "Traceback" not in result.output
    assert not (cwd / "mlflow.db").exists()  # refused before the store (and Ray) start
    bad = CliRunner().invoke(app, [command, "study.yaml", "--set", "net.init=runs:/123"])
    assert bad.exit_code == 2 and "net.init" in bad.output and "32-character" in bad.output


def test_the_key_follows_the_weights_content_not_their_path(tmp_path: Path) -> None:
    torch.save(_net(seed=1).state_dict(), tmp_path / "a.pt")
    shutil.copy(tmp_path / "a.pt", tmp_path / "moved.pt")
    torch.save(_net(seed=2).state_dict(), tmp_path / "b.pt")

    def keys(init: str | None) -> dict[str, str]:
        sets = ["net.width=8", "regimes=[joint,disjoint]", *([f"net.init={init}"] if init else [])]
        return {n.id: n.key for n in build_graph(load_spec(None, sets)).nodes.values()}

    a, moved, b, none = keys(str(tmp_path / "a.pt")), keys(str(tmp_path / "moved.pt")), keys(str(tmp_path / "b.pt")), keys(None)
    assert a == moved
    for node in ("seed0/P1", "seed0/joint/P2", "seed0/disjoint/P3", "report"):
        assert a[node] != b[node] and a[node] != none[node], node
    g = build_graph(load_spec(None, ["net.width=8", f"net.init={tmp_path / 'a.pt'}"]))
    assert g.nodes["seed0/P1"].config.start.identity.startswith("sha256:")
    assert g.nodes["seed0/disjoint/P3"].config.start is None  # it starts from P1, not from the file


def test_a_relative_init_path_resolves_against_the_spec_file(tmp_path: Path) -> None:
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "s.yaml").write_text("net: {init: ../weights/start.pt}\n")
    spec = load_spec(tmp_path / "specs" / "s.yaml", [])
    assert spec.net.init == str((tmp_path / "weights" / "start.pt").resolve())
    with pytest.raises(SpecError, match="net.init"):
        load_spec(None, ["net.init=s3://bucket/w.pt"])


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_phase_starts_from_exactly_the_given_weights(ray_session: None, mlflow_uri: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from exitflow.pipeline.artifacts import ArtifactStore
    from exitflow.pipeline.runner import run_study

    file = tmp_path / "start.pt"
    torch.save(_net(seed=7).state_dict(), file)
    given = state_dict_hash(_backbone(torch.load(file, weights_only=True)))
    first = run_study(tiny_spec(tmp_path / "ray", "name=start-file", "regimes=[disjoint]", f"net.init={file}", epochs=1),
                      mlflow_uri, progress=lambda _: None)
    p1 = first.results["seed0/P1"]
    assert p1.summary["start"] == {"source": str(file), "sha256": given}
    assert MlflowClient(mlflow_uri).get_run(p1.run_id).data.params["start.sha256"] == given

    # Another study starts from the first one's P1: its trained backbone, exactly.
    trained, _ = ArtifactStore(MlflowClient(mlflow_uri)).load_checkpoint(p1.run_id)
    second = run_study(tiny_spec(tmp_path / "ray", "name=start-run", "regimes=[joint]", f"net.init=runs:/{p1.run_id}",
                                 epochs=1), mlflow_uri, progress=lambda _: None)
    assert second.results["seed0/joint/P2"].summary["start"] == {
        "source": f"runs:/{p1.run_id}", "sha256": state_dict_hash(_backbone(trained))}
    assert given != state_dict_hash(_backbone(trained))  # P1 trained: the two starts differ
