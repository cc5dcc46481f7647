"""ZTW (`net.method: ztw`): cascading ICs and the geometric ensemble, against hand computations.

The whole-study run (every regime, curve and budget table) is in test_methods.py; dynamic
inference on a trained ZTW net taking the simulated exits is in test_inference.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from exitflow.stages.core.data import DataSpec, load_splits, make_loader
from exitflow.stages.core.evaluation import exit_criterion, exit_indices
from exitflow.stages.core.loop import PhaseConfig, fit_phase, seed_everything
from exitflow.stages.core.nets import NetSpec, create_net
from exitflow.stages.core.nets.start import backbone_weights
from exitflow.stages.core.nets.ztw import CascadeHead, GeometricEnsemble, ensemble_nll, fit_ensemble
from exitflow.stages.core.regimes import prepare_phase
from exitflow.stages.core.state_hash import state_dict_hash

SPEC = NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exits=(2, 4, 6), width=8, method="ztw")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_the_ensemble_is_the_weighted_product_of_the_ics_probabilities_by_hand() -> None:
    """q_m ∝ exp(beta_m) * prod_{i<=m} p_i ** w_mi, computed in probability space on fixed logits;
    the final exit is the backbone's head alone."""
    ens = GeometricEnsemble(num_exits=4, num_classes=3)
    w = np.array([[2.0, 0, 0], [0.5, 1.5, 0], [0.25, 1.0, 3.0]])
    beta = np.array([[0.0, 0.1, -0.2], [0.3, 0.0, 0.0], [-1.0, 0.5, 0.2]])
    with torch.no_grad():
        ens.log_weights.copy_(torch.tensor(np.log(np.where(w > 0, w, 1.0))))
        ens.bias.copy_(torch.tensor(beta))
    raw = [torch.tensor([[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]]), torch.tensor([[0.2, 0.1, 0.0], [2.0, -2.0, 1.0]]),
           torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.5]]), torch.tensor([[9.0, 8.0, 7.0], [1.0, 2.0, 3.0]])]
    p = [_softmax(r.numpy().astype(np.float64)) for r in raw]
    for m in range(3):
        product = np.exp(beta[m]) * np.prod([p[i] ** w[m, i] for i in range(m + 1)], axis=0)
        expected = product / product.sum(-1, keepdims=True)
        got = torch.softmax(ens(raw[: m + 1]).double(), -1).detach().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=f"IC {m}")
    assert torch.equal(ens(raw), raw[-1])
    # at its start the ensemble is the plain product of the ICs' probabilities
    fresh = GeometricEnsemble(num_exits=4, num_classes=3)
    product = p[0] * p[1]
    np.testing.assert_allclose(torch.softmax(fresh(raw[:2]).double(), -1).detach().numpy(), product / product.sum(-1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_exit_rule_on_the_ensemble_matches_a_per_sample_reference(seed: int) -> None:
    """Random raw logits through a random ensemble: the vectorised exits (evaluation's) equal a loop
    that, sample by sample, builds each IC's ensemble and leaves at the first whose max softmax passes."""
    g = torch.Generator().manual_seed(seed)
    e, n, c = 5, 300, 7
    ens = GeometricEnsemble(e, c)
    with torch.no_grad():
        ens.log_weights.copy_(torch.randn(e - 1, e - 1, generator=g))
        ens.bias.copy_(torch.randn(e - 1, c, generator=g))
    raw = [torch.randn(n, c, generator=g) * 3 for _ in range(e)]
    with torch.no_grad():
        logits = torch.stack([ens(raw[: k + 1]) for k in range(e)])
    for t in (0.3, 0.6, 0.9):
        vectorised = exit_indices(exit_criterion(logits, "max_softmax"), np.array([t]), "max_softmax")[0]
        for s in range(n):
            taken = e - 1
            for m in range(e - 1):
                with torch.no_grad():
                    q = torch.softmax(ens([r[s : s + 1] for r in raw[: m + 1]]).double(), -1)
                if q.max().item() > t:
                    taken = m
                    break
            assert vectorised[s] == taken, (t, s)
    assert len(set(vectorised.tolist())) > 1  # not vacuous: the samples leave at several exits


def test_the_cascade_head_is_its_features_and_the_layer_normed_previous_logits_through_one_linear_layer_by_hand() -> None:
    """The authors' cascading head (`ZTWCascading`, layer_norm=True, detach=True): the head's last
    linear layer reads [features, LayerNorm(previous logits).detach()]; exitflow's head + cascade map
    is that layer with its weight split in two. No gradient reaches the previous IC through it."""
    feats, classes = 3, 4
    head = nn.Linear(feats, classes)
    cascade = CascadeHead(head, classes)
    w_head = np.array([[0.5, -1.0, 0.25], [1.0, 0.0, -0.5], [-0.25, 0.75, 1.0], [0.0, 0.5, 0.5]])
    b_head = np.array([0.1, -0.2, 0.0, 0.3])
    w_cascade = np.array([[1.0, 0.0, -1.0, 0.5], [0.0, 2.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [-1.0, 0.0, 0.0, 1.0]])
    gamma, beta = np.array([1.0, 0.5, 2.0, -1.0]), np.array([0.0, 0.1, -0.1, 0.2])
    with torch.no_grad():
        head.weight.copy_(torch.tensor(w_head))
        head.bias.copy_(torch.tensor(b_head))
        cascade.cascade.weight.copy_(torch.tensor(w_cascade))
        cascade.norm.weight.copy_(torch.tensor(gamma))
        cascade.norm.bias.copy_(torch.tensor(beta))
    previous_ic = nn.Linear(2, classes)  # the earlier IC: its logits must train it through its own loss alone
    with torch.no_grad():
        previous_ic.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, -2.0], [1.0, 1.0], [-4.0, 0.5]]))
        previous_ic.bias.zero_()
    x_prev = torch.tensor([[1.0, 2.0], [-0.5, 0.25]])
    h = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    previous = previous_ic(x_prev)
    out = cascade(h, previous)

    z = x_prev.numpy().astype(np.float64) @ previous_ic.weight.detach().numpy().T.astype(np.float64)
    normed = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5) * gamma + beta  # biased variance
    expected = np.concatenate([h.numpy(), normed], axis=1) @ np.concatenate([w_head, w_cascade], axis=1).T + b_head
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5, atol=1e-5)

    out.square().sum().backward()
    assert previous_ic.weight.grad is None and previous_ic.bias.grad is None  # detached: nothing reaches the earlier IC
    for name, p in cascade.named_parameters():  # the norm trains with its IC (it comes after the detach)
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cascading_ics_read_the_previous_ic_detached() -> None:
    torch.manual_seed(0)
    net = create_net(SPEC)
    assert not isinstance(net.ics[0], CascadeHead) and all(isinstance(h, CascadeHead) for h in net.ics[1:])
    x = torch.randn(4, 1, 8, 8)
    h2, h4 = net.forward_intermediates(x, [2, 4])
    first = net.ics[0](h2)
    second = net.ics[1](h4, first)
    normed = nn.functional.layer_norm(first, (SPEC.num_classes,), net.ics[1].norm.weight, net.ics[1].norm.bias)
    assert torch.allclose(second, net.ics[1].head(h4) + normed @ net.ics[1].cascade.weight.T, atol=1e-6)
    net.train()
    raw = net(x)  # train mode: the exits' raw outputs, the ones the ICs are trained on
    assert torch.allclose(raw[1], second, atol=1e-6)
    # IC 1's loss reaches IC 1's own head, norm and cascade map, never IC 0 (the connection is detached)
    prepare_phase(net, "P3")
    nn.functional.cross_entropy(raw[1], torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is None for p in net.ics[0].parameters())
    assert net.ics[1].cascade.weight.grad.abs().sum() > 0
    assert net.ics[1].norm.weight.grad.abs().sum() > 0 and net.ics[1].norm.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.backbone.parameters())  # P3: nothing reaches the backbone


def test_the_cascade_norm_belongs_to_its_ic_trained_in_p2_and_p3_not_p1() -> None:
    net = create_net(SPEC)
    norms = {id(p) for ic in net.ics[1:] for p in ic.norm.parameters()}
    assert len(norms) == 2 * (len(net.ics) - 1)
    assert {f"ics.{k}.norm.{w}" for k in range(1, len(net.ics)) for w in ("weight", "bias")} <= set(net.state_dict())
    for phase, trained in (("P1", False), ("P2", True), ("P3", True)):
        ids = {id(p) for p in prepare_phase(net, phase)}
        assert (norms <= ids) is trained and (not norms & ids) is (not trained), phase


def test_eval_mode_gives_the_ensemble_and_forward_until_agrees() -> None:
    torch.manual_seed(0)
    net = create_net(SPEC)
    with torch.no_grad():
        net.ensemble.log_weights.normal_()
        net.ensemble.bias.normal_()
    net.eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        raw = net.raw_exits(x)
        outs = net(x)
        for k in range(net.num_exits):
            assert torch.allclose(outs[k], net.ensemble(raw[: k + 1]), atol=1e-6)
            assert torch.allclose(net.forward_until(x, k), outs[k], atol=1e-5), k
    assert torch.equal(outs[-1], raw[-1])  # the final exit: the backbone's head


def test_no_phase_trains_the_ensemble() -> None:
    net = create_net(SPEC)
    for phase in ("P1", "P2", "P3"):
        trained = {id(p) for p in prepare_phase(net, phase)}
        assert not any(id(p) in trained for p in net.ensemble.parameters()), phase


@pytest.fixture(scope="module")
def digits():  # noqa: ANN201
    splits = load_splits(DataSpec(name="digits", augment=False), seed=0)
    return (make_loader(splits.train, 64, shuffle=True, seed=0), make_loader(splits.val, 256, shuffle=False, seed=0))


def test_fitting_the_ensemble_moves_only_the_ensemble_and_lowers_its_loss(digits) -> None:  # noqa: ANN001
    train, _ = digits
    seed_everything(0)
    net = create_net(SPEC)
    prepare_phase(net, "P2")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = list(train)
    with torch.no_grad():
        raw = [net.eval().raw_exits(x)[:-1] for x, _ in batches]
    log_probs = torch.cat([torch.stack([torch.log_softmax(r, -1) for r in rs], 1) for rs in raw])
    labels = torch.cat([y for _, y in batches])
    start = ensemble_nll(net.ensemble, log_probs, labels).item()
    line = fit_ensemble(net, batches, lambda t: t)
    end = ensemble_nll(net.ensemble, log_probs, labels).item()
    assert end < start and f"{start / len(labels):.4f} -> {end / len(labels):.4f}" in line
    after = net.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"ensemble.log_weights", "ensemble.bias"}
    assert not any(p.requires_grad for p in net.ensemble.parameters())  # frozen again after its step


def test_a_phase_that_trains_the_ics_ends_with_the_fitted_ensemble_and_a_resume_keeps_it(digits) -> None:  # noqa: ANN001
    train, val = digits
    cfg = PhaseConfig(optimizer="adam", lr=3e-3, batch_size=64, max_epochs=2, patience=3, selection="mean")
    seed_everything(0)
    net = create_net(SPEC)
    fresh = state_dict_hash(net.ensemble.state_dict())
    states = []
    p1 = fit_phase(net, "P1", cfg, train, val, "cpu")
    assert state_dict_hash(net.ensemble.state_dict()) == fresh  # P1 trains the plain backbone: no ensemble step
    p3 = fit_phase(net, "P3", cfg, train, val, "cpu", on_epoch=states.append)
    ensemble = {k.removeprefix("ensemble."): v for k, v in p3.best_state_dict.items() if k.startswith("ensemble.")}
    assert state_dict_hash(ensemble) != fresh and state_dict_hash(net.ensemble.state_dict()) == state_dict_hash(ensemble)
    assert states[0].state["best_state_dict"]["ensemble.bias"].abs().sum() == 0  # fitted once, at the last epoch
    assert torch.equal(states[-1].state["best_state_dict"]["ensemble.bias"], p3.best_state_dict["ensemble.bias"])
    # a phase resumed after its last epoch keeps the recorded ensemble: the step does not run again
    again = create_net(SPEC)
    again.load_state_dict(p1.best_state_dict)
    resumed = fit_phase(again, "P3", cfg, train, val, "cpu", resume=states[-1].state)
    assert state_dict_hash(resumed.best_state_dict) == state_dict_hash(p3.best_state_dict)


def test_a_ztw_checkpoint_starts_a_backbone_leaving_its_ics_and_ensemble() -> None:
    net = create_net(SPEC)
    weights = backbone_weights(create_net(SPEC), net.state_dict())
    assert set(weights) == {k for k in net.state_dict() if k.startswith("backbone.")}


def test_cascade_maps_cost_their_multiply_adds() -> None:
    """C x C multiply-adds per cascade map, and its LayerNorm as fvcore counts every LayerNorm (5 per
    element with its affine map; exitflow keeps that count for the ViTs' norms too, test_flops.py)."""
    from exitflow.stages.core.flops import piece_flops

    ztw = piece_flops(create_net(SPEC))
    sdn = piece_flops(create_net(NetSpec(**{**SPEC.__dict__, "method": "sdn"})))
    c = SPEC.num_classes
    assert ztw.ics == (sdn.ics[0], *(f + c * c + 5 * c for f in sdn.ics[1:]))
    assert math.isclose(ztw.stem, sdn.stem) and ztw.blocks == sdn.blocks and ztw.head == sdn.head


def test_a_search_keeps_a_trial_that_fitted_its_ensemble() -> None:
    """ZTW fits its ensemble at a phase's last epoch, which a trial ASHA stopped never reached: such a
    trial cannot be the search's model, however it scored; for a method without that step it can."""
    from exitflow.stages.ray_tune import TrialRecord, choose_trial

    stopped = TrialRecord("t0", 1e-3, best_val=0.95, epochs=2, stopped_by="scheduler", checkpoint_path="a")
    ended = TrialRecord("t1", 3e-3, best_val=0.93, epochs=6, stopped_by="patience", checkpoint_path="b")
    ran_out = TrialRecord("t2", 1e-2, best_val=0.90, epochs=8, stopped_by="", checkpoint_path="c")
    assert choose_trial([stopped, ended, ran_out], finishes=True) is ended
    assert choose_trial([stopped, ended, ran_out], finishes=False) is stopped
    tie = TrialRecord("t3", 1e-4, best_val=0.93, epochs=6, stopped_by="", checkpoint_path="d")
    assert choose_trial([ended, tie], finishes=True) is tie  # ties: the smaller lr
    assert choose_trial([stopped], finishes=True) is stopped  # nothing else to keep
