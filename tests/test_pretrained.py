"""Pretrained starts from the local caches (`net.init: torchvision:NAME | timm:NAME`): nothing downloads.

Each test builds the library's own model with random weights and puts its state dict where the library
caches published weights (a temporary torch hub folder, a temporary Hugging Face cache): exitflow must
find the file, rename it onto its backbone and compute the same features as the library's model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from exitflow.pipeline.cli import app
from exitflow.pipeline.graph import build_graph
from exitflow.pipeline.spec import SpecError, load_spec
from exitflow.stages.core.nets import NetSpec, create_net
from exitflow.stages.core.nets.pretrained import Pretrained, PretrainedStart, to_backbone_names
from exitflow.stages.core.nets.registry import list_nets
from exitflow.stages.core.nets.start import load_start

RESNET34_FILE = "resnet34-b627a593.pth"  # torchvision's file name for ResNet34_Weights.IMAGENET1K_V1
VIT_TAG = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


@pytest.fixture
def torch_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub folder in place of ~/.cache/torch/hub (restored after the test)."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    return hub


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_torchvision_resnet34(hub: Path) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet34(weights=None).eval()  # ImageNet's 1000 classes
    torch.save(model.state_dict(), hub / "checkpoints" / RESNET34_FILE)
    return model


def _cache_timm_vit(cache: Path) -> torch.nn.Module:
    """timm's ViT-Ti/16 in the Hugging Face cache's layout (refs/main -> snapshots/<revision>/)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    repo = cache / f"models--timm--{VIT_TAG}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(repo / "snapshots" / revision / "model.safetensors"))
    return model


def test_every_backbone_names_its_final_classifier() -> None:
    for name in list_nets():
        spec = NetSpec(backbone=name, num_classes=7, in_chans=3, img_size=32, width=48 if name.startswith("vit") else None, depth=2 if name.startswith("vit") else None)
        backbone = create_net(spec).backbone
        classifier = dict(backbone.named_modules())[backbone.classifier]
        assert isinstance(classifier, torch.nn.Linear) and classifier.out_features == 7, name


def test_a_cached_torchvision_resnet_gives_the_same_features_and_a_fresh_classifier(torch_hub: Path) -> None:
    model = _cache_torchvision_resnet34(torch_hub)
    pretrained = Pretrained.parse("torchvision:resnet34")
    assert pretrained is not None and pretrained.cached_file() == torch_hub / "checkpoints" / RESNET34_FILE
    assert pretrained.canonical() == "torchvision:ResNet34_Weights.IMAGENET1K_V1"
    net = create_net(NetSpec(backbone="resnet34", num_classes=10, in_chans=3, img_size=64, small_input=False)).eval()
    fc_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("backbone.head.2.")}
    loaded = load_start(net, PretrainedStart("torchvision:resnet34")())
    assert len(loaded) == len(model.state_dict()) - 2  # everything but fc.weight and fc.bias
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in fc_before.items())  # the classifier starts fresh
    x = torch.randn(2, 3, 64, 64)
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        b = net.backbone
        h = b.forward_stem(x)
        for block in b.blocks:  # 16 blocks: layer1..4's 3 + 4 + 6 + 3 in order
            h = block(h)
        ours = b.head[1](b.head[0](h))  # pooled features, before the classifier
        assert torch.allclose(ours, model(x), atol=1e-5)


def test_a_cached_timm_vit_gives_the_same_features(hf_cache: Path) -> None:
    model = _cache_timm_vit(hf_cache)
    net = create_net(NetSpec(backbone="vit_tiny", num_classes=10, in_chans=3, img_size=224)).eval()
    load_start(net, PretrainedStart(f"timm:{VIT_TAG}")())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        vit = net.backbone.vit
        ours = vit.forward_head(vit.forward_features(x), pre_logits=True)
        theirs = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_resnet_blocks_are_numbered_across_the_layers() -> None:
    state = {"conv1.weight": torch.zeros(1), "bn1.bias": torch.zeros(1), "fc.weight": torch.zeros(1),
             **{f"layer{i}.{j}.conv1.weight": torch.zeros(1) for i, n in enumerate((3, 4, 6, 3), 1) for j in range(n)}}
    names = to_backbone_names(state, "test")
    assert {"backbone.stem.0.weight", "backbone.stem.1.bias", "backbone.blocks.0.conv1.weight",
            "backbone.blocks.3.conv1.weight", "backbone.blocks.7.conv1.weight", "backbone.blocks.15.conv1.weight"} <= set(names)
    assert "backbone.blocks.16.conv1.weight" not in names and not any("fc" in k for k in names)
    with pytest.raises(ValueError, match="neither a ResNet"):
        to_backbone_names({"encoder.layers.0.weight": torch.zeros(1)}, "torchvision:vit_b_16")


def test_what_is_not_cached_or_not_published_is_named(torch_hub: Path, hf_cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"not in the local cache .*{RESNET34_FILE}.*downloads nothing"):
        Pretrained("torchvision", "resnet34").cached_file()
    with pytest.raises(FileNotFoundError, match="timm:vit_tiny.*not in the local cache"):
        Pretrained("timm", VIT_TAG).cached_file()
    with pytest.raises(ValueError, match="torchvision has no such weights"):
        Pretrained("torchvision", "resnet999").cached_file()
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):  # lists what there is
        Pretrained("torchvision", "resnet34.NOPE").cached_file()
    with pytest.raises(ValueError, match="timm has no pretrained weights"):
        Pretrained("timm", "no_such_net.tag").cached_file()


def test_the_spec_takes_library_names_and_keys_the_files_content(torch_hub: Path) -> None:
    sets = ["net.backbone=resnet34", "net.small_input=false"]
    with pytest.raises(SpecError, match="net.init: torchvision:resnet34: not in the local cache"):
        build_graph(load_spec(None, [*sets, "net.init=torchvision:resnet34"]))
    model = _cache_torchvision_resnet34(torch_hub)
    short = build_graph(load_spec(None, [*sets, "net.init=torchvision:resnet34"]))
    full = build_graph(load_spec(None, [*sets, "net.init=torchvision:ResNet34_Weights.IMAGENET1K_V1"]))
    start = short.nodes["seed0/P1"].config.start
    assert start.identity.startswith("torchvision:ResNet34_Weights.IMAGENET1K_V1@sha256:")
    assert short.nodes["seed0/P1"].key == full.nodes["seed0/P1"].key  # the same weights, however named
    torch.manual_seed(1)
    model.fc.weight.data.add_(1.0)  # other bytes under the same name: another start
    torch.save(model.state_dict(), torch_hub / "checkpoints" / RESNET34_FILE)
    assert build_graph(load_spec(None, [*sets, "net.init=torchvision:resnet34"])).nodes["seed0/P1"].key != short.nodes["seed0/P1"].key
    with pytest.raises(SpecError, match="name the weights"):
        load_spec(None, ["net.init='timm:'"])


def test_a_pretrained_start_that_does_not_fit_exits_2_before_ray(cwd: Path, torch_hub: Path) -> None:
    (cwd / "study.yaml").write_text("net: {width: 8}\n")  # digits' resnet20: not a ResNet-34
    for init, expected in (("torchvision:resnet34", "not in the local cache"), ("torchvision:resnet34", "ValueError: key")):
        if expected == "ValueError: key":
            _cache_torchvision_resnet34(torch_hub)
        result = CliRunner().invoke(app, ["plan", "study.yaml", "--set", f"net.init={init}"])
        assert result.exit_code == 2, result.output
        assert "net.init" in result.output and expected in result.output and "Traceback" not in result.output
    assert not (cwd / "mlflow.db").exists()
