"""Phase semantics: which parameters and buffers each phase may change, weights and losses."""

from __future__ import annotations


import pytest
import torch
from torch import Tensor, nn

from exitflow.stages.core.loop import PhaseConfig, build_optimizer
from exitflow.stages.core.nets import create_net
from exitflow.stages.core.nets.spec import NetSpec
from exitflow.stages.core.regimes import (
    PHASES,
    REGIME_PHASES,
    exit_weights,
    phase_loss,
    prepare_phase,
    set_train_mode,
    unwrap,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SPEC = NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exits=(3, 6), width=8)


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return create_net(SPEC)


@pytest.fixture
def batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer (BatchNorm running stats and counters included), cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _unchanged(before: dict[str, Tensor], module: nn.Module) -> bool:
    return all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def _one_step(net: nn.Module, phase: str, batch: tuple[Tensor, Tensor]) -> torch.optim.Optimizer:
    params = prepare_phase(net, phase)
    optimizer = build_optimizer(params, PhaseConfig(optimizer="sgd", lr=0.1, weight_decay=1e-4))
    set_train_mode(net, phase)
    x, y = batch
    loss, _ = phase_loss(net(x), y, phase, exit_weights("uniform", net.num_exits), nn.CrossEntropyLoss())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return optimizer


def _optimizer_params(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_regimes_map_to_paper_phases() -> None:
    assert REGIME_PHASES == {"joint": ("P2",), "disjoint": ("P1", "P3"), "mixed": ("P1", "P2")}
    assert PHASES == ("P1", "P2", "P3")


@pytest.mark.parametrize(
    ("phase", "backbone_trains", "ics_train"),
    [("P1", True, False), ("P2", True, True), ("P3", False, True)],
)
def test_prepare_phase_sets_requires_grad_and_optimizer_holds_exactly_the_trainable(
    net: nn.Module, phase: str, backbone_trains: bool, ics_train: bool
) -> None:
    params = prepare_phase(net, phase)
    assert all(p.requires_grad is backbone_trains for p in net.backbone.parameters())
    assert all(p.requires_grad is ics_train for p in net.ics.parameters())
    expected = {id(p) for p in net.parameters() if p.requires_grad}
    assert {id(p) for p in params} == expected and len(params) == len(expected)
    assert _optimizer_params(build_optimizer(params, PhaseConfig())) == expected


def test_prepare_phase_accepts_wrapped_nets(net: nn.Module) -> None:
    wrapped = torch.compile(nn.DataParallel(net))  # compile is lazy: nothing compiles here
    assert unwrap(wrapped) is net
    params = prepare_phase(wrapped, "P3")
    assert {id(p) for p in params} == {id(p) for p in net.ics.parameters()}


def test_set_train_mode_keeps_frozen_backbone_in_eval(net: nn.Module) -> None:
    set_train_mode(net, "P3")
    assert not any(m.training for m in net.backbone.modules())
    assert all(m.training for m in net.ics.modules())
    for phase in ("P1", "P2"):
        set_train_mode(net, phase)
        assert all(m.training for m in net.modules())


def test_p3_step_leaves_backbone_and_batchnorm_stats_bit_identical(net: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.backbone.modules())
    backbone, ics = _snapshot(net.backbone), _snapshot(net.ics)
    _one_step(net, "P3", batch)
    assert _unchanged(backbone, net.backbone)  # weights, running_mean/var, num_batches_tracked
    assert all(p.grad is None for p in net.backbone.parameters())
    for k, ic in enumerate(net.ics):
        changed = [not torch.equal(ics[f"{k}.{name}"], p) for name, p in ic.named_parameters()]
        assert any(changed), f"IC {k} did not move"


def test_p1_step_leaves_ics_untouched(net: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    backbone, ics = _snapshot(net.backbone), _snapshot(net.ics)
    _one_step(net, "P1", batch)
    assert _unchanged(ics, net.ics)
    assert all(p.grad is None for p in net.ics.parameters())
    assert not _unchanged(backbone, net.backbone)
    # The final classifier is a backbone parameter: P1 trains it.
    final_out = [p for p in net.backbone.parameters() if p.shape[:1] == (SPEC.num_classes,)]
    assert final_out and all(p.grad is not None for p in final_out)


def test_p2_step_changes_backbone_and_every_ic(net: nn.Module, batch: tuple[Tensor, Tensor]) -> None:
    backbone, ics = _snapshot(net.backbone), _snapshot(net.ics)
    _one_step(net, "P2", batch)
    assert not _unchanged(backbone, net.backbone)
    for k, ic in enumerate(net.ics):
        assert any(not torch.equal(ics[f"{k}.{name}"], p) for name, p in ic.named_parameters())


def test_exit_weights_values() -> None:
    assert torch.equal(exit_weights("uniform", 4), torch.ones(4))
    assert torch.equal(exit_weights("gradient_equilibrium", 4), torch.ones(4))
    assert torch.allclose(exit_weights("han", 3), torch.tensor([0.6, 1.0, 1.4]))
    han = exit_weights("han", 7)
    assert han[0].item() == pytest.approx(0.6) and han[-1].item() == pytest.approx(1.4)
    assert han.mean().item() == pytest.approx(1.0)
    # Kaya (SDN): ICs ramp from 0.01 to caps at their relative depth; the final exit stays at 1.
    assert torch.allclose(exit_weights("kaya", 3, progress=0.0), torch.tensor([0.01, 0.01, 1.0]))
    assert torch.allclose(exit_weights("kaya", 3, progress=1.0), torch.tensor([0.45, 0.9, 1.0]))
    assert torch.allclose(exit_weights("kaya", 7, progress=1.0)[:-1], torch.tensor([0.15, 0.3, 0.45, 0.6, 0.75, 0.9]))
    half = exit_weights("kaya", 3, progress=0.5)
    assert torch.allclose(half, torch.tensor([0.01 + 0.225, 0.01 + 0.45, 1.0]))
    assert exit_weights("kaya", 1).tolist() == [1.0]
    # Han's weights in the other direction (the paper's Fig. 15): 1.4 at the first exit down to 0.6
    assert torch.allclose(exit_weights("han_decreasing", 3), torch.tensor([1.4, 1.0, 0.6]))
    assert torch.equal(exit_weights("han_decreasing", 7), exit_weights("han", 7).flip(0))
    with pytest.raises(ValueError, match="unknown loss weighting"):
        exit_weights("bogus", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="progress"):
        exit_weights("kaya", 3, progress=1.5)


@pytest.mark.parametrize(("phase", "in_loss"), [("P1", [2]), ("P2", [0, 1, 2]), ("P3", [0, 1])])
def test_phase_loss_uses_the_right_exits(phase: str, in_loss: list[int]) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 4, generator=gen, requires_grad=True) for _ in range(3)]
    target = torch.randint(0, 4, (5,), generator=gen)
    weights = torch.tensor([0.5, 2.0, 3.0])
    loss_fn = nn.CrossEntropyLoss()
    loss, per_exit = phase_loss(logits, target, phase, weights, loss_fn)
    singles = torch.stack([loss_fn(z, target) for z in logits]).detach()
    assert torch.allclose(per_exit, singles) and not per_exit.requires_grad
    # the default reduction: P2's and P3's weighted sums over the number of exits (3, in P3 too)
    expected = singles[-1] if phase == "P1" else sum(weights[k] * singles[k] for k in in_loss) / 3
    assert torch.allclose(loss.detach(), expected)
    loss.backward()
    for k, z in enumerate(logits):
        assert (z.grad is not None) is (k in in_loss), f"exit {k} in {phase}"


def test_phase_loss_checks_weights_and_phase() -> None:
    logits, target = [torch.zeros(2, 3)] * 2, torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="weights"):
        phase_loss(logits, target, "P2", torch.ones(3), nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="unknown phase"):
        phase_loss(logits, target, "P4", torch.ones(2), nn.CrossEntropyLoss())  # type: ignore[arg-type]


WEIGHTINGS = ["uniform", "kaya", "han", "han_decreasing", "gradient_equilibrium", "l2w"]


@pytest.mark.parametrize("phase", ["P2", "P3"])
@pytest.mark.parametrize("kind", WEIGHTINGS)
def test_the_mean_reduction_is_the_sum_over_the_number_of_exits(kind: str, phase: str) -> None:
    """The paper's code averages the exit losses (1/E, in P3 too): the mean reduction's loss and
    its gradient on every exit's logits are the plain weighted sum's divided by E, for every weighting."""
    gen = torch.Generator().manual_seed(3)
    raw = [torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(4)]
    target = torch.randint(0, 5, (6,), generator=gen)
    weights = exit_weights(kind, 4, progress=0.5).double()  # type: ignore[arg-type]

    def loss_and_grads(reduction: str) -> tuple[Tensor, list[Tensor]]:
        logits = [z.clone().requires_grad_(True) for z in raw]
        loss, _ = phase_loss(logits, target, phase, weights, nn.CrossEntropyLoss(), reduction=reduction)  # type: ignore[arg-type]
        loss.backward()
        return loss.detach(), [torch.zeros_like(z) if z.grad is None else z.grad for z in logits]

    mean, mean_grads = loss_and_grads("mean")
    total, sum_grads = loss_and_grads("sum")
    ce = [nn.functional.cross_entropy(z, target) for z in raw]
    used = range(4) if phase == "P2" else range(3)
    by_hand = sum(float(weights[k]) * float(ce[k]) for k in used)  # the weighted sum, written out
    assert float(total) == pytest.approx(by_hand, rel=1e-12)
    assert float(mean) == pytest.approx(by_hand / 4, rel=1e-12)  # / E = 4 exits, the frozen final one counted in P3
    for g_mean, g_sum in zip(mean_grads, sum_grads):
        assert torch.allclose(g_mean, g_sum / 4, rtol=1e-12, atol=0.0)
    if phase == "P3":
        assert not mean_grads[-1].any()  # the frozen final exit's loss is not in P3's objective


def test_a_loss_reduction_must_be_known() -> None:
    logits, target = [torch.zeros(2, 3)] * 2, torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown loss reduction"):
        phase_loss(logits, target, "P2", torch.ones(2), nn.CrossEntropyLoss(), reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss_reduction"):
        PhaseConfig(loss_reduction="max")  # type: ignore[arg-type]


def test_gpf_trains_the_paper_codes_depth_weighted_average_plus_its_imitation_loss() -> None:
    """GPF's loss in the paper's code: sum_i (i + 1) L_i / (E (E + 1) / 2) over the E outputs, plus the
    imitation loss, unweighted; exitflow's is the depth weights with the phase's mean reduction."""
    torch.manual_seed(0)
    net = create_net(NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exits=(2, 4, 6), width=8,
                             method="gpf"))
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    prepare_phase(net, "P2")
    set_train_mode(net, "P2")
    ce = nn.CrossEntropyLoss()
    logits = net(x)
    imitation = net.method.aux_loss(net)
    assert imitation is not None and imitation.item() > 0
    e = net.num_exits
    loss, _ = phase_loss(logits, y, "P2", exit_weights("uniform", e, method=net.method), ce, net.method.losses)
    their = sum((i + 1) * ce(z, y) for i, z in enumerate(logits)) / (e * (e + 1) / 2)
    assert (loss + imitation).item() == pytest.approx((their + imitation).item(), rel=1e-6)
