"""A backbone of the user's own (issue 37, item 2): `net.backbone: module:builder` beside the spec, or an
entry point of the group `exitflow.backbones`. It builds as the built-in nets do (ICs, heads, methods,
phases), its source joins the cache key of the nodes that build it, its module travels to every Ray
worker, and what a builder gets wrong is refused with exit 2 and the reason, before Ray.

The worked example (`examples/custom_backbone/`) runs here with `exitflow run` from a fresh folder on
the suite's Ray; `tests/test_cluster.py` submits it to a two-node cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from exitflow.pipeline.cli import app
from exitflow.pipeline.graph import build_graph
from exitflow.pipeline.spec import load_spec
from exitflow.pipeline.user_code import backbone_code, shipped_paths, user_modules
from test_spec_refusals import refused
from exitflow.stages.core.nets import MultiExitNet, NetSpec, create_net

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_backbone"
PHASES = ("seed0/P1", "seed0/joint/P2", "seed0/disjoint/P3", "seed0/mixed/P2")
COMMANDS = ["plan", "run"]


@pytest.fixture(autouse=True)
def own_imports(tmp_path: Path) -> Iterator[None]:
    """Each test's modules import afresh: the import path as it was after, and the modules this test
    imported from its folder forgotten (the next test has its own `my_backbone`, elsewhere)."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """A copy of examples/custom_backbone: its study.yaml and my_backbone.py."""
    copy = tmp_path / "custom_backbone"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _net(folder: Path, **fields: object) -> MultiExitNet:
    """The example's net on digits' sizes, its folder first on the import path (as the spec's loader puts it)."""
    from exitflow.stages.core.user_backbone import import_root

    import_root(folder)
    return create_net(NetSpec(**{"backbone": "my_backbone:build", "num_classes": 10, "in_chans": 1, "img_size": 8, **fields}))


# ----------------------------------------------------------------------------- it builds as a built-in net does


def test_the_example_is_a_multi_exit_net_like_the_built_in_ones(example: Path) -> None:
    from exitflow.stages.core.flops import exit_flops
    from exitflow.stages.core.regimes import prepare_phase

    net = _net(example, width=8)
    assert type(net.backbone).__name__ == "TinyCNN" and net.backbone.stem[0].out_channels == 8  # width reached build()
    assert net.exit_blocks == (1, 2, 3, 4)  # the backbone's default_exits, then the final head
    x = torch.randn(5, 1, 8, 8)
    net.eval()
    logits = net(x)
    assert [tuple(t.shape) for t in logits] == [(5, 10)] * 4
    for k in range(4):  # early exit runs only the blocks it needs, and gives the same logits
        torch.testing.assert_close(net.forward_until(x, k), logits[k])
    flops = exit_flops(net)
    assert all(a < b for a, b in zip(flops, flops[1:]))
    # The spec places the ICs and picks heads and methods as for any backbone
    assert _net(example, exit_every=2).exit_blocks == (2, 4)
    assert _net(example, exits=[3], head="linear").ics[0].__class__.__name__ == "PoolLinearHead"
    assert len(_net(example, method="ztw").ics) == 3
    # P3 freezes every backbone parameter, the final head included; only the ICs train
    trained = prepare_phase(net, "P3")
    assert not any(p.requires_grad for p in net.backbone.parameters())
    assert {id(p) for p in trained} == {id(p) for p in net.ics.parameters()}


def test_a_timm_style_model_is_cut_at_the_intermediates_it_exposes(tmp_path: Path) -> None:
    from exitflow.stages.core.nets.timm_backbone import IntermediatesBackbone

    (tmp_path / "timm_builder.py").write_text(
        "import timm\n\n"
        "def build(num_classes, in_chans):\n"
        "    return timm.create_model('resnet10t', pretrained=False, num_classes=num_classes, in_chans=in_chans)\n")
    from exitflow.stages.core.user_backbone import import_root

    import_root(tmp_path)
    net = create_net(NetSpec(backbone="timm_builder:build", num_classes=10, in_chans=1, img_size=32))
    assert isinstance(net.backbone, IntermediatesBackbone)
    assert net.num_blocks == 5 and net.exit_blocks == (1, 2, 3, 4, 5)  # timm's stem and its four stages
    net.eval()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(net(x)[-1], net.backbone.model(x))  # the model's own head is the final exit
    # What the nodes that build it key: the builder's code, and the version of the library it builds with
    assert re.fullmatch(r"timm_builder@[0-9a-f]{16} timm==\d[\w.]*", backbone_code("timm_builder:build") or "")


def test_an_entry_point_of_an_installed_package_names_a_backbone(tmp_path: Path, example: Path) -> None:
    """A package that declares `[exitflow.backbones] tiny = tiny_backbones:build` (its dist-info read by
    importlib.metadata, as pip leaves it) gives the backbone `tiny`; its source joins the key too."""
    site = tmp_path / "site"
    (site / "tiny_backbones-1.0.dist-info").mkdir(parents=True)
    (site / "tiny_backbones-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-backbones\nVersion: 1.0\n")
    (site / "tiny_backbones-1.0.dist-info" / "entry_points.txt").write_text("[exitflow.backbones]\ntiny = tiny_backbones:build\n")
    shutil.copy(example / "my_backbone.py", site / "tiny_backbones.py")
    sys.path.insert(0, str(site))
    net = create_net(NetSpec(backbone="tiny", num_classes=10, in_chans=1, img_size=8))
    assert type(net.backbone).__name__ == "TinyCNN"
    spec = load_spec(None, ["net.backbone=tiny", "net.width=8"])
    before = {n.id: n.key for n in build_graph(spec).nodes.values()}
    (site / "tiny_backbones.py").write_text((site / "tiny_backbones.py").read_text().replace("2 * width", "3 * width"))
    after = {n.id: n.key for n in build_graph(spec).nodes.values()}
    assert all(before[n] != after[n] for n in PHASES)


# ----------------------------------------------------------------------------- its source joins the cache key


def _keys(spec_file: Path) -> dict[str, str]:
    return {n.id: n.key for n in build_graph(load_spec(spec_file)).nodes.values()}


def test_editing_the_builder_rekeys_every_node_and_a_comment_none(example: Path, tmp_path: Path) -> None:
    module = example / "my_backbone.py"
    source = module.read_text()
    first = _keys(example / "study.yaml")
    assert len(first) == 8 and len(set(first.values())) == 8
    module.write_text(source.replace("def conv_block", "# a comment of mine, and a blank line\n\ndef conv_block"))
    assert _keys(example / "study.yaml") == first  # comments change no result
    module.write_text(source.replace("nn.ReLU(inplace=True)", "nn.GELU()"))
    edited = _keys(example / "study.yaml")
    assert all(edited[n] != first[n] for n in first)  # every phase re-trains; evaluations and report follow
    module.write_text(source)
    moved = tmp_path / "elsewhere" / "custom_backbone"
    shutil.copytree(example, moved, ignore=shutil.ignore_patterns("__pycache__"))
    sys.modules.pop("my_backbone", None)  # the copy's module, found first on the import path now
    assert _keys(moved / "study.yaml") == first  # the code is keyed, not its folder: a moved study stays cached


def test_a_module_the_builder_imports_beside_it_joins_the_key_and_travels(example: Path) -> None:
    module = example / "my_backbone.py"
    (example / "blocks.py").write_text(
        "from torch import nn\n\n\ndef conv_block(i, o, stride=1):\n"
        "    return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())\n")
    source = module.read_text()
    module.write_text(source.replace("from torch import Tensor, nn\n", "from torch import Tensor, nn\n\nfrom blocks import conv_block\n")
                      .split("def conv_block")[0] + "class TinyCNN" + source.split("class TinyCNN")[1])
    first = _keys(example / "study.yaml")
    assert sorted(user_modules("my_backbone")) == ["blocks", "my_backbone"]  # exitflow and torch are not the user's
    assert shipped_paths(["my_backbone:build"]) == [str(example / "blocks.py"), str(example / "my_backbone.py")]
    (example / "blocks.py").write_text((example / "blocks.py").read_text().replace("nn.ReLU()", "nn.GELU()"))
    assert all(_keys(example / "study.yaml")[n] != first[n] for n in PHASES)


def test_a_package_of_the_users_travels_as_its_folder(tmp_path: Path, example: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    shutil.copy(example / "my_backbone.py", tmp_path / "models" / "tiny.py")
    (tmp_path / "s.yaml").write_text("net: {backbone: models.tiny:build}\n")
    spec = load_spec(tmp_path / "s.yaml")
    assert sys.path[0] == str(tmp_path)  # the spec's folder, first
    assert shipped_paths([spec.net.backbone]) == [str(tmp_path / "models")]
    assert shipped_paths(["resnet20", "timm:resnet10t"]) == []  # the project's and a library's: nothing to ship


# ----------------------------------------------------------------------------- refused before Ray, exit 2, the reason


def _study(cwd: Path, backbone: str, module: str | None = None, name: str = "bb", **net: object) -> list[str]:
    """A spec in `cwd/study/` naming `backbone`, with `module` beside it as `name`.py; the CLI's arguments."""
    folder = cwd / "study"
    folder.mkdir()
    if module is not None:
        (folder / f"{name}.py").write_text(module)
    fields = ", ".join(f"{k}: {v}" for k, v in {"backbone": f"'{backbone}'", **net}.items())
    (folder / "s.yaml").write_text(f"net: {{{fields}}}\n")
    return ["study/s.yaml"]


GOOD = (EXAMPLE / "my_backbone.py").read_text()
# module source, backbone, what the one line says (beside "net: net spec field `backbone`: '<backbone>'")
REFUSALS = {
    "a module that cannot be imported": (None, "nosuchmodule:build", ["cannot import 'nosuchmodule'", "beside the spec file"]),
    "a module whose import fails": ("import torch_nonexistent_dependency\n", "bb:build",
                                    ["it imports 'torch_nonexistent_dependency', which is not installed"]),
    "a module that does not compile": ("def build(num_classes:\n", "bb:build", ["importing 'bb' raised SyntaxError:"]),
    "a builder that does not exist": (GOOD, "bb:buidl", ["module 'bb'", "has no 'buidl'", "its callables: ['TinyCNN', 'build', 'conv_block']"]),
    "a builder that raises": ("def build(num_classes, in_chans, img_size):\n"
                              "    raise ValueError(f'TinyNet needs 3 channels, got {in_chans}')\n", "bb:build",
                              ["raised ValueError when called with (num_classes=10, in_chans=1, img_size=8): TinyNet needs 3 channels, got 1"]),
    "a builder returning a plain module": ("from torch import nn\n\ndef build(num_classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n",
                                           "bb:build", ["returned a torch.nn.modules.container.Sequential (a torch module without forward_stem, "
                                                        "blocks, forward_head, and no forward_intermediates)", "it must return an ExitBackbone"]),
    "a builder returning nothing": ("def build(num_classes):\n    pass\n", "bb:build", ["returned None (of type NoneType), not a torch module"]),
}
REQUIRED = ("a module that cannot be imported", "a builder that does not exist", "a builder that raises",
            "a builder returning a plain module")


@pytest.mark.parametrize("case", [pytest.param((c, cmd), id=f"{cmd}: {c}") for c in REFUSALS for cmd in COMMANDS
                                  if cmd == "plan" or c in REQUIRED])
def test_what_a_builder_gets_wrong_is_refused_before_ray(cwd: Path, case: tuple[str, str]) -> None:
    name, command = case
    module, backbone, expected = REFUSALS[name]
    args = _study(cwd, backbone, module)
    refused(cwd, command, args, f"exitflow: net: net spec field `backbone`: '{backbone}'", *expected)


# What the protocol checks on the backbone itself (one command: the same pre-flight refuses for both)
BACKBONE_REFUSALS = {
    "blocks in a plain list": ("self.blocks = nn.ModuleList([", "self.blocks = list(["),
    "logits for other classes": ("nn.Linear(2 * width, num_classes)", "nn.Linear(2 * width, 3)"),
    "a forward that fails": ("return self.head(h)", "return self.head(h.flatten(1))"),
}
BACKBONE_REASONS = {
    "blocks in a plain list": "its blocks are not registered in the backbone (hold them in an nn.ModuleList or nn.Sequential",
    "logits for other classes": "forward_head gives logits of shape (1, 3) for one input; the data set has 10 classes",
    "a forward that fails": "forward_head fails on one 1x8x8 input (the data set's): RuntimeError:",
}


@pytest.mark.parametrize("case", list(BACKBONE_REFUSALS))
def test_a_backbone_that_breaks_the_protocol_is_refused_saying_how(cwd: Path, case: str) -> None:
    old, new = BACKBONE_REFUSALS[case]
    assert old in GOOD
    args = _study(cwd, "bb:build", GOOD.replace(old, new))
    refused(cwd, "plan", args, "exitflow: net: net spec field `backbone`: 'bb:build'", BACKBONE_REASONS[case])


def test_width_and_exits_are_checked_as_for_any_backbone(cwd: Path) -> None:
    no_width = GOOD.replace("def build(num_classes: int, in_chans: int, width: int = 32)", "def build(num_classes: int, in_chans: int)")
    no_width = no_width.replace("TinyCNN(num_classes, in_chans, width)", "TinyCNN(num_classes, in_chans, 16)")
    args = _study(cwd, "bb:build", no_width, width=8)
    refused(cwd, "plan", args, "net spec field `width`: 'bb:build' takes no `width` argument")
    shutil.rmtree(cwd / "study")
    args = _study(cwd, "bb2:build", GOOD, name="bb2", exits="[2, 7]")
    refused(cwd, "run", args, "net spec field `exits`: IC positions [7] out of range [1, 3] for bb2:build (4 blocks")


@pytest.mark.parametrize(("backbone", "reason"), [
    ("my backbone:build", "'my backbone:build': expected module.path:builder"),
    ("models/my_backbone.py:build", "'models/my_backbone.py:build': name the module, not its file: models.my_backbone:build"),
])
def test_a_malformed_builder_path_is_refused(cwd: Path, backbone: str, reason: str) -> None:
    refused(cwd, "plan", _study(cwd, backbone), reason)


def test_submit_refuses_a_builder_module_the_upload_would_not_carry(cwd: Path, tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "far_backbone.py").write_text(GOOD)
    sys.path.insert(0, str(tmp_path / "outside"))  # importable here (PYTHONPATH), but not part of the upload
    (cwd / "s.yaml").write_text("net: {backbone: far_backbone:build}\n")
    result = CliRunner().invoke(app, ["submit", "s.yaml", "--address", "http://127.0.0.1:1", "--tracking-uri", "http://127.0.0.1:2"])
    assert result.exit_code == 2, result.output
    assert f"{tmp_path}/outside/far_backbone.py lies outside the working directory" in result.output


def test_a_spec_naming_no_module_leaves_the_import_path_alone(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("net: {backbone: resnet20}\n")
    path = list(sys.path)
    load_spec(tmp_path / "s.yaml")
    assert sys.path == path


# ----------------------------------------------------------------------------- the example, run for real


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_the_example_runs_from_a_fresh_folder_and_an_edited_builder_retrains(ray_address: str, example: Path, tmp_path: Path) -> None:
    """`exitflow run custom_backbone/study.yaml` from the folder above it, on the suite's Ray: the workers'
    working directory is not the spec's folder, so they import my_backbone only as Ray ships it."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "EXITFLOW_FAULT")}
    env.update(PYTHONUNBUFFERED="1", RAY_TRAIN_METRICS_ENABLED="0")
    cmd = [sys.executable, "-m", "exitflow.pipeline.cli", "run", "custom_backbone/study.yaml", "--address", ray_address,
           "--tracking-uri", uri, "--plain"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "test accuracy (%)" in done.stdout and re.search(r"8 nodes, 0 cached, 4 phases trained", done.stdout), done.stdout
    keys = _keys(example / "study.yaml")
    c = MlflowClient(uri)  # the store's database read directly: its runs' tags, nothing written
    exp = c.get_experiment_by_name("custom-backbone")
    runs = {r.data.tags["exitflow.node"]: r for r in c.search_runs([exp.experiment_id], max_results=100) if "exitflow.node" in r.data.tags}
    assert set(runs) == set(keys) and {r.info.status for r in runs.values()} == {"FINISHED"}
    # The phases' keys, which hold my_backbone's code, are those this process computes: a second run reuses them
    assert {n: runs[n].data.tags["exitflow.key"] for n in PHASES} == {n: keys[n] for n in PHASES}
    (example / "my_backbone.py").write_text((example / "my_backbone.py").read_text().replace("nn.ReLU(inplace=True)", "nn.GELU()"))
    edited = _keys(example / "study.yaml")
    assert not {edited[n] for n in PHASES} & {r.data.tags["exitflow.key"] for r in runs.values()}  # edited: every phase re-trains
