"""Evaluation maths against direct per-sample, per-threshold reference implementations."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from exitflow.stages.core.evaluation import (
    CRITERIA,
    ExitCriterion,
    calibration_error,
    collect_logits,
    exit_criterion,
    exit_indices,
    fixed_exit_accuracy,
    register_criterion,
    threshold_curve,
)

EXIT_FLOPS = [10.0, 25.0, 45.0, 70.0]


def random_logits(
    num_exits: int = 4, n: int = 300, num_classes: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    # Sharper, more often right, deeper exits: a realistic spread of confidences.
    scale = torch.linspace(0.5, 3.0, num_exits).view(-1, 1, 1)
    logits = torch.randn(num_exits, n, num_classes, generator=g) * scale
    logits[:, torch.arange(n), labels] += scale.view(-1, 1) * 0.8
    return logits.float(), labels


def reference_curve(
    logits: torch.Tensor, labels: torch.Tensor, flops: list[float], criterion: str, num_thresholds: int,
    thresholds: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The definition, literally: for each threshold (default: evenly spaced), walk each sample through the exits."""
    e, n, c = logits.shape
    top = 1.0 if criterion == "max_softmax" else math.log(c)
    if thresholds is None:
        thresholds = np.linspace(0.0, top, num_thresholds)
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    acc, cost = [], []
    for t in thresholds:
        right, spent = 0, 0.0
        for i in range(n):
            k = e - 1
            for j in range(e - 1):
                p = probs[j, i]
                conf = p.max() if criterion == "max_softmax" else float(-(p * np.log(p)).sum())
                if (conf > t) if criterion == "max_softmax" else (conf < t):
                    k = j
                    break
            right += int(probs[k, i].argmax() == int(labels[i]))
            spent += flops[k]
        acc.append(right / n)
        cost.append(spent / n)
    return np.array(acc), np.array(cost)


@pytest.mark.parametrize("criterion", ["max_softmax", "entropy"])
def test_curve_matches_reference(criterion: str) -> None:
    logits, labels = random_logits()
    curve = threshold_curve(logits, labels, EXIT_FLOPS, criterion, num_thresholds=37)
    acc, cost = reference_curve(logits, labels, EXIT_FLOPS, criterion, 37)
    assert set(curve) == {"threshold", "flops", "accuracy", "ece"}
    assert all(v.shape == (37,) for v in curve.values())
    np.testing.assert_allclose(curve["accuracy"], acc, atol=1e-12)
    np.testing.assert_allclose(curve["flops"], cost, rtol=1e-12)
    # The curve actually moves between its ends (the test is not vacuous).
    assert len(np.unique(curve["flops"])) > 10


@pytest.mark.parametrize("criterion", ["max_softmax", "entropy"])
def test_quantile_curve_matches_reference_at_its_thresholds(criterion: str) -> None:
    logits, labels = random_logits(seed=2)
    curve = threshold_curve(logits, labels, EXIT_FLOPS, criterion, num_thresholds=37, spacing="quantile")
    assert 30 <= len(curve["threshold"]) <= 37 and np.all(np.diff(curve["threshold"]) > 0)
    acc, cost = reference_curve(logits, labels, EXIT_FLOPS, criterion, 0, thresholds=curve["threshold"])
    np.testing.assert_allclose(curve["accuracy"], acc, atol=1e-12)
    np.testing.assert_allclose(curve["flops"], cost, rtol=1e-12)


def test_quantile_spacing_spreads_a_confident_net_over_the_flops_range() -> None:
    logits, labels = random_logits(n=2000, num_classes=10, seed=3)
    logits = logits * 10  # confident ICs: nearly every max softmax is above 0.99
    span = EXIT_FLOPS[-1] - EXIT_FLOPS[0]

    def widest_gap(spacing: str) -> float:
        flops = np.sort(threshold_curve(logits, labels, EXIT_FLOPS, "max_softmax", 100, spacing)["flops"])
        return float(np.diff(flops).max()) / span

    uniform, quantile = widest_gap("uniform"), widest_gap("quantile")
    assert uniform > 0.5  # the failure it fixes: one jump over most of the range
    assert quantile < 0.1 and quantile < uniform / 5


@pytest.mark.parametrize("spacing", ["uniform", "quantile"])
@pytest.mark.parametrize("criterion", ["max_softmax", "entropy"])
def test_curve_ends_are_exact(criterion: str, spacing: str) -> None:
    logits, labels = random_logits(seed=1)
    curve = threshold_curve(logits, labels, EXIT_FLOPS, criterion, spacing=spacing)
    fixed = fixed_exit_accuracy(logits, labels).numpy()
    first, last = (0, -1) if criterion == "max_softmax" else (-1, 0)
    assert curve["flops"][first] == EXIT_FLOPS[0]
    assert curve["accuracy"][first] == pytest.approx(fixed[0], abs=1e-12)
    assert curve["flops"][last] == EXIT_FLOPS[-1]
    assert curve["accuracy"][last] == pytest.approx(fixed[-1], abs=1e-12)
    top = 1.0 if criterion == "max_softmax" else math.log(5)
    assert curve["threshold"][0] == 0.0 and curve["threshold"][-1] == pytest.approx(top)


def pabee_exits(logits: torch.Tensor, patience: int) -> np.ndarray:
    """PABEE's inference loop (Zhou et al. 2020, Alg. 1), literally, per sample: a counter of
    agreements with the previous exit's prediction, reset on a change; leave at the first IC
    whose counter reaches the patience, else at the final exit."""
    e, n, _ = logits.shape
    pred = logits.argmax(dim=-1).numpy()
    exits = np.full(n, e - 1)
    for i in range(n):
        count = 0
        for j in range(e - 1):
            count = count + 1 if j > 0 and pred[j, i] == pred[j - 1, i] else 0
            if count >= patience:
                exits[i] = j
                break
    return exits


@pytest.mark.parametrize("seed", [0, 1])
def test_patience_leaves_where_pabee_does(seed: int) -> None:

    logits, labels = random_logits(num_exits=7, n=400, num_classes=3, seed=seed)  # few classes: runs of agreement
    e = logits.shape[0]
    conf = exit_criterion(logits, "patience")
    for patience in range(e + 1):
        [ours] = exit_indices(conf, np.array([(patience + 0.5) / e]), "patience")
        np.testing.assert_array_equal(ours, pabee_exits(logits, patience), err_msg=f"patience {patience}")
    # Every patience is a point of the curve (quantile spacing finds them all), ends included.
    cost = 10.0 * np.arange(1, e + 1)
    curve = threshold_curve(logits, labels, cost, "patience", spacing="quantile")
    pabee_costs = [cost[pabee_exits(logits, patience)].mean() for patience in range(e)]
    for expected in pabee_costs:
        assert np.isclose(curve["flops"], expected, rtol=1e-12).any()
    assert curve["flops"].min() == cost[0] and curve["flops"].max() == cost[-1]
    assert len(np.unique(pabee_costs)) > 3  # not vacuous: the patiences spread the samples


def test_single_exit_and_bad_inputs() -> None:
    logits, labels = random_logits(num_exits=1)
    curve = threshold_curve(logits, labels, [7.0], "entropy", num_thresholds=5)
    assert np.all(curve["flops"] == 7.0)
    with pytest.raises(ValueError, match="exit_flops"):
        threshold_curve(logits, labels, [1.0, 2.0], "entropy")
    with pytest.raises(ValueError, match="criterion"):
        threshold_curve(logits, labels, [1.0], "margin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spacing"):
        threshold_curve(logits, labels, [7.0], "entropy", spacing="log")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_thresholds"):
        threshold_curve(logits, labels, [7.0], "entropy", num_thresholds=1)
    single = threshold_curve(logits, labels, [7.0], "max_softmax", num_thresholds=5, spacing="quantile")
    assert np.all(single["flops"] == 7.0) and len(single["threshold"]) == 5


def test_fixed_exit_accuracy() -> None:
    labels = torch.tensor([0, 1, 2, 1])
    logits = torch.zeros(2, 4, 3)
    logits[0, torch.arange(4), torch.tensor([0, 1, 0, 0])] = 1.0  # 2 of 4 right
    logits[1, torch.arange(4), labels] = 1.0  # all right
    assert torch.equal(fixed_exit_accuracy(logits, labels), torch.tensor([0.5, 1.0], dtype=torch.float64))


class TwoExitNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.drop(self.a(x)), self.b(x)]


def test_collect_logits() -> None:
    torch.manual_seed(0)
    net = TwoExitNet().train()
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    logits, labels = collect_logits(net, DataLoader(TensorDataset(x, y), batch_size=4), "cpu")
    assert logits.shape == (2, 10, 3) and logits.dtype == torch.float32 and not logits.requires_grad
    assert torch.equal(labels, y) and not net.training
    assert torch.allclose(logits[0], net.a(x).detach()) and torch.allclose(logits[1], net.b(x).detach())


def test_calibration_error_by_hand() -> None:
    # 15 bins: 0.95 falls in the top bin (accuracy 1/2), 0.55 in bin 8 (accuracy 1): 2/4 x 0.45 twice
    ece = calibration_error(np.array([0.95, 0.95, 0.55, 0.55]), np.array([1, 0, 1, 1]))
    assert ece == pytest.approx(0.45, abs=1e-12)
    assert calibration_error(np.array([1.0, 0.0]), np.array([1, 0])) == pytest.approx(0.0)  # the ends fall in bins
    rows = calibration_error(np.array([[0.95, 0.95], [0.7, 0.7]]), np.array([[1, 1], [1, 0]]))
    assert rows == pytest.approx([0.05, 0.2])  # vectorized over rows


@pytest.mark.parametrize("criterion", ["max_softmax", "patience"])
def test_the_curve_reports_the_calibration_of_the_predictions_it_makes(criterion: str) -> None:
    logits, labels = random_logits(seed=3)
    curve = threshold_curve(logits, labels, EXIT_FLOPS, criterion, num_thresholds=15, spacing="quantile")
    conf = exit_criterion(logits, criterion)
    exits = exit_indices(conf, curve["threshold"], criterion)
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    for t in range(len(curve["threshold"])):  # the definition, per sample: bin, then weigh |accuracy - confidence|
        top = np.array([probs[k, i].max() for i, k in enumerate(exits[t])])
        right = np.array([probs[k, i].argmax() == labels[i] for i, k in enumerate(exits[t])], dtype=float)
        bins = np.minimum((top * 15).astype(int), 14)
        expected = sum(abs(right[bins == b].mean() - top[bins == b].mean()) * (bins == b).mean() for b in set(bins))
        assert curve["ece"][t] == pytest.approx(expected, abs=1e-12)
    assert len(np.unique(np.round(curve["ece"], 9))) > 3  # it moves with the threshold


@pytest.fixture
def margin() -> Iterator[ExitCriterion]:
    """A toy criterion, registered for one test: the gap between the two most likely classes."""
    toy = register_criterion(ExitCriterion(
        "toy_margin", lambda logp: (lambda top: top[..., 0] - top[..., 1])(logp.exp().topk(2, dim=-1).values),
        confident_high=True, upper=lambda c: 1.0,
    ))
    yield toy
    CRITERIA.unregister(toy.name)


@pytest.mark.parametrize("spacing", ["uniform", "quantile"])
def test_a_registered_criterion_runs_through_evaluation_without_a_branch_of_its_own(
    margin: ExitCriterion, spacing: str
) -> None:
    logits, labels = random_logits(seed=4)
    curve = threshold_curve(logits, labels, EXIT_FLOPS, "toy_margin", num_thresholds=25, spacing=spacing)
    # The definition, literally, for the margin: leave at the first IC whose top-2 gap exceeds t.
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    top2 = np.sort(probs, axis=-1)[..., ::-1][..., :2]
    gap = top2[..., 0] - top2[..., 1]
    for t, acc, cost in zip(curve["threshold"], curve["accuracy"], curve["flops"]):
        exits = [next((j for j in range(3) if gap[j, i] > t), 3) for i in range(len(labels))]
        assert acc == pytest.approx(np.mean([probs[k, i].argmax() == labels[i] for i, k in enumerate(exits)]), abs=1e-12)
        assert cost == pytest.approx(np.mean([EXIT_FLOPS[k] for k in exits]), rel=1e-12)
    assert curve["threshold"][0] == 0.0 and curve["threshold"][-1] == 1.0 and len(np.unique(curve["flops"])) > 5


def test_the_spec_takes_its_criteria_from_the_registry(margin: ExitCriterion) -> None:
    from exitflow.pipeline.spec import SpecError, load_spec

    assert load_spec(None, ["evaluation.criteria=[toy_margin, entropy]"]).evaluation.criteria == ["toy_margin", "entropy"]
    with pytest.raises(SpecError, match="unknown criterion 'nope'"):
        load_spec(None, ["evaluation.criteria=[nope]"])
