"""GPF (`net.method: gpf`): the past-future aggregation, its imitation loss, where gradients flow, its FLOPs.

The whole-study run (every regime to a curve and a budget table) is in test_methods.py.
"""

from __future__ import annotations

import math

import pytest

import torch
import torch.nn.functional as F

from exitflow.stages.core.data import make_loader
from exitflow.stages.core.flops import exit_flops, piece_flops
from exitflow.stages.core.loop import PhaseConfig, fit_phase, seed_everything
from exitflow.stages.core.nets import NetSpec, create_net
from exitflow.stages.core.nets.gpf import STATE_WIDTH, PastFutureAggregator, StateHead
from exitflow.stages.core.nets.start import backbone_weights
from exitflow.stages.core.regimes import exit_weights, phase_loss, prepare_phase, set_train_mode

SPEC = NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exits=(2, 4, 6), width=8, method="gpf")
E, C = 4, 10


def _by_hand(agg: PastFutureAggregator, states: list[torch.Tensor], k: int) -> torch.Tensor:
    """Exit k's logits sample by sample, from the documented formula with explicit sums."""
    rows = []
    for n in range(states[0].shape[0]):
        s = [st[n] for st in states]
        past = sum(agg.project_weight[i] @ s[i] + agg.project_bias[i] for i in range(k + 1))
        gate = sum(agg.gate_weight[i] @ s[i] + agg.gate_bias[i] for i in range(k + 1)) / (k + 1)
        a = torch.sigmoid(agg.balance.weight @ torch.relu(gate) + agg.balance.bias)
        future = torch.zeros(C, dtype=torch.float64)
        for j in range(k + 1, agg.num_ics):
            guess = torch.relu(agg.imitators[j - 1][0].weight @ s[k] + agg.imitators[j - 1][0].bias)
            future = future + agg.project_weight[j] @ guess + agg.project_bias[j]
        rows.append(a * past + (1 - a) * future)
    return torch.stack(rows)


def test_the_aggregated_state_has_its_documented_shape_and_equals_a_hand_computation() -> None:
    torch.manual_seed(0)
    agg = PastFutureAggregator(E, C).double()
    states = [torch.rand(5, STATE_WIDTH, dtype=torch.float64) for _ in range(E - 1)]
    final = torch.randn(5, C, dtype=torch.float64)
    assert len(agg.imitators) == E - 2  # one per IC that has an IC before it
    for k in range(E - 1):
        out = agg(states[: k + 1])
        assert out.shape == (5, C)
        torch.testing.assert_close(out, _by_hand(agg, states, k))
        assert [f.shape for f in agg.futures(states[k], k)] == [(5, STATE_WIDTH)] * (E - 2 - k)
    assert agg([*states, final]) is final  # the final exit is the backbone's head alone


def test_the_imitation_loss_is_the_mean_cosine_distance_to_the_later_states() -> None:
    torch.manual_seed(1)
    agg = PastFutureAggregator(E, C).double()
    states = [torch.rand(6, STATE_WIDTH, dtype=torch.float64) for _ in range(E - 1)]
    per_ic = []
    for k in range(E - 2):
        d = [1 - F.cosine_similarity(f, states[j], dim=-1) for j, f in zip(range(k + 1, E - 1), agg.futures(states[k], k))]
        per_ic.append(torch.cat(d).mean())
    torch.testing.assert_close(agg.imitation_loss(states), torch.stack(per_ic).mean())
    # a cosine distance: the scale of an imitated state does not count (the last IC's, imitated and imitating nothing)
    scaled = [*states[:-1], 3.0 * states[-1]]
    torch.testing.assert_close(agg.imitation_loss(scaled), agg.imitation_loss(states))


def test_the_ics_give_states_and_only_a_training_pass_leaves_an_imitation_loss() -> None:
    net = create_net(SPEC)
    assert all(isinstance(ic, StateHead) for ic in net.ics)
    x = torch.randn(3, 1, 8, 8)
    net.eval()
    with torch.no_grad():
        raw = net.raw_exits(x)
        assert [tuple(r.shape) for r in raw] == [(3, STATE_WIDTH)] * 3 + [(3, C)]
        assert (torch.stack(raw[:-1]) >= 0).all()  # ReLU states
        assert [tuple(z.shape) for z in net(x)] == [(3, C)] * E
        torch.testing.assert_close(torch.stack(net(x)), torch.stack([net.forward_until(x, k) for k in range(E)]))
    assert net.method.aux_loss(net) is None
    net.train()
    net(x)
    loss = net.method.aux_loss(net)
    assert loss is not None and loss.requires_grad and float(loss.detach()) > 0
    assert net.method.aux_loss(net) is None  # taken once


def _grads(net: torch.nn.Module, prefix: str) -> dict[str, bool]:
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in net.named_parameters() if n.startswith(prefix)}


def test_p3_sends_no_gradient_into_the_backbone_and_each_ic_trains_only_itself_and_the_aggregator() -> None:
    """P3 (the disjoint regime's IC phase): the phase loss plus the imitation loss reach every IC and
    the whole aggregator, and nothing of the backbone. Exit k's loss alone reaches IC k and no
    earlier IC (their states enter detached)."""
    seed_everything(0)
    net = create_net(SPEC)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, C, (16,))
    prepare_phase(net, "P3")
    set_train_mode(net, "P3")
    logits = net(x)
    loss, _ = phase_loss(logits, y, "P3", exit_weights("uniform", E), torch.nn.CrossEntropyLoss())
    (loss + net.method.aux_loss(net)).backward()
    assert not any(p.grad is not None for p in net.backbone.parameters())
    # every IC (an SDN head's max/avg mix has no gradient where its pooling is the identity, at 4x4 maps)
    assert all(any(_grads(net, f"ics.{i}.").values()) for i in range(E - 1))
    assert all(_grads(net, "aggregator.").values())
    for k in range(E - 1):
        net.zero_grad(set_to_none=True)
        net.train()
        F.cross_entropy(net(x)[k], y).backward()
        net.aggregator.take_imitation_loss()
        reached = {i for i in range(E - 1) if any(_grads(net, f"ics.{i}.").values())}
        assert reached == {k}, k
        assert not any(p.grad is not None for p in net.backbone.parameters())


def test_the_imitation_loss_trains_the_imitating_ics_and_the_imitators_not_the_imitated() -> None:
    net = create_net(SPEC)
    prepare_phase(net, "P2")
    net.train()
    net(torch.randn(8, 1, 8, 8))
    net.method.aux_loss(net).backward()
    assert all(_grads(net, "aggregator.imitators.").values())
    assert any(_grads(net, "ics.0.").values()) and any(_grads(net, "ics.1.").values())
    assert not any(_grads(net, "ics.2.").values())  # the last IC imitates nothing; its state is a detached target
    assert not any(_grads(net, "aggregator.project").values())  # the loss compares states, not logits


def test_the_aggregator_trains_with_the_ics_in_p2_and_p3_never_in_p1() -> None:
    net = create_net(SPEC)
    aggregator = {id(p) for p in net.aggregator.parameters()}
    for phase, trained in (("P1", False), ("P2", True), ("P3", True)):
        params = {id(p) for p in prepare_phase(net, phase)}
        assert (aggregator <= params) is trained and (not aggregator & params) is (not trained), phase


def test_each_exit_pays_for_its_ics_states_and_every_aggregation_on_the_way() -> None:
    """The aggregation at IC k: k + 1 projections and gate projections (W x C each), one imitator
    (W x W) and one projection per later IC, the balance (C x C); exit k pays for those of ICs 0..k."""
    gpf, sdn = piece_flops(create_net(SPEC)), piece_flops(create_net(NetSpec(**{**SPEC.__dict__, "method": "sdn"})))
    w = STATE_WIDTH
    by_hand = [2 * (k + 1) * w * C + (E - 2 - k) * (w * w + w * C) + C * C for k in range(E - 1)] + [0]
    assert gpf.combine == tuple(by_hand)
    assert gpf.stem == sdn.stem and gpf.blocks == sdn.blocks and gpf.head == sdn.head
    costs = exit_flops(create_net(SPEC))
    for k, block in enumerate(SPEC.exits):
        assert costs[k] == gpf.stem + sum(gpf.blocks[:block]) + sum(gpf.ics[: k + 1]) + sum(by_hand[: k + 1])
    assert costs[-1] == gpf.backbone + sum(gpf.ics) + sum(by_hand)


def test_a_gpf_checkpoint_starts_a_backbone_leaving_its_ics_and_aggregator() -> None:
    net = create_net(SPEC)
    weights = backbone_weights(create_net(SPEC), net.state_dict())
    assert set(weights) == {k for k in net.state_dict() if k.startswith("backbone.")}


def test_a_digits_phase_learns_its_exits_and_its_imitations(digits) -> None:  # noqa: ANN001
    """P2 on digits, 3 epochs: every exit beats chance by far, and the imitation loss on the
    validation split falls below the fresh net's."""
    train = make_loader(digits.train, 64, shuffle=True, seed=0)
    val = make_loader(digits.val, 256, shuffle=False, seed=0)
    seed_everything(0)
    net = create_net(SPEC)

    def imitation() -> float:
        net.eval()
        with torch.no_grad():
            return float(sum(net.aggregator.imitation_loss(net.raw_exits(x)[:-1]) for x, _ in val) / len(val))

    before = imitation()
    cfg = PhaseConfig(optimizer="adam", lr=3e-3, batch_size=64, max_epochs=3, patience=4, selection="mean")
    result = fit_phase(net, "P2", cfg, train, val, "cpu")
    net.load_state_dict(result.best_state_dict)
    assert not result.diverged and math.isfinite(result.history[-1]["train_loss"])
    assert min(result.best_val[f"val_acc_{k}"] for k in range(E)) > 0.5
    assert imitation() < 0.5 * before


@pytest.mark.parametrize("phase", ["P2", "P3"])
def test_the_ic_phases_train_under_ddp_every_aggregator_parameter_getting_a_gradient(digits, process_group, phase) -> None:  # noqa: ANN001
    """DDP (no find_unused_parameters) needs a gradient for every parameter it registered, on every
    step: GPF's aggregator has none that a step leaves out (IC 0 gets no imitator for that reason),
    so a phase of many steps runs, and it moves every aggregator tensor."""
    from torch.nn.parallel import DistributedDataParallel

    seed_everything(0)
    net = create_net(SPEC)
    before = {k: v.clone() for k, v in net.aggregator.state_dict().items()}
    prepare_phase(net, phase)
    ddp = DistributedDataParallel(net)
    cfg = PhaseConfig(optimizer="adam", lr=3e-3, batch_size=64, max_epochs=1, patience=4)
    result = fit_phase(ddp, phase, cfg, make_loader(digits.train, 64, shuffle=True, seed=0),
                       make_loader(digits.val, 256, shuffle=False, seed=0), "cpu")
    assert result.epochs_run == 1 and not result.diverged
    after = net.aggregator.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
