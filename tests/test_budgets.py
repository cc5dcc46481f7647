"""Budget readout: the paper's rule, its Max, its seed averaging, and exitflow's named variants.

The golden test writes the paper's readout out from its code's logic (evaluation in its `eval.py`,
the table in its `visualize/cost_vs_table.py`, seeds averaged by its `visualize/__init__.py`) and
checks that exitflow's evaluation and budget table give the same numbers on fixed logits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from exitflow.stages.core.budgets import Readout, budget_accuracy, budget_point, budget_table, mean_std, read_budget
from exitflow.stages.core.evaluation import threshold_curve
from exitflow.stages.core.report_plots import format_budget_table, format_readout


def test_a_budget_reads_the_costliest_point_within_it() -> None:
    flops = np.array([10.0, 20.0, 30.0, 40.0, 30.0])
    acc = np.array([0.5, 0.7, 0.6, 0.9, 0.65])
    assert budget_accuracy(flops, acc, 40.0, 0.5) == 0.7  # <= 20
    assert budget_accuracy(flops, acc, 40.0, 0.74) == 0.7  # 29.6: 30 does not fit
    assert budget_accuracy(flops, acc, 40.0, 0.75) == 0.65  # 30 fits twice: the later point, whatever its accuracy
    assert budget_accuracy(flops[:4], acc[:4], 40.0, 0.75) == 0.6
    assert budget_accuracy(flops, acc, 40.0, 1.0) == 0.9
    assert math.isnan(budget_accuracy(flops, acc, 40.0, 0.2))
    with pytest.raises(ValueError, match="unknown budget 'everything'"):
        budget_point(flops, acc, 40.0, "everything")  # type: ignore[arg-type]


def test_max_is_the_costliest_point_of_a_curve_that_peaks_then_dips() -> None:
    """The paper's Max is the last point of the sweep (every sample at the final exit), not the best one:
    its Table 1 has Max below the 0.75x figure in several rows, which a best-anywhere Max never is."""
    flops = np.array([10.0, 20.0, 30.0, 40.0, 55.0])
    acc = np.array([0.5, 0.9, 0.85, 0.8, 0.75])  # peaks at 20, then dips
    assert budget_accuracy(flops, acc, 40.0, "max") == 0.75
    assert budget_accuracy(flops, acc, 40.0, "max", "best") == 0.75  # Max is Max under either rule
    assert budget_accuracy(flops, acc, 40.0, 0.75) == 0.85 > budget_accuracy(flops, acc, 40.0, "max")
    assert budget_accuracy(flops, acc, 40.0, "best_on_test") == 0.9  # exitflow's, under its own name
    assert budget_point([20.0, 10.0], [0.9, 0.9], 40.0, "best_on_test") == 1  # a tie: the cheaper point


def test_the_best_rule_takes_the_best_point_within_the_budget() -> None:
    flops = np.array([10.0, 20.0, 30.0, 40.0])
    acc = np.array([0.5, 0.8, 0.6, 0.9])  # a curve that dips: the costlier point is not the better one
    assert budget_accuracy(flops, acc, 40.0, 0.75) == 0.6  # the paper's rule: the costliest point (30)
    assert budget_accuracy(flops, acc, 40.0, 0.75, "best") == 0.8  # the best point under 30
    assert math.isnan(budget_accuracy(flops, acc, 40.0, 0.2, "best"))
    with pytest.raises(ValueError, match="unknown budget rule 'cheapest'"):
        budget_accuracy(flops, acc, 40.0, 0.5, "cheapest")  # type: ignore[arg-type]


def test_mean_std() -> None:
    assert mean_std([0.5]) == (0.5, 0.0)
    mean, std = mean_std([0.1, 0.2, 0.3, 0.4])
    assert mean == pytest.approx(0.25) and std == pytest.approx(np.std([0.1, 0.2, 0.3, 0.4], ddof=1))
    assert all(math.isnan(v) for v in mean_std([]))


def test_budget_table() -> None:
    flops = np.array([10.0, 20.0, 30.0, 40.0])
    curves = {
        "joint": [(flops, np.array([0.5, 0.6, 0.7, 0.8])), (flops, np.array([0.4, 0.7, 0.7, 0.9]))],
        "disjoint": [(flops, np.array([0.3, 0.5, 0.6, 0.7]))],
    }
    rows = budget_table(curves, backbone_flops=40.0)
    assert len(rows) == 10
    assert set(rows[0]) == {"regime", "budget", "accuracy_mean", "accuracy_std", "n_seeds"}
    by = {(r["regime"], r["budget"]): r for r in rows}
    assert [r["budget"] for r in rows[:5]] == ["0.25", "0.5", "0.75", "1.0", "max"]
    assert by["joint", "0.5"]["accuracy_mean"] == pytest.approx(0.65)
    assert by["joint", "0.5"]["accuracy_std"] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    assert by["joint", "0.5"]["n_seeds"] == 2
    assert by["joint", "max"]["accuracy_mean"] == pytest.approx(0.85)
    expected = {"regime": "disjoint", "budget": "0.25", "accuracy_mean": 0.3, "accuracy_std": 0.0, "n_seeds": 1}
    assert by["disjoint", "0.25"] == expected
    rows = budget_table(curves, backbone_flops=100.0, budgets=(0.05,))
    assert all(math.isnan(r["accuracy_mean"]) for r in rows)


def test_the_seeds_curves_are_averaged_before_the_budget_is_read_as_the_paper_does() -> None:
    """Two seeds whose curves cross the budget at different thresholds: the paper averages the curves
    point by point and reads the mean curve (both seeds report the same threshold); exitflow's
    `budget` averaging reads each seed's own curve first."""
    seed_a = (np.array([10.0, 20.0, 30.0, 40.0]), np.array([0.50, 0.60, 0.70, 0.80]))
    seed_b = (np.array([10.0, 14.0, 26.0, 40.0]), np.array([0.40, 0.55, 0.65, 0.90]))
    # budget 0.5 x 40 = 20: mean FLOPs [10, 17, 28, 40] -> the second point for both seeds
    paper = read_budget([seed_a, seed_b], 40.0, 0.5)
    assert paper.points == (1, 1)
    assert (paper.mean, paper.std) == pytest.approx((0.575, np.std([0.60, 0.55], ddof=1)))
    # each seed read alone: seed_a's second point (20 <= 20), seed_b's second (14; its third, 26, is over)
    own = read_budget([seed_a, seed_b], 40.0, 0.5, averaging="budget")
    assert own.points == (1, 1) and own.mean == pytest.approx(0.575)
    # budget 0.7 x 40 = 28: the mean curve fits its third point (28); seed_a alone does not (30 > 28)
    assert read_budget([seed_a, seed_b], 40.0, 0.7).points == (2, 2)
    assert read_budget([seed_a, seed_b], 40.0, 0.7, averaging="budget").points == (1, 2)
    with pytest.raises(ValueError, match="same thresholds"):
        read_budget([seed_a, (seed_b[0][:3], seed_b[1][:3])], 40.0, 0.5)
    with pytest.raises(ValueError, match="unknown seed averaging"):
        read_budget([seed_a], 40.0, 0.5, averaging="median")  # type: ignore[arg-type]


# --- the golden test: the paper's code's readout, written out from its logic ---------------------------

def _their_curve(probs: np.ndarray, labels: np.ndarray, head_flops: list[float], steps: int = 100) -> tuple[list[float], list[float]]:
    """Their eval.py's threshold sweep: thresholds linspace(0, 1, 100); a sample leaves at the first head
    whose max softmax is strictly above the threshold, else at the last head; cost = each head's FLOPs
    times the samples that left there, over all samples; score = the share of right answers."""
    heads, n, _ = probs.shape
    flops, scores = [], []
    for t in np.linspace(0.0, 1.0, steps):
        exit_at = np.full(n, -1)
        for i in range(heads):
            leave = (probs[i].max(axis=-1) > t) & (exit_at == -1)
            exit_at[leave] = i
        exit_at[exit_at == -1] = heads - 1
        right = probs[exit_at, np.arange(n)].argmax(axis=-1) == labels
        counts = np.bincount(exit_at, minlength=heads)
        flops.append(sum(c * k for c, k in zip(head_flops, counts)) / counts.sum())
        scores.append(right.sum() / n)
    return flops, scores


def _their_table(seed_flops: list[list[float]], seed_scores: list[list[float]], cost_100: float) -> list[tuple[float, float]]:
    """Their cost_vs_table.py on the seeds' mean curve (their mean_std: torch.std_mean, unbiased), for the
    fractions 0.25, 0.5, 0.75, 1.0 and inf (Max): walk the thresholds until the first one whose cost
    exceeds fraction x cost_100 and take the one before it ('-' when the very first exceeds it); when
    none exceeds it the walk ends on the last threshold, the budget valid as it was for the previous
    fraction (inf comes after 1.0, which the final exit's cost always crosses)."""
    flops = np.mean(seed_flops, axis=0)
    scores, stds = np.mean(seed_scores, axis=0), np.std(seed_scores, axis=0, ddof=1)
    table, valid = [], False
    for fraction in (0.25, 0.5, 0.75, 1.0, math.inf):
        k = len(flops) - 1
        for j, cost in enumerate(flops):
            if cost > fraction * cost_100:
                valid, k = j > 0, j - 1
                break
        table.append((scores[k], stds[k]) if valid else (math.nan, math.nan))
    return table


def test_exitflow_reads_the_budget_table_as_the_papers_code_does() -> None:
    gen = torch.Generator().manual_seed(7)
    n, classes, head_flops, backbone = 199, 6, [19.0, 29.0, 41.0, 57.0, 74.0], 70.3  # no cost can sit on a budget
    labels = torch.randint(0, classes, (n,), generator=gen)
    seeds = []
    for _ in range(3):  # three seeds' nets, deeper heads sharper and more often right
        scale = torch.linspace(0.6, 3.5, len(head_flops)).view(-1, 1, 1)
        logits = torch.randn(len(head_flops), n, classes, generator=gen, dtype=torch.float64) * scale
        logits[:, torch.arange(n), labels] += scale.view(-1, 1) * 0.9
        seeds.append(logits.float())  # evaluation caches float32 logits
    probs = [torch.softmax(lg.double(), dim=-1).numpy() for lg in seeds]
    grid = np.linspace(0.0, 1.0, 100)
    for p in probs:  # the rule's ">" and exitflow's agree unless a confidence sits on a threshold: none does here
        assert np.abs(p.max(axis=-1)[..., None] - grid).min() > 1e-9

    theirs = [_their_curve(p, labels.numpy(), head_flops) for p in probs]
    ours = [threshold_curve(lg, labels, head_flops, "max_softmax", 100, "uniform") for lg in seeds]
    for (flops, scores), curve in zip(theirs, ours):
        assert curve["flops"] == pytest.approx(flops, rel=1e-12) and curve["accuracy"] == pytest.approx(scores, abs=1e-12)

    expected = _their_table([f for f, _ in theirs], [s for _, s in theirs], backbone)
    rows = budget_table({"joint": [(c["flops"], c["accuracy"]) for c in ours]}, backbone)
    assert [r["budget"] for r in rows] == ["0.25", "0.5", "0.75", "1.0", "max"]
    got = [(r["accuracy_mean"], r["accuracy_std"]) for r in rows]
    assert np.allclose(got, expected, rtol=0, atol=1e-12, equal_nan=True)
    assert math.isnan(expected[0][0]) and not any(math.isnan(m) for m, _ in expected[1:])  # 0.25x is '-' in both
    assert expected[-1][0] == pytest.approx(np.mean([(p[-1].argmax(-1) == labels.numpy()).mean() for p in probs]))


def test_the_table_says_how_it_was_read() -> None:
    rows = budget_table({"joint": [(np.array([10.0, 40.0]), np.array([0.5, 0.9]))]}, 40.0, (0.5, "max", "best_on_test"))
    text = format_budget_table(rows)
    assert text.splitlines()[1].split() == ["regime", "seeds", "0.5x", "max", "best_on_test"]
    paper = format_readout(Readout(), ["0.5", "max"])
    assert "100, evenly spaced" in paper and "(the paper's)" in paper and "every sample at the final exit" in paper
    assert "test labels" not in paper and "exitflow's" not in paper
    variant = " ".join(format_readout(Readout(37, "quantile", "best", "budget"), ["0.5", "best_on_test"]).split())
    for said in ("37, at quantiles", "budget_rule: best, selected on test labels", "best_on_test: the most accurate point",
                 "each seed's curve read at the budget"):
        assert said in variant, said
    assert all(len(line) <= 100 for line in format_readout(Readout(), ["0.5", "max"]).splitlines())
