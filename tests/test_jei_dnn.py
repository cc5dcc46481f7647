"""JEI-DNN (`net.method: jei_dnn`): learned exit gates, their cost-aware targets and their curve.

The whole-study run (every regime, the gates' curve, budget and ECE tables) is in test_methods.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from exitflow.stages.core.data import make_loader
from exitflow.stages.core.evaluation import CRITERIA, calibration_error, collect_logits, curve_at_exits, top_probability
from exitflow.stages.core.loop import PhaseConfig, fit_phase, seed_everything
from exitflow.stages.core.nets import NetSpec, create_net
from exitflow.stages.core.evaluation import equal_mass_calibration_error as equal_mass_ece
from exitflow.stages.core.nets.jei_dnn import LAMBDAS, ExitGates, fit_gates, gate_exits, gate_features, gate_points, gate_targets


def gate_curve_ece(logits: torch.Tensor, labels: torch.Tensor, exits: np.ndarray) -> np.ndarray:
    """The gates curve's `ece_equal_mass`, as the evaluate stage computes it."""
    return curve_at_exits(logits, labels, np.ones(logits.shape[0]), exits, equal_mass=True)["ece_equal_mass"]
from exitflow.stages.core.nets.methods import METHODS, method_curves
from exitflow.stages.core.regimes import prepare_phase

def _gate_curve(net, logits, labels, flops):  # noqa: ANN001, ANN202
    """The gates' curve as the evaluate stage builds it (stages.core.score_model)."""
    points, taken = gate_points(net, logits)
    return {"threshold": points, **curve_at_exits(logits, labels, flops, taken)}


SPEC = NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exits=(2, 4, 6), width=8, method="jei_dnn")


def test_the_gate_targets_follow_the_argmin_of_the_relative_cost_on_a_constructed_example() -> None:
    """C_l = CE_l + lambda * cost_l, l* = argmin (the first on a tie); gate k's target is k >= l*.
    Dyadic numbers, so the tie at lambda = 1 for the first sample is exact."""
    losses = torch.tensor([[2.0, 0.0625, 3.0], [0.75, 0.03125, 3.0], [0.25, 0.015625, 0.0]], dtype=torch.float64)  # [E=3, N=3]
    cost = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64)
    lambdas = torch.tensor([0.0, 1.0, 16.0], dtype=torch.float64)
    best, targets = gate_targets(losses, cost, lambdas)
    # lambda 0: the most accurate exit; lambda 1: sample 0 ties exits 1 and 2 (1.25) -> 1, sample 1 -> IC 0,
    # sample 2 still the final exit (3.25, 3.5, 1.0); lambda 16: everyone at the first IC
    assert best.tolist() == [[2, 2, 2], [1, 0, 2], [0, 0, 0]]
    assert targets.tolist() == [[[0, 0, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 0]], [[1, 1, 1], [1, 1, 1]]]
    # the paper's rule, sample by sample
    for li, lam in enumerate(lambdas.tolist()):
        for n in range(3):
            relative = [losses[l, n].item() + lam * cost[l].item() for l in range(3)]
            assert best[li, n].item() == relative.index(min(relative))


def test_the_gate_features_are_the_softmax_uncertainty_statistics_by_hand() -> None:
    p = np.array([0.5, 0.3, 0.2])
    got = gate_features(torch.tensor(np.log(p)).unsqueeze(0))[0].double().numpy()
    q = p**2 / (p**2).sum()
    expected = [0.5, -(p * np.log(p)).sum(), 0.2, -(q * np.log(q)).sum()]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_gates_exit_rule_and_curve_match_a_per_sample_reference(seed: int) -> None:
    """Random logits through random gates: the vectorised exits and curve equal a loop that, sample by
    sample and lambda by lambda, leaves at the first IC whose gate probability is above 1/2."""
    g = torch.Generator().manual_seed(seed)
    e, n, c = 5, 200, 7
    gates = ExitGates(e, c)
    with torch.no_grad():
        gates.weight.copy_(torch.randn(gates.weight.shape, generator=g))
        gates.bias.copy_(torch.randn(gates.bias.shape, generator=g))
        gates.feature_mean.copy_(torch.randn(gates.feature_mean.shape, generator=g) * 0.1)
        gates.feature_std.copy_(torch.rand(gates.feature_std.shape, generator=g) + 0.5)
    logits = torch.randn(e, n, c, generator=g) * 3
    labels = torch.randint(0, c, (n,), generator=g)
    flops = [10.0, 25.0, 40.0, 70.0, 100.0]

    class Net:  # what gate_points reads of a net
        pass

    net = Net()
    net.gates = gates
    curve = _gate_curve(net, logits, labels, flops)
    assert curve["threshold"].tolist() == pytest.approx(list(LAMBDAS))
    correct = (logits.argmax(-1) == labels).numpy()
    top = top_probability(logits)
    taken_all = []
    for li in range(len(LAMBDAS)):
        taken = []
        for s in range(n):
            exit_ = e - 1
            for k in range(e - 1):
                z = (gate_features(logits[k, s]) - gates.feature_mean[k]) / gates.feature_std[k]
                if torch.sigmoid(z @ gates.weight[li, k] + gates.bias[li, k]).item() > 0.5:
                    exit_ = k
                    break
            taken.append(exit_)
        taken_all += taken
        hit = correct[taken, range(n)]
        assert curve["flops"][li] == pytest.approx(np.mean([flops[t] for t in taken]))
        assert curve["accuracy"][li] == pytest.approx(hit.mean())
        conf = top[taken, range(n)]
        bins = np.minimum((conf * 15).astype(int), 14)
        ece = sum(abs(hit[bins == b].sum() - conf[bins == b].sum()) for b in range(15)) / n
        assert curve["ece"][li] == pytest.approx(ece)
    assert len(set(taken_all)) > 2  # not vacuous: the samples leave at several exits


def test_gate_exits_take_the_first_open_gate_else_the_final_exit() -> None:
    gl = torch.tensor([[[-1.0, 2.0, -0.5], [0.3, -1.0, -0.2], [-2.0, 3.0, -0.1]]])  # [L=1, ICs=3, N=3]
    # sample 0: gate 1 is the first open one; sample 1: gate 0; sample 2: none, so the final exit (3)
    assert gate_exits(gl).tolist() == [[1, 0, 3]]
    assert gate_exits(torch.cat([gl, -gl])).tolist() == [[1, 0, 3], [0, 1, 0]]


def test_no_phase_trains_the_gates_and_the_method_curve_is_no_criterion() -> None:
    net = create_net(SPEC)
    assert net.gates.weight.shape == (len(LAMBDAS), 3, 4)
    for phase in ("P1", "P2", "P3"):
        trained = {id(p) for p in prepare_phase(net, phase)}
        assert not any(id(p) in trained for p in net.gates.parameters()), phase
    assert method_curves(["sdn", "jei_dnn", "ztw", "jei_dnn"]) == ("gates",)
    assert not set(method_curves(METHODS.names())) & set(CRITERIA.names())  # a curve's name never shadows a criterion


def test_a_phase_that_trains_the_ics_ends_with_fitted_gates_that_trade_accuracy_for_cost(digits) -> None:  # noqa: ANN001
    """P2 on digits ends with the gates' step: only `gates.*` moves, the gates are frozen again,
    and a larger lambda sends more samples out early, so the curve's cost falls as lambda grows."""
    train = make_loader(digits.train, 64, shuffle=True, seed=0)
    val = make_loader(digits.val, 256, shuffle=False, seed=0)
    cfg = PhaseConfig(optimizer="adam", lr=3e-3, batch_size=64, max_epochs=3, patience=4, selection="mean")
    seed_everything(0)
    net = create_net(SPEC)
    fresh = {k: v.clone() for k, v in net.gates.state_dict().items()}
    result = fit_phase(net, "P2", cfg, train, val, "cpu")
    fitted = {k.removeprefix("gates."): v for k, v in result.best_state_dict.items() if k.startswith("gates.")}
    assert not torch.equal(fitted["bias"], fresh["bias"]) and not torch.equal(fitted["feature_std"], fresh["feature_std"])
    assert torch.equal(fitted["lambdas"], fresh["lambdas"])
    assert not any(p.requires_grad for p in net.gates.parameters())
    # the step again on the same state moves the gates and nothing else, and lowers its own loss
    before = {k: v.clone() for k, v in net.state_dict().items()}
    line = fit_gates(net, list(train), lambda t: t)
    start, end = (float(v) for v in line.split("BCE ")[1].split(" per sample")[0].split(" -> "))
    assert end < start
    moved = {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}
    assert moved and all(k.startswith("gates.") for k in moved)
    logits, labels = collect_logits(net, val, "cpu")
    from exitflow.stages.core.flops import exit_flops

    flops = exit_flops(net)
    curve = _gate_curve(net, logits, labels, flops)
    assert curve["flops"][-1] < curve["flops"][0]  # lambda 4 leaves earlier than lambda 0
    assert curve["flops"][-1] <= flops[1]  # at the top lambda nearly everyone leaves at an early IC
    assert all(0.0 <= a <= 1.0 for a in curve["accuracy"]) and all(math.isfinite(x) for x in curve["ece"])


def test_a_report_over_methods_gives_the_gates_table_only_the_variants_that_have_gates(tmp_path) -> None:  # noqa: ANN001
    """A comparison of `net.method` (sdn against jei_dnn): the report's criteria include "gates",
    which only the jei_dnn variant's curves hold; its table and ECE rows cover that variant alone."""
    import pyarrow as pa

    from exitflow.stages.core import report

    def curve(names: tuple[str, ...]) -> pa.Table:
        rows = [{"criterion": n, "threshold": t, "flops": f, "accuracy": a, "ece": 0.05}
                for n in names for t, f, a in ((0.0, 30.0, 0.8), (0.5, 60.0, 0.9), (1.0, 100.0, 0.95))]
        return pa.Table.from_pylist(rows)

    exits = pa.table({"exit": [0, 1], "flops": [30.0, 100.0], "accuracy": [0.8, 0.95], "ece": [0.1, 0.05]})
    curves = {("joint net.method=sdn", 0): curve(("max_softmax",)), ("joint net.method=jei_dnn", 0): curve(("max_softmax", "gates"))}
    out = report.run(curves, {k: exits for k in curves}, 100.0, [0.6, 1.0], ["max_softmax", "gates"], tmp_path, "t")
    rows = out.budgets.to_pylist()
    assert {(r["criterion"], r["regime"]) for r in rows} == {
        ("max_softmax", "joint net.method=sdn"), ("max_softmax", "joint net.method=jei_dnn"), ("gates", "joint net.method=jei_dnn")}
    assert {r["regime"] for r in out.calibration.to_pylist() if r["criterion"] == "gates"} == {"joint net.method=jei_dnn"}
    assert [r["accuracy_mean"] for r in rows if r["criterion"] == "gates"] == [0.9, 0.95]
    assert (tmp_path / "tradeoff_gates.png").is_file() and "exit criterion: gates" in out.text


def test_dynamic_inference_by_the_gates_takes_the_exits_the_gates_curve_counts() -> None:
    """`early_exit_forward(net, x, lambda, "gates")` runs block by block and lets a sample leave at the
    first IC whose gate (for that lambda) opens: the same exits and predictions as the curve's
    simulation on the cached logits, for every lambda; a lambda the gates were not fitted for is refused."""
    from exitflow.stages.core.inference import EarlyExitClassifier, early_exit_forward

    seed_everything(0)
    net = create_net(SPEC).eval()
    with torch.no_grad():  # gates that open for some samples and not others, differently per lambda
        net.gates.weight.normal_()
        net.gates.bias.copy_(torch.linspace(-1.5, 1.5, len(LAMBDAS))[:, None].expand_as(net.gates.bias))
        net.gates.feature_mean.normal_(0.0, 0.1)
        net.gates.feature_std.uniform_(0.5, 2.0)
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        logits = torch.stack(net(x))
    lambdas, simulated = gate_points(net, logits)
    assert len({tuple(row) for row in simulated.tolist()}) > 3  # the lambdas disagree: the check below can fail
    for lam, exits in zip(lambdas, simulated):
        out = early_exit_forward(net, x, float(lam), "gates")
        assert out.exits.tolist() == exits.tolist(), lam
        taken = logits[torch.as_tensor(exits), torch.arange(x.shape[0])].argmax(dim=-1)
        assert out.predictions.tolist() == taken.tolist(), lam
    classifier = EarlyExitClassifier(net, float(lambdas[5]), "gates")
    assert classifier(x).tolist() == early_exit_forward(net, x, float(lambdas[5]), "gates").predictions.tolist()
    with pytest.raises(ValueError, match="no gates for lambda 0.5"):
        early_exit_forward(net, x, 0.5, "gates")
    sdn = create_net(NetSpec(**{**SPEC.__dict__, "method": "sdn"}))
    with pytest.raises(ValueError, match="gates"):
        EarlyExitClassifier(sdn, 0.1, "gates")  # not a criterion, and SDN has no such curve


# Six samples: confidences and whether each prediction is right, for the hand computations below.
CONF = np.array([0.9, 0.6, 0.8, 0.95, 0.5, 0.7])
HIT = np.array([1.0, 0.0, 1.0, 1.0, 1.0, 0.0])


def test_equal_mass_ece_bins_at_the_confidences_quantiles_by_hand() -> None:
    """3 equal-mass bins: edges at the 1/3 and 2/3 quantiles of (0.5, 0.6, 0.7, 0.8, 0.9, 0.95), by
    linear interpolation 0.6 + 2/3 x 0.1 and 0.8 + 1/3 x 0.1; two samples in each bin."""
    bins = {(0.5, 0.6): (1, 0), (0.7, 0.8): (0, 1), (0.9, 0.95): (1, 1)}  # the bin's confidences: its hits
    expected = sum(abs(np.mean(h) - np.mean(c)) * len(c) / 6 for c, h in bins.items())
    assert math.isclose(expected, 0.125)
    assert math.isclose(equal_mass_ece(CONF, HIT, bins=3), 0.125)
    # the house's equal-width bins put 0.5 and 0.6 in [1/3, 2/3), the other four in [2/3, 1]: another number
    assert math.isclose(calibration_error(CONF, HIT, bins=3), (abs(0.5 - 0.55) * 2 + abs(0.75 - 0.8375) * 4) / 6)
    # rows are independent: a stack of rows gives each row's own ECE
    np.testing.assert_allclose(equal_mass_ece(np.stack([CONF, CONF[::-1]]), np.stack([HIT, HIT[::-1]]), bins=3), [0.125, 0.125])


def test_equal_mass_ece_puts_a_tie_at_an_edge_in_the_lower_bin() -> None:
    """The median of (0.2, 0.4, 0.4, 0.4, 0.6, 0.8) is 0.4: every 0.4 joins the first bin (p <= edge),
    which holds four samples, the second two."""
    conf, hit = np.array([0.2, 0.4, 0.4, 0.4, 0.6, 0.8]), np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    expected = abs(0.5 - 0.35) * 4 / 6 + abs(1.0 - 0.7) * 2 / 6
    assert math.isclose(equal_mass_ece(conf, hit, bins=2), expected) and math.isclose(expected, 0.2)


def test_equal_mass_ece_per_batch_is_the_size_weighted_mean_of_each_batchs_own() -> None:
    """Batches of 4: (0.9, 0.6, 0.8, 0.95) with its median 0.85 -> |0.5 - 0.7| / 2 + |1 - 0.925| / 2;
    then (0.5, 0.7), one sample a bin -> |1 - 0.5| / 2 + |0 - 0.7| / 2; weighted 4/6 and 2/6."""
    first, second = 0.2 / 2 + 0.075 / 2, 0.5 / 2 + 0.7 / 2
    assert math.isclose(equal_mass_ece(CONF, HIT, bins=2, batch=4), first * 4 / 6 + second * 2 / 6)
    assert math.isclose(equal_mass_ece(CONF, HIT, bins=2, batch=6), equal_mass_ece(CONF, HIT, bins=2))


def test_the_gates_curve_ece_bins_the_taken_exits_top_softmax_in_15_equal_mass_bins() -> None:
    """Logits that are log-probabilities: the taken exit's top softmax probability is known by hand.
    30 samples, two per bin at 15 bins; lambda 0 takes the final exit, lambda 1 IC 0 for the first half."""
    n = 30
    top0, top1 = np.linspace(0.40, 0.98, n), np.linspace(0.35, 0.99, n)[::-1]  # each exit's top probability

    def logits_of(top: np.ndarray, predicted: np.ndarray) -> torch.Tensor:
        probs = np.repeat(((1 - top) / 2)[:, None], 3, axis=1)
        probs[np.arange(n), predicted] = top
        return torch.tensor(np.log(probs))

    predicted0, predicted1 = np.arange(n) % 3, np.zeros(n, dtype=np.int64)
    logits = torch.stack([logits_of(top0, predicted0), logits_of(top1, predicted1)])  # [E = 2, N, C]
    labels = torch.tensor(np.where(np.arange(n) % 4 == 0, 1, 0))
    exits = np.stack([np.ones(n, dtype=np.int64), (np.arange(n) >= n // 2).astype(np.int64)])  # [L = 2, N]
    hit = np.stack([predicted0, predicted1]) == labels.numpy()[None]
    top = np.stack([top0, top1])
    for row in range(2):
        taken = exits[row]
        conf, right = top[taken, np.arange(n)], hit[taken, np.arange(n)].astype(np.float64)
        order = np.argsort(conf)  # distinct confidences: 15 bins of two, the lowest pair first
        expected = sum(abs(right[order[i : i + 2]].mean() - conf[order[i : i + 2]].mean()) * 2 / n for i in range(0, n, 2))
        got = gate_curve_ece(logits, labels, exits)
        assert math.isclose(got[row], expected, rel_tol=1e-9), row
        assert not math.isclose(got[row], calibration_error(conf, right)), row  # not the house's equal-width ECE
