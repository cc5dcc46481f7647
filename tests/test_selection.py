"""The selection score: which epoch a phase keeps and how a search ranks its trials."""

from __future__ import annotations

import pytest

from exitflow.stages.core.selection import selection_score

ACC = [0.5, 0.7, 0.9]
FRAC = [0.25, 0.5, 1.0]


def test_p1_always_scores_its_final_exit() -> None:
    for selection in ("final", "mean", "auc"):
        assert selection_score(ACC, selection, "P1", FRAC) == 0.9


@pytest.mark.parametrize("phase", ["P2", "P3"])
def test_final_and_mean(phase: str) -> None:
    assert selection_score(ACC, "final", phase, FRAC) == (0.9 if phase == "P2" else 0.7)
    assert selection_score(ACC, "mean", phase, FRAC) == pytest.approx(0.7)


def test_p3_final_follows_the_deepest_exit_it_trains_not_its_frozen_head() -> None:
    """P3's final exit is frozen: scored on it, every epoch ties and the first would be kept."""
    epochs = [[0.3, 0.4, 0.9], [0.5, 0.6, 0.9], [0.4, 0.5, 0.9]]
    scores = [selection_score(acc, "final", "P3", FRAC) for acc in epochs]
    assert scores == [0.4, 0.6, 0.5] and max(range(3), key=scores.__getitem__) == 1


def test_auc_is_the_normalised_trapezoid_area_over_relative_flops() -> None:
    # 0.25 * (0.5 + 0.7) / 2 + 0.5 * (0.7 + 0.9) / 2 = 0.55, over the x-range 0.75
    assert selection_score(ACC, "auc", "P2", FRAC) == pytest.approx(0.55 / 0.75)
    # constant accuracy -> that accuracy, whatever the spacing
    assert selection_score([0.8] * 3, "auc", "P3", [0.1, 0.15, 1.0]) == pytest.approx(0.8)
    # an exit weighs by the FLOPs its segments span, unlike the mean: the same gain scores
    # more on the final exit (half the x-range beside it) than on the first (a quarter)
    assert selection_score([0.5, 0.5, 0.9], "auc", "P2", FRAC) == pytest.approx(0.95 / 1.5)
    assert selection_score([0.9, 0.5, 0.5], "auc", "P2", FRAC) == pytest.approx(0.85 / 1.5)
    assert selection_score([0.5, 0.5, 0.9], "mean", "P2", FRAC) == selection_score([0.9, 0.5, 0.5], "mean", "P2", FRAC)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown selection"):
        selection_score(ACC, "median", "P2", FRAC)
    with pytest.raises(ValueError, match="FLOPs fractions"):
        selection_score(ACC, "auc", "P2", FRAC[:2])
