"""Multi-exit nets: every registered net's exits, gradients, rebuild from spec, placement and spec errors."""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import replace
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from exitflow.stages.core.nets import MultiExitNet, NetSpec, create_net, list_nets, register_net
from exitflow.stages.core.nets.methods import METHODS, ExitMethod, register_method
from exitflow.stages.core.nets.multi_exit import scale_grad

pytestmark = pytest.mark.usefixtures("one_torch_thread")


NUM_CLASSES = 5
# The smallest spec per net that still exercises its real structure (stem, every block, heads):
# 1-channel 8x8 images (digits-like) wherever the family allows, 16x16 for EfficientNet.
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


def small_spec(name: str, **overrides: object) -> NetSpec:
    return NetSpec(**{"backbone": name, "num_classes": NUM_CLASSES, **SMALL[name], **overrides})


@functools.cache
def _built(name: str) -> MultiExitNet:
    torch.manual_seed(0)
    return create_net(small_spec(name))


def fresh(name: str) -> MultiExitNet:
    """A private copy of the cached small net (building the big torchvision nets costs seconds)."""
    return copy.deepcopy(_built(name))


def images(spec: NetSpec, batch: int = 2, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size, generator=gen)


def labels(batch: int = 2, seed: int = 2) -> Tensor:
    return torch.randint(0, NUM_CLASSES, (batch,), generator=torch.Generator().manual_seed(seed))


def test_every_family_is_registered() -> None:
    assert set(SMALL) == set(list_nets())


def test_register_twice_fails() -> None:
    def resnet20(spec: NetSpec) -> MultiExitNet:
        return create_net(spec)

    with pytest.raises(ValueError, match="registered already"):
        register_net(resnet20)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_exits_shapes_and_values(name: str) -> None:
    net = fresh(name)
    x = images(net.spec)
    assert net.exit_blocks[-1] == net.num_blocks
    assert net.num_exits == len(net.exit_blocks) == len(net.ics) + 1
    assert all(1 <= b < net.num_blocks for b in net.ic_blocks)
    for mode in (True, False):
        net.train(mode)
        with torch.no_grad():
            out = net(x)
        assert len(out) == net.num_exits
        for logits in out:
            assert logits.shape == (2, NUM_CLASSES)
            assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_until_matches_forward(name: str) -> None:
    net = fresh(name).eval()
    x = images(net.spec)
    with torch.no_grad():
        out = net(x)
        for k in range(net.num_exits):
            torch.testing.assert_close(net.forward_until(x, k), out[k])
        torch.testing.assert_close(net.forward_until(x, -1), out[-1])
        torch.testing.assert_close(net.backbone(x), out[-1])
    with pytest.raises(IndexError):
        net.forward_until(x, net.num_exits)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_parameter_gets_a_gradient(name: str) -> None:
    net = fresh(name).train()
    out = net(images(net.spec))
    sum(nn.functional.cross_entropy(logits, labels()) for logits in out).backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    # the contract's split: backbone + ICs hold every parameter, each exactly once
    assert {id(p) for p in net.parameters()} == {id(p) for p in net.backbone.parameters()} | {
        id(p) for p in net.ics.parameters()
    }
    assert not {id(p) for p in net.backbone.parameters()} & {id(p) for p in net.ics.parameters()}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_spec_round_trip_rebuilds_the_same_net(name: str) -> None:
    net = fresh(name).eval()
    spec = NetSpec.from_dict(json.loads(json.dumps(net.spec.to_dict())))
    assert spec == net.spec
    torch.manual_seed(123)  # different init: the state dict alone must make it equal
    rebuilt = create_net(spec).eval()
    rebuilt.load_state_dict(net.state_dict())
    x = images(spec)
    with torch.no_grad():
        for a, b in zip(net(x), rebuilt(x)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_intermediates_match_feature_shapes(name: str) -> None:
    net = fresh(name).eval()
    with torch.no_grad():
        feats = net.forward_intermediates(images(net.spec, batch=1))
        last = net.forward_intermediates(images(net.spec, batch=1), blocks=[net.num_blocks])
    assert [tuple(f.shape[1:]) for f in feats] == list(net.feature_shapes)
    torch.testing.assert_close(last[0], feats[-1])


def test_frozen_ics_still_return_logits() -> None:
    """P1 under DDP: ICs frozen, yet forward returns every exit and the final loss trains the backbone."""
    net = fresh("resnet20").train()
    net.ics.requires_grad_(False)
    out = net(images(net.spec))
    assert len(out) == net.num_exits
    assert all(o.requires_grad for o in out)  # IC logits still hang off the trainable backbone
    nn.functional.cross_entropy(out[-1], labels()).backward()
    assert all(p.grad is None for p in net.ics.parameters())
    assert all(p.grad is not None for p in net.backbone.parameters())


def test_channels_last_gives_the_same_logits() -> None:
    net = fresh("resnet20").eval()
    x = images(net.spec)
    with torch.no_grad():
        ref = net(x)
        out = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b)


# --- gradient equilibrium ---------------------------------------------------------------------


def _grads(net: MultiExitNet, x: Tensor, pick: slice | list[int]) -> dict[str, Tensor]:
    net.zero_grad(set_to_none=True)
    out = net(x)
    chosen = out[pick] if isinstance(pick, slice) else [out[i] for i in pick]
    sum(nn.functional.cross_entropy(o, labels()) for o in chosen).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["resnet20", "vit_cifar", "msdnet_cifar"])  # msdnet: a list of scales between blocks
def test_gradient_equilibrium_keeps_forward_changes_backbone_grads(name: str) -> None:
    net = fresh(name).eval()  # eval: identical forward passes, no BatchNorm statistics drift
    x = images(net.spec)
    with torch.no_grad():
        plain = net(x)
        net.set_gradient_equilibrium(True)
        balanced = net(x)
        net.set_gradient_equilibrium(False)
    for a, b in zip(plain, balanced):
        assert torch.equal(a, b)

    g_plain = _grads(net, x, slice(None))
    net.set_gradient_equilibrium(True)
    g_eq = _grads(net, x, slice(None))
    backbone = {n for n, _ in net.named_parameters() if n.startswith("backbone.")}
    assert any(not torch.allclose(g_plain[n], g_eq[n]) for n in backbone)
    # the rescaling sits between backbone and ICs: IC and final-head gradients are untouched
    for n in g_plain.keys() - backbone:
        torch.testing.assert_close(g_plain[n], g_eq[n])


def test_gradient_equilibrium_factors() -> None:
    """Li et al. 2019: IC i of n exits gets 1/(n-i) of the branch gradient, the deeper path (n-i-1)/(n-i)."""
    net = fresh("resnet20").eval()
    x = images(net.spec)
    n = net.num_exits
    stem = [name for name, _ in net.named_parameters() if name.startswith("backbone.stem.")]
    last_ic = n - 2  # its branch gets 1/2, and nothing scales the stem's path to it before that
    before_first_ic = "backbone.blocks.0."
    plain_ic = _grads(net, x, [last_ic])
    plain_final = _grads(net, x, [n - 1])
    net.set_gradient_equilibrium(True)
    eq_ic = _grads(net, x, [last_ic])
    eq_final = _grads(net, x, [n - 1])
    for name in stem + [k for k in plain_ic if k.startswith(before_first_ic)]:
        # to the last IC: deeper-path factors of ICs 0..n-3, then 1/2 on its branch
        factor = 1.0 / 2
        for i in range(last_ic):
            factor *= (n - i - 1) / (n - i)
        torch.testing.assert_close(eq_ic[name], factor * plain_ic[name])
        # to the final exit: the deeper-path factors telescope to 1/n
        torch.testing.assert_close(eq_final[name], plain_final[name] / n)


def test_scale_grad_is_identity_forward() -> None:
    x = torch.randn(3, requires_grad=True)
    y = scale_grad(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 0.25))


# --- placement ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [
        ("resnet20", {}, (2, 4, 6, 8)),  # 9 blocks: every other from the 2nd
        ("resnet32", {}, (5, 7, 9, 11, 13)),  # the paper's rule: every other from the 5th
        ("resnet18", {}, (2, 4, 6)),
        ("resnet34", {}, (5, 7, 9, 11, 13, 15)),
        ("vit_cifar", {"depth": None}, (2, 3, 4, 5, 6)),  # paper: ICs after layers 2..6, final head after 7
        ("vit_cifar", {}, (2,)),
        ("efficientnet_b0", {}, (2, 4, 6, 8, 10, 12, 14)),
        ("resnet20", {"exits": (1, 8)}, (1, 8)),
        ("resnet20", {"exit_every": 3}, (3, 6)),
        ("resnet20", {"exit_every": 3, "exit_start": 1}, (1, 4, 7)),
    ],
)
def test_ic_placement(name: str, overrides: dict, expected: tuple[int, ...]) -> None:
    net = _built(name) if not overrides else create_net(small_spec(name, **overrides))
    assert net.ic_blocks == expected
    assert len(net.ics) == len(expected)


def test_vit_cifar_is_the_paper_config() -> None:
    net = create_net(NetSpec(backbone="vit_cifar", num_classes=10, img_size=32))
    vit = net.backbone.vit
    assert vit.patch_embed.patch_size == (4, 4)
    assert vit.embed_dim == 256 and len(vit.blocks) == 7 and vit.blocks[0].attn.num_heads == 8


def test_small_input_stem_is_chosen_by_image_size() -> None:
    assert create_net(NetSpec(backbone="resnet18", num_classes=10, img_size=32)).backbone.stem[0].stride == (1, 1)
    big = create_net(NetSpec(backbone="resnet18", num_classes=10, img_size=96))
    assert big.backbone.stem[0].stride == (2, 2)
    assert isinstance(big.backbone.stem[3], nn.MaxPool2d)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (NetSpec(backbone="resnet999", num_classes=10), "backbone"),
        (small_spec("resnet20", exits=(9,)), "exits"),
        (small_spec("resnet20", exits=(0, 2)), "exits"),
        (small_spec("resnet20", exits=(4, 2)), "exits"),
        (small_spec("vit_cifar", exits=(3,)), "exits"),  # depth 3: the last block is the final head's
        (small_spec("resnet20", exits=(2,), exit_every=2), "exits"),
        (small_spec("resnet20", exit_every=0), "exit_every"),
        (small_spec("resnet20", exit_start=3), "exit_every"),
        (small_spec("resnet20", exit_every=2, exit_start=9), "exit_start"),
        (small_spec("resnet20", num_classes=1), "num_classes"),
        (small_spec("resnet20", in_chans=0), "in_chans"),
        (small_spec("resnet20", img_size=2), "img_size"),
        (small_spec("resnet20", depth=10), "depth"),
        (small_spec("resnet18", small_input=False), "img_size"),  # 8 px through a 32x-downsampling stem
        (small_spec("efficientnet_b0", img_size=8), "img_size"),
        (small_spec("vit_cifar", img_size=6), "img_size"),  # patch 4 does not tile 6 px
        (small_spec("vit_cifar", img_size=2), "img_size"),
        (small_spec("vit_cifar", width=20), "width"),  # 8 heads do not divide 20
        (small_spec("resnet18", width=8), "width"),
        (small_spec("efficientnet_b0", depth=4), "depth"),
        (small_spec("resnet20", head="conv"), "head"),
        (small_spec("resnet20", head="mlp"), "head_hidden"),  # an MLP head needs its hidden widths
        (small_spec("resnet20", head_hidden=(16,)), "head_hidden"),  # hidden layers belong to MLP heads only
        (small_spec("vit_cifar", head="mlp", head_hidden=(16, 0)), "head_hidden"),
        (small_spec("vit_cifar", head="sdn"), "head"),
        (small_spec("resnet20", head_norm=True), "head_norm"),
        (small_spec("resnet20", method="l2w"), "method"),  # a loss weighting (phases.P2.loss_weighting), not a method
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_specs_name_the_field(spec: NetSpec, field: str) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        create_net(spec)


@pytest.mark.parametrize(("backbone", "hidden"), [("resnet20", (32,)), ("vit_cifar", (32, 16))])
def test_mlp_heads_with_one_or_two_hidden_layers(backbone: str, hidden: tuple[int, ...]) -> None:
    """The paper's Table 2 heads: hidden layers of the given widths before each IC's classifier."""
    from exitflow.stages.core.flops import exit_flops
    from exitflow.stages.core.nets.heads import MLPHead

    net = create_net(small_spec(backbone, head="mlp", head_hidden=hidden))
    assert all(isinstance(ic, MLPHead) for ic in net.ics)
    widths = [m.out_features for m in net.ics[0].mlp if isinstance(m, torch.nn.Linear)]
    assert widths == [*hidden, NUM_CLASSES]
    with torch.no_grad():
        out = net.eval()(images(net.spec))
    assert [o.shape for o in out] == [(2, NUM_CLASSES)] * net.num_exits
    plain = create_net(small_spec(backbone, head="linear"))
    assert exit_flops(net)[0] > exit_flops(plain)[0]  # the hidden layers cost FLOPs at every IC


def test_linear_head_on_conv_features() -> None:
    net = create_net(small_spec("resnet20", head="linear", head_norm=True))
    with torch.no_grad():
        out = net.eval()(images(net.spec))
    assert [o.shape for o in out] == [(2, NUM_CLASSES)] * net.num_exits


@pytest.fixture
def ensemble() -> Iterator[ExitMethod]:
    """A toy method, registered for one test: every exit emits the mean of the raw logits so far."""
    class ToyEnsemble(ExitMethod):
        name = "toy_ensemble"
        independent = False

        def combine(self, net: Any, raw: Sequence[torch.Tensor]) -> torch.Tensor:
            return torch.stack(list(raw)).mean(0)

    toy = register_method(ToyEnsemble())
    yield toy
    METHODS.unregister(toy.name)


def test_a_registered_method_runs_through_the_net_and_evaluation(ensemble: ExitMethod) -> None:
    from exitflow.stages.core.evaluation import collect_logits, fixed_exit_accuracy, threshold_curve

    spec = NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exits=(3, 6), width=8)
    torch.manual_seed(0)
    sdn = create_net(spec).eval()
    torch.manual_seed(0)
    toy = create_net(replace(spec, method="toy_ensemble")).eval()
    toy.load_state_dict(sdn.state_dict())  # same weights: only the method differs
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        raw, out = sdn(x), toy(x)
        for k in range(toy.num_exits):
            torch.testing.assert_close(out[k], torch.stack(raw[: k + 1]).mean(0))
            torch.testing.assert_close(toy.forward_until(x, k), out[k])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(5)), batch_size=2)
    logits, labels = collect_logits(toy, loader, "cpu")
    torch.testing.assert_close(logits, torch.stack(out))
    curve = threshold_curve(logits, labels, [1.0, 2.0, 3.0], "max_softmax", num_thresholds=5)
    assert curve["accuracy"][-1] == pytest.approx(float(fixed_exit_accuracy(logits, labels)[-1]))


def test_an_unknown_method_is_refused_by_the_spec_and_the_registry() -> None:
    from exitflow.pipeline.spec import SpecError, load_spec

    with pytest.raises(SpecError, match="unknown method 'nope'"):
        load_spec(None, ["net.method=nope"])
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        create_net(NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, method="nope"))


@pytest.fixture
def final_only() -> Iterator[ExitMethod]:
    """A toy method with its own loss: only the final exit is trained, the ICs' losses count for nothing."""
    class FinalOnly(ExitMethod):
        name = "toy_final_only"

        def losses(self, logits: Sequence[torch.Tensor], target: torch.Tensor, loss_fn: Any) -> list[torch.Tensor]:
            return [loss_fn(z, target) * 0.0 for z in logits[:-1]] + [loss_fn(logits[-1], target)]

    toy = register_method(FinalOnly())
    yield toy
    METHODS.unregister(toy.name)


def test_a_registered_method_brings_its_own_loss_into_training(final_only: ExitMethod) -> None:
    from exitflow.stages.core.regimes import exit_weights, phase_loss, prepare_phase

    net = create_net(NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exits=(3, 6), width=8,
                             method="toy_final_only"))
    prepare_phase(net, "P2")
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    loss, per_exit = phase_loss(net(x), y, "P2", exit_weights("uniform", net.num_exits), nn.CrossEntropyLoss(),
                                net.method.losses)
    loss.backward()
    assert per_exit[:-1].abs().sum() == 0 and per_exit[-1] > 0  # what the method says each exit costs
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.ics.parameters())  # the ICs learn nothing
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.backbone.parameters())


def test_pabee_trains_the_depth_weighted_average_of_its_exits_losses() -> None:
    """PABEE's loss (Zhou et al. 2020): sum_j j * L_j / sum_j j over exits j = 1..E in P2; P1 stays the
    plain final-exit loss; per-exit losses are logged unweighted."""
    from exitflow.stages.core.regimes import exit_weights, phase_loss

    net = create_net(NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exits=(2, 4, 6), width=8,
                             method="pabee"))
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    ce = nn.CrossEntropyLoss()
    logits = net(x)
    plain = torch.stack([ce(z, y) for z in logits])
    e = net.num_exits
    weights = exit_weights("uniform", e, method=net.method)
    loss, per_exit = phase_loss(logits, y, "P2", weights, ce, net.method.losses)
    j = torch.arange(1, e + 1, dtype=torch.float32)
    assert loss.item() == pytest.approx(((j * plain).sum() / j.sum()).item(), rel=1e-6)
    assert torch.allclose(per_exit, plain.detach())
    p1, _ = phase_loss(logits, y, "P1", weights, ce, net.method.losses)
    assert p1.item() == pytest.approx(plain[-1].item(), rel=1e-6)
    # the method's weights multiply the phase's own: Han's linear weights times the depth weights
    han = exit_weights("han", e, method=net.method)
    assert torch.allclose(han, exit_weights("han", e) * j * e / j.sum())
    sdn = create_net(NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exits=(2, 4, 6), width=8))
    assert exit_weights("uniform", e, method=sdn.method).eq(1).all()  # SDN has no weights of its own


def test_vit_base_is_vit_b16() -> None:
    """At 224 px: 196 patches of 16, 768 wide, 12 blocks, 12 heads: timm's ViT-B/16 backbone (86.6M
    parameters with its 1000-class head)."""
    net = create_net(NetSpec(backbone="vit_base", num_classes=1000, in_chans=3, img_size=224, exits=(6,)))
    backbone = sum(p.numel() for p in net.backbone.parameters())
    assert 86_000_000 < backbone < 87_000_000, backbone
    assert net(torch.zeros(1, 3, 224, 224))[-1].shape == (1, 1000)
