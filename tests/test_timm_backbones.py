"""Any timm model as an early-exit backbone (issue 37, items 1 and 3): `net.backbone: timm:NAME` through
timm's own `forward_intermediates`, on three models exitflow has no code for (a BatchNorm CNN, a ConvNeXt,
a ViT), trained for real on digits through the three regimes' phases; FLOPs per exit against torch's
FlopCounterMode; dynamic early exit against the full forward; P3's frozen backbone bit for bit; the
refusals before Ray; and one real study through the shared Ray session."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from exitflow.pipeline.cli import app
from exitflow.pipeline.keys import cache_key
from exitflow.pipeline.spec import SpecError, load_spec
from exitflow.stages.core.analysis.permutation import permutation_spec
from exitflow.stages.core.data import DataSpec, load_splits, make_loader
from exitflow.stages.core.flops import exit_flops
from exitflow.stages.core.inference import early_exit_forward
from exitflow.stages.core.loop import PhaseConfig, fit_phase, seed_everything
from exitflow.stages.core.nets import NetSpec, create_net
from exitflow.stages.core.nets.timm_backbone import IntermediatesBackbone, timm_version
from test_spec_refusals import refused

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIDE = 32  # digits resized: test_convnext's stride-4 stem and three stride-2 stages need 32 px
MODELS = {  # timm models exitflow has no code for, small enough for CPU; value: the intermediates each exposes
    "timm:test_efficientnet": 5,  # a BatchNorm CNN (timm's EfficientNet, CI-sized): 5 feature levels
    "timm:regnetx_002": 5,  # RegNetX-200MF: stem + 4 stages, BatchNorm
    "timm:test_vit": 6,  # ViT (CI-sized): 6 transformer blocks, patch tokens as a grid
}
ONE_EPOCH = PhaseConfig(optimizer="adam", lr=3e-3, batch_size=64, max_epochs=1, patience=2)


def build(name: str, **fields: Any) -> nn.Module:
    seed_everything(0)
    return create_net(NetSpec(backbone=name, num_classes=10, in_chans=1, img_size=SIDE, **fields))


@pytest.fixture(scope="module")
def splits() -> Any:
    return load_splits(DataSpec(name="digits", augment=False, resize=SIDE, train_subset=200, test_subset=100), seed=0)


def _fit(net: nn.Module, phase: str, splits: Any) -> Any:
    return fit_phase(net, phase, ONE_EPOCH, make_loader(splits.train, 64, shuffle=True, seed=0),
                     make_loader(splits.val, 200, shuffle=False, seed=0), "cpu")


@pytest.fixture(scope="module")
def trained(splits: Any) -> dict[str, dict[str, nn.Module]]:
    """Each model through the three regimes' phases, one epoch each: joint (P2), disjoint (P1, P3),
    mixed (P1, P2); with each phase's parts before and after it (`changes`)."""
    out: dict[str, dict[str, Any]] = {}
    for name in MODELS:
        fresh = build(name)
        joint, p1 = copy.deepcopy(fresh), copy.deepcopy(fresh)
        changes = {"P2": _phase(joint, "P2", splits), "P1": _phase(p1, "P1", splits)}
        disjoint, mixed = copy.deepcopy(p1), copy.deepcopy(p1)
        changes["P3"] = _phase(disjoint, "P3", splits)
        changes["mixed P2"] = _phase(mixed, "P2", splits)
        out[name] = {"joint": joint, "disjoint": disjoint, "mixed": mixed, "changes": changes}
    return out


def _phase(net: nn.Module, phase: str, splits: Any) -> dict[str, tuple[bool, bool]]:
    """Fit one epoch of `phase`; per part (backbone weights, backbone buffers, ICs): did any tensor change?"""
    parts = {"weights": lambda: dict(net.backbone.named_parameters()), "buffers": lambda: dict(net.backbone.named_buffers()),
             "ics": lambda: dict(net.ics.named_parameters())}
    before = {part: {k: v.detach().clone() for k, v in get().items()} for part, get in parts.items()}
    result = _fit(net, phase, splits)
    assert result.epochs_run == 1 and not result.diverged
    return {part: any(not torch.equal(before[part][k], v) for k, v in get().items()) for part, get in parts.items()}


# ------------------------------------------------------------------------------------------- the adapter


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exits_sit_at_the_intermediates_and_the_final_exit_is_the_models_own_head(name: str) -> None:
    net = build(name).eval()
    assert net.num_blocks == MODELS[name]
    assert net.exit_blocks == tuple(range(1, MODELS[name] + 1))  # an IC after every intermediate but the last
    assert all(len(shape) == 3 for shape in net.feature_shapes)  # NCHW maps, the ViT's patch grid too
    x = torch.randn(3, 1, SIDE, SIDE)
    with torch.no_grad():
        exits = net(x)
        assert torch.allclose(exits[-1], net.backbone.model(x), atol=1e-5)  # timm's own forward and head
        for k in range(net.num_exits):
            assert torch.allclose(net.forward_until(x, k), exits[k], atol=1e-5)


def test_forward_until_stops_after_the_block_it_needs() -> None:
    net = build("timm:test_vit", exits=(2,)).eval()
    ran: list[int] = []
    for i, block in enumerate(net.backbone.model.blocks):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    with torch.no_grad():
        net.forward_until(torch.randn(2, 1, SIDE, SIDE), 0)
        assert ran == [0, 1]  # stop_early: the blocks after IC 0's are never run
        ran.clear()
        net(torch.randn(2, 1, SIDE, SIDE))
        assert ran == list(range(6))  # a whole pass runs each block once


def test_the_studys_head_kind_on_each_intermediate() -> None:
    net = build("timm:test_vit", head="mlp", head_hidden=(32,), exits=(2, 4))
    assert [type(ic).__name__ for ic in net.ics] == ["MLPHead", "MLPHead"]
    assert all(ic.tokens is False for ic in net.ics)  # the patch grid as forward_intermediates gives it (NCHW)


def test_any_module_with_the_intermediates_api_adapts_and_any_other_is_refused() -> None:
    import timm

    model = timm.create_model("test_resnet", pretrained=False, num_classes=4, in_chans=2)
    backbone = IntermediatesBackbone(model, (2, 16, 16))
    assert backbone.num_blocks == len(model.eval().forward_intermediates(torch.zeros(1, 2, 16, 16), intermediates_only=True))
    assert backbone.classifier == "model.fc"
    with pytest.raises(ValueError, match=r"Linear has no forward_intermediates or forward_head: .*timm's forward_intermediates API"):
        IntermediatesBackbone(nn.Linear(3, 3))


# --------------------------------------------------------------------------------- the three regimes


def test_the_three_regimes_train_what_each_phase_trains(trained: dict[str, dict[str, Any]]) -> None:
    """P1: the timm model (BatchNorm statistics too), no IC; P2: both; P3: the ICs alone, the timm model
    bit for bit as P1 left it, weights and buffers."""
    for name, regimes in trained.items():
        changes = regimes["changes"]
        has_buffers = name != "timm:test_vit"  # the CNNs' BatchNorm statistics
        assert changes["P1"] == {"weights": True, "buffers": has_buffers, "ics": False}, name
        assert changes["P2"] == changes["mixed P2"] == {"weights": True, "buffers": has_buffers, "ics": True}, name
        assert changes["P3"] == {"weights": False, "buffers": False, "ics": True}, name
        if has_buffers:
            assert any(isinstance(m, nn.BatchNorm2d) for m in regimes["disjoint"].backbone.modules())


def test_early_exit_inference_predicts_what_the_full_forward_does_at_the_exits_it_takes(
        trained: dict[str, dict[str, Any]], splits: Any) -> None:
    x = torch.stack([splits.test[i][0] for i in range(64)])
    for name, regimes in trained.items():
        net = regimes["mixed"].eval()
        with torch.no_grad():
            exits = net(x)
        # the median first-IC confidence: about half the batch leaves there, the rest goes on
        threshold = float(exits[0].softmax(-1).amax(-1).median())
        decided = early_exit_forward(net, x, threshold, "max_softmax")
        taken = set(decided.exits.tolist())
        assert 0 in taken and len(taken) >= 2, f"{name}: exits taken {taken}"
        for i, (e, p) in enumerate(zip(decided.exits.tolist(), decided.predictions.tolist())):
            assert p == int(exits[e][i].argmax()), f"{name}: sample {i} left at exit {e}"


# ------------------------------------------------------------------------------------------------ FLOPs


def _counted(fn: Any, *args: Any) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() // 2  # multiply-adds


# fvcore counts pooling and LayerNorm, FlopCounterMode convs and matmuls alone: an IC on RegNet's stem output
# (one 3x3 conv) is 3.6% pooling on RGB, 10% on digits' one channel, so its ICs here start at block 2.
FLOPS_EXITS = {"timm:regnetx_002": (2, 3, 4)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_exits_flops_are_within_2_percent_of_flop_counter_mode(name: str) -> None:
    seed_everything(0)
    net = create_net(NetSpec(backbone=name, num_classes=10, in_chans=3, img_size=SIDE, exits=FLOPS_EXITS.get(name))).eval()
    for module in net.modules():  # timm attention's math path, which FlopCounterMode counts on CPU
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    x = torch.zeros(1, 3, SIDE, SIDE)
    model = net.backbone.model
    with torch.no_grad():
        features = net.forward_intermediates(x, list(net.ic_blocks))
    ics = [_counted(ic, f) for ic, f in zip(net.ics, features)]
    for k, flops in enumerate(exit_flops(net)):
        if k < net.num_exits - 1:
            prefix = _counted(lambda: model.forward_intermediates(x, indices=[net.exit_blocks[k] - 1], stop_early=True,
                                                                  intermediates_only=True))
        else:
            prefix = _counted(model, x)
        reference = prefix + sum(ics[: k + 1])
        assert flops == pytest.approx(reference, rel=0.02), f"{name} exit {k}"


# ------------------------------------------------------------------------------------------- analyses


def test_connectivity_names_what_a_timm_model_lacks() -> None:
    with pytest.raises(ValueError, match=r"'timm:test_vit' \(IntermediatesBackbone over VisionTransformer\) has no permutation spec"):
        permutation_spec(build("timm:test_vit"))


def test_analyses_read_every_intermediate(trained: dict[str, dict[str, Any]], splits: Any) -> None:
    from exitflow.stages.core.analysis.mutual_information import block_mutual_information
    from exitflow.stages.core.analysis.landscape import loss_landscape
    from exitflow.stages.core.analysis.rank import layer_ranks

    net = trained["timm:regnetx_002"]["joint"].eval()
    x = torch.stack([splits.test[i][0] for i in range(32)])
    layers = block_mutual_information(net, x)  # each block's output, as the ICs read it
    assert [layer.index for layer in layers] == [1, 2, 3, 4, 5]
    assert [layer.dims for layer in layers] == [c * h * w for c, h, w in net.feature_shapes]
    with torch.no_grad():
        features = net.forward_intermediates(x)
    assert [tuple(f.shape[1:]) for f in features] == list(net.feature_shapes)
    ranks = layer_ranks(net, x)  # every conv and linear layer inside the timm model
    assert {r.layer.split(".")[0] for r in ranks} == {"model"} and len(ranks) > 4
    assert all(0 < r.rank <= min(r.rows, r.columns) for r in ranks)
    y = torch.tensor([int(splits.test[i][1]) for i in range(32)])
    rows = loss_landscape(net, x, y, steps=3)
    assert len(rows) == 3 * 3 * (net.num_exits + 1)  # a, b, every exit and their sum
    centre = [r["loss"] for r in rows if r["a"] == 0 and r["b"] == 0 and r["exit"] >= 0]
    with torch.no_grad():  # the unperturbed point is the net itself
        own = [torch.nn.functional.cross_entropy(z, y).item() for z in net(x)]
    assert centre == pytest.approx(own, rel=1e-4)


# ------------------------------------------------------------------------------------- keys and refusals


def test_timms_version_joins_the_key_of_a_timm_backbone_only() -> None:
    from exitflow.pipeline.keys import _libraries
    from exitflow.stages.core.nets import NetChoice
    from exitflow.stages.phase_plan import PhaseNodeConfig

    def config(backbone: str) -> PhaseNodeConfig:
        return PhaseNodeConfig(phase="P1", seed=0, data=DataSpec(name="digits", identity="digits"),
                               net=NetChoice(backbone=backbone), train=ONE_EPOCH)

    assert _libraries(config("timm:test_vit")) == {"timm": timm_version()}
    assert _libraries(config("resnet20")) == {}
    assert cache_key("train", config("timm:test_vit"), []) != cache_key("train", config("timm:test_convnext"), [])


RESIZED = ["--set", f"data.resize={SIDE}"]


@pytest.mark.parametrize("command", ["plan", "run"])
def test_a_timm_name_that_does_not_exist_is_refused_before_ray(cwd: Path, command: str) -> None:
    refused(cwd, command, ["empty.yaml", "--set", "net.backbone=timm:test_vitt", *RESIZED],
             "net: net spec field `backbone`: timm:test_vitt: timm", "has no model 'test_vitt'")


def test_an_exit_past_the_models_depth_is_refused_before_ray(cwd: Path) -> None:
    refused(cwd, "run", ["empty.yaml", "--set", "net.backbone=timm:test_vit", "--set", "net.exits=[3,6]", *RESIZED],
             "net spec field `exits`", "[6] out of range [1, 5] for timm:test_vit (6 blocks")


def test_an_image_the_model_cannot_take_is_refused_naming_it(cwd: Path) -> None:
    # digits' own 8 px: test_convnext downsamples 32x
    refused(cwd, "plan", ["empty.yaml", "--set", "net.backbone=timm:test_convnext"],
             "timm:test_convnext: forward_intermediates fails on a 1x8x8 input")


def test_a_model_without_intermediates_is_refused_before_ray(cwd: Path) -> None:
    (cwd / "plain_model.py").write_text(
        "from torch import nn\n\n"
        "def build(num_classes, in_chans, img_size):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * img_size * img_size, num_classes))\n")
    (cwd / "s.yaml").write_text("net: {backbone: 'plain_model:build'}\n")
    refused(cwd, "plan", ["s.yaml"], "net:", "forward_intermediates")


def test_what_a_timm_model_cannot_do_is_refused_before_ray(cwd: Path) -> None:
    base = ["empty.yaml", "--set", "net.backbone=timm:test_vit", *RESIZED]
    refused(cwd, "plan", [*base, "--set", "phases.P2.loss_weighting=gradient_equilibrium"],
             "phases.P2.loss_weighting: gradient_equilibrium", "timm:test_vit does not expose")
    refused(cwd, "plan", [*base, "--set", "analyses.connectivity.enabled=true"],
             "analyses.connectivity: mode connectivity:", "has no permutation spec")
    refused(cwd, "plan", [*base, "--set", "net.init=timm:test_vit.r160_in1k"],  # nothing cached here
             "net.init: timm:test_vit.r160_in1k:", "not in the local cache")
    with pytest.raises(SpecError, match="unknown net 'nosuchnet'.*timm:NAME.*module.path:builder"):
        from exitflow.pipeline.resolve import preflight

        preflight(load_spec(None, ["net.backbone=nosuchnet"]))


def test_a_timm_models_cached_weights_start_the_same_timm_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`net.init: timm:TAG` on `net.backbone: timm:NAME`: the library's state dict from the local Hugging Face
    cache, in its own layout, under the net's timm model; the ImageNet classifier left out, to start fresh."""
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    from exitflow.stages.core.nets.pretrained import PretrainedStart
    from exitflow.stages.core.nets.start import load_start

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    torch.manual_seed(1)
    library = timm.create_model("test_efficientnet", pretrained=False).eval()  # 3 channels, 1000 classes
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--timm--test_efficientnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in library.state_dict().items()}, str(repo / "snapshots" / revision / "model.safetensors"))

    seed_everything(0)
    net = create_net(NetSpec(backbone="timm:test_efficientnet", num_classes=10, in_chans=3, img_size=SIDE)).eval()
    loaded = load_start(net, PretrainedStart("timm:test_efficientnet.r160_in1k", onto_timm=True)())
    theirs = library.state_dict()
    assert loaded and all(torch.equal(v, theirs[k.removeprefix("backbone.model.")]) for k, v in loaded.items())
    assert not any(k.startswith("backbone.model.classifier.") for k in loaded)  # 1000 classes: left out
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        assert torch.allclose(net.backbone.model.forward_features(x), library.forward_features(x))


# ---------------------------------------------------------------------------------- through the pipeline


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_study_on_a_timm_model_runs_through_ray(ray_session: None, mlflow_uri: str, storage: str) -> None:
    """disjoint (P1, then P3 on the frozen model) through the shared Ray session, as `exitflow run` does;
    the three regimes' phases are the core tests' above."""
    from exitflow import open_study
    from exitflow.pipeline.runner import run_study
    from helpers import tiny_spec

    spec = tiny_spec(storage, "name=timm-study", "net.backbone=timm:test_byobnet", "net.width=null", "data.resize=16",
                     "data.train_subset=300", "data.test_subset=100", "regimes=[disjoint]", "seeds=[0]", epochs=1)
    result = run_study(spec, mlflow_uri)
    with open_study(result.parent_run_id, mlflow_uri) as study:
        assert set(study.budgets().regime) == {"disjoint"}
        assert len(study.exits()) == 5  # the ICs after the stem and three stages, and timm's own head
        assert sorted(study.histories().groupby("node").epoch.count().items()) == [("seed0/P1", 1), ("seed0/disjoint/P3", 1)]
        frozen = study.model("seed0/disjoint/P3")  # rebuilt from its checkpoint: the same timm net
        p1 = study.model("seed0/P1")
    assert frozen.spec.backbone == "timm:test_byobnet"
    before, after = p1.backbone.state_dict(), frozen.backbone.state_dict()
    assert any("running_var" in k for k in before)  # BatchNorm statistics are in the comparison
    assert all(torch.equal(before[k], after[k]) for k in before)  # P3 left P1's timm model as it was, bit for bit
