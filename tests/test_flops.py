"""Per-exit FLOPs (fvcore multiply-adds): monotone over exits, consistent with the backbone, attention counted."""

from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from exitflow.stages.core.flops import backbone_flops, exit_flops, flop_analysis, piece_flops
from exitflow.stages.core.nets import MultiExitNet, NetSpec, create_net, list_nets

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Small but structurally complete configs (FLOPs depend on shapes only, so weights are irrelevant).
SMALL: dict[str, dict] = {
    "resnet20": dict(img_size=8, in_chans=1, width=4),
    "resnet32": dict(img_size=8, in_chans=1, width=4),
    "resnet56": dict(img_size=8, in_chans=1, width=4),
    "resnet18": dict(img_size=8, in_chans=1),
    "resnet34": dict(img_size=8, in_chans=1),
    "resnet50": dict(img_size=8, in_chans=1),
    "efficientnet_b0": dict(img_size=16, in_chans=1),
    "efficientnet_v2_s": dict(img_size=16, in_chans=3),
    "vit_tiny": dict(img_size=8, in_chans=1, width=24, depth=3),
    "vit_small": dict(img_size=8, in_chans=1, width=24, depth=3),
    "vit_base": dict(img_size=8, in_chans=1, width=24, depth=3),
    "vit_cifar": dict(img_size=8, in_chans=1, width=24, depth=3),
    "msdnet_cifar": dict(img_size=8, in_chans=1, width=4, depth=3),
    "msdnet_imagenet": dict(img_size=32, in_chans=1, width=4, depth=3),
}


def build(name: str, **overrides: object) -> MultiExitNet:
    torch.manual_seed(0)
    return create_net(NetSpec(**{"backbone": name, "num_classes": 5, **SMALL[name], **overrides}))


def _disable_fused_attention(net: nn.Module) -> None:
    """timm attention's math path (explicit matmuls), which FlopCounterMode counts on CPU."""
    for module in net.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False


def test_every_net_is_covered() -> None:
    assert set(SMALL) == set(list_nets())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_exit_flops_increase_and_end_above_the_backbone(name: str) -> None:
    net = build(name)
    flops = exit_flops(net)
    assert len(flops) == net.num_exits
    assert all(isinstance(f, int) and f > 0 for f in flops)
    assert all(a < b for a, b in zip(flops, flops[1:]))
    plain = backbone_flops(net)
    assert flops[-1] > plain
    # split out of the multi-exit trace, the backbone costs what a trace of the plain backbone costs
    x = torch.zeros(1, net.spec.in_chans, net.spec.img_size, net.spec.img_size)
    with torch.no_grad():
        assert plain == flop_analysis(net.backbone.eval(), (x,)).total()


def test_exit_k_is_backbone_prefix_plus_ics_so_far() -> None:
    net = build("resnet20", exits=(2, 5))
    p = piece_flops(net)
    assert exit_flops(net) == [
        p.stem + sum(p.blocks[:2]) + p.ics[0],
        p.stem + sum(p.blocks[:5]) + p.ics[0] + p.ics[1],
        p.stem + sum(p.blocks) + p.head + p.ics[0] + p.ics[1],
    ]


def test_counting_is_deterministic_and_restores_modes() -> None:
    net = build("resnet20").train()
    net.backbone.eval()  # a P3 net: frozen backbone in eval mode, ICs training
    first = exit_flops(net)
    assert exit_flops(net) == first
    assert net.training and all(ic.training for ic in net.ics)
    assert not any(m.training for m in net.backbone.modules())


def test_resnet20_cifar_matches_the_known_count() -> None:
    """ResNet-20 on 32x32 RGB is ~41M multiply-adds (He et al. 2016; ~40.8M in most counters)."""
    net = create_net(NetSpec(backbone="resnet20", num_classes=10))
    assert 40.0e6 < backbone_flops(net) < 42.0e6


def test_batch_norm_folds_into_its_conv_and_counts_nothing() -> None:
    """At inference BatchNorm is a per-channel affine map that folds into the conv before it (as the
    MSDNet authors' counter also leaves it out): a conv with its BatchNorm costs what the conv does,
    which is FlopCounterMode's count."""
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    x = torch.zeros(1, 3, 16, 16)
    with torch.no_grad():
        alone = flop_analysis(conv.eval(), (x,)).total()
        with_bn = flop_analysis(nn.Sequential(conv, nn.BatchNorm2d(8)).eval(), (x,)).total()
        with FlopCounterMode(display=False) as counter:
            conv(x)
    assert with_bn == alone == counter.get_total_flops() // 2 == 3 * 8 * 9 * 16 * 16


def _vit() -> MultiExitNet:
    return build("vit_small", img_size=32, in_chans=3, width=96, depth=3, head_norm=True)


def test_vit_total_matches_flop_counter_mode() -> None:
    """fvcore vs torch's FlopCounterMode on timm's math attention path.

    FlopCounterMode counts FLOPs (2 per multiply-add) of matmuls and convs only, and nothing for
    fused attention on CPU, so it runs on the unfused path. fvcore also counts LayerNorm (5 per
    element): removing that term the two agree exactly; with it, within 2%.
    """
    net = _vit().eval()
    x = torch.zeros(1, 3, 32, 32)
    flops = exit_flops(net)[-1]
    with torch.no_grad():
        whole = flop_analysis(net, (x,))  # one trace of every exit at once
        assert whole.total() == flops
        layer_norm = whole.by_operator()["layer_norm"]
        _disable_fused_attention(net)
        with FlopCounterMode(display=False) as counter:
            net(x)
    reference = counter.get_total_flops() // 2
    assert abs(flops - reference) <= 0.02 * reference
    assert flops - layer_norm == reference


def test_attention_is_counted_analytically() -> None:
    """2 * tokens^2 * dim multiply-adds per layer (Q K^T and attn V), fused or not."""
    net = _vit().eval()
    tokens, dim, depth = (32 // 4) ** 2 + 1, 96, 3  # 32 px through 4 px patches + the CLS token
    x = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        fused = flop_analysis(net.backbone, (x,)).by_operator()
        assert fused["scaled_dot_product_attention"] == depth * 2 * tokens**2 * dim
        total = exit_flops(net)
        _disable_fused_attention(net)
        unfused = flop_analysis(net.backbone, (x,)).by_operator()
    assert unfused["matmul"] == fused["scaled_dot_product_attention"]
    assert exit_flops(net) == total
