"""MSDNet (`net.backbone: msdnet_cifar | msdnet_imagenet`): the authors' configurations, its scales
and transitions, FLOPs per exit against torch's FlopCounterMode, its own IC head, dynamic inference
over its list of scales, and a digits phase through evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from exitflow.stages.core.data import DataSpec, load_splits, make_loader
from exitflow.stages.core.evaluation import exit_criterion, exit_indices
from exitflow.stages.core.flops import exit_flops, flop_analysis
from exitflow.stages.core.inference import early_exit_forward
from exitflow.stages.core.nets import NetSpec, create_net
from exitflow.stages.core.nets.heads import PoolLinearHead
from exitflow.stages.core.nets.msdnet import CIFAR, IMAGENET, MSDNetClassifier, Transition, scales_at

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_the_configurations_have_their_parameter_counts() -> None:
    """Every parameter of the multi-exit net (backbone, last classifier, the ICs: all MSDNet's classifiers).
    ImageNet, 5 blocks of 4 layers: 23.96M; CIFAR-10, 7 blocks: 2.74M (0.81M without the 6 ICs)."""
    cifar = create_net(NetSpec(backbone="msdnet_cifar", num_classes=10))
    assert (_params(cifar), _params(cifar.backbone)) == (2_738_592, 810_852)
    imagenet = create_net(NetSpec(backbone="msdnet_imagenet", num_classes=1000, img_size=224))
    assert _params(imagenet) == 23_958_408
    assert cifar.exit_blocks == (1, 2, 3, 4, 5, 6, 7) and imagenet.exit_blocks == (1, 2, 3, 4, 5)


def test_scales_are_pruned_and_transitions_placed_as_configured() -> None:
    # CIFAR ("min"): 16 layers; the finest scales go only in the last two; transitions after layers 5 and 10
    assert [scales_at(CIFAR, layer) for layer in range(1, 17)] == [(3, 3)] * 14 + [(3, 2), (2, 1)]
    net = create_net(NetSpec(backbone="msdnet_cifar", num_classes=10))
    layers = [m for block in net.backbone.blocks for m in block]
    assert [i for i, m in enumerate(layers) if isinstance(m, Transition)] == [5, 11]  # after the 5th and 10th layer
    # scale sizes 32, 16, 8: every IC reads the coarsest (8x8), the head its single last scale
    assert all(shape[1:] == (8, 8) for shape in net.feature_shapes)
    # ImageNet ("max"): 20 layers in 4 scales, one scale fewer every 5 layers, a transition at each drop
    assert [scales_at(IMAGENET, layer)[1] for layer in range(1, 21)] == [4] * 5 + [3] * 5 + [2] * 5 + [1] * 5
    big = create_net(NetSpec(backbone="msdnet_imagenet", num_classes=1000, img_size=64))
    assert sum(isinstance(m, Transition) for block in big.backbone.blocks for m in block) == 3


def _flop_counter_exit(net, x, k: int) -> float:  # noqa: ANN001
    """Multiply-adds of exit k by FlopCounterMode: the blocks up to it and every IC up to it, as an early exit runs them."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        h = net.backbone.forward_stem(x)
        for number in range(1, net.exit_blocks[k] + 1):
            h = net.backbone.blocks[number - 1](h)
            ic = net._ic_after.get(number)
            if ic is not None and ic <= k:
                net.ics[ic](net.backbone.ic_input(h))
        if k == net.num_exits - 1:
            net.backbone.forward_head(h)
    return counter.get_total_flops() / 2  # FLOPs: 2 per multiply-add


@pytest.mark.parametrize(("backbone", "img_size", "classes"), [("msdnet_cifar", 32, 10), ("msdnet_imagenet", 64, 100)])
def test_flops_per_exit_agree_with_flop_counter_mode(backbone: str, img_size: int, classes: int) -> None:
    """FlopCounterMode counts convs and matmuls only: fvcore's conv and linear terms over the whole net
    (every exit at once) equal it exactly; exitflow's figures (BatchNorm folded, so uncounted; pooling
    counted) put every exit at or above it and within 2%."""
    net = create_net(NetSpec(backbone=backbone, num_classes=classes, img_size=img_size)).eval()
    x = torch.zeros(1, 3, img_size, img_size)
    reference = [_flop_counter_exit(net, x, k) for k in range(net.num_exits)]
    counted = exit_flops(net)
    assert all(1.0 <= c / r <= 1.02 for c, r in zip(counted, reference)), [c / r for c, r in zip(counted, reference)]
    with torch.no_grad():
        by_operator = flop_analysis(net, (x,)).by_operator()
    assert by_operator["conv"] + by_operator["linear"] == reference[-1]  # the last exit runs every piece


def test_the_ics_default_to_msdnet_classifiers_and_a_head_kind_replaces_them() -> None:
    spec = NetSpec(backbone="msdnet_cifar", num_classes=10, img_size=8, in_chans=1, width=4, depth=3)
    assert all(isinstance(ic, MSDNetClassifier) for ic in create_net(spec).ics)
    linear = create_net(NetSpec(**{**spec.__dict__, "head": "linear", "head_norm": True}))
    assert all(isinstance(ic, PoolLinearHead) for ic in linear.ics)
    with pytest.raises(ValueError, match="own IC head takes neither"):
        create_net(NetSpec(**{**spec.__dict__, "head_norm": True}))


def test_dynamic_inference_over_the_scales_takes_the_simulated_exits() -> None:
    """Samples leave mid-net: the list of scales is cut to the samples still in, and every decision
    equals the one simulated on the cached logits."""
    torch.manual_seed(0)
    net = create_net(NetSpec(backbone="msdnet_cifar", num_classes=10, img_size=8, in_chans=1, width=4, depth=4)).eval()
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        logits = torch.stack(net(x))
    conf = exit_criterion(logits, "max_softmax")
    threshold = float(np.quantile(conf[:-1].max(axis=0), 0.5))  # about half the samples leave at an IC
    simulated = exit_indices(conf, np.array([threshold]), "max_softmax")[0]
    out = early_exit_forward(net, x, threshold)
    assert out.exits.tolist() == simulated.tolist()
    assert len(set(simulated.tolist())) > 1
    taken = logits[torch.as_tensor(simulated), torch.arange(64)].argmax(-1)
    assert torch.equal(out.predictions, taken)


def test_a_digits_phase_trains_msdnet_and_its_evaluation_gives_a_curve() -> None:
    from exitflow.stages.core.score_model import score_model
    from exitflow.stages.core.loop import PhaseConfig, fit_phase, seed_everything

    data = DataSpec(name="digits", augment=False)
    splits = load_splits(data, seed=0)
    spec = NetSpec(backbone="msdnet_cifar", num_classes=10, img_size=8, in_chans=1, width=4, depth=3)
    seed_everything(0)
    net = create_net(spec)
    cfg = PhaseConfig(optimizer="adam", lr=3e-3, batch_size=64, max_epochs=2, patience=3, selection="mean")
    result = fit_phase(net, "P2", cfg, make_loader(splits.train, 64, shuffle=True, seed=0),
                       make_loader(splits.val, 256, shuffle=False, seed=0), "cpu")
    out = score_model(spec, result.best_state_dict, data, 0, ["max_softmax"], num_thresholds=20)
    accuracy = out.exits.column("accuracy").to_pylist()
    assert len(accuracy) == 3 and accuracy[-1] > 0.5  # 10 classes: well above chance after two epochs
    curve = out.curve.to_pylist()
    assert curve and all(0.0 <= r["accuracy"] <= 1.0 for r in curve)
