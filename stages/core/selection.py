"""Which epoch a phase keeps: the one selection score (every epoch's `val_score`, which the loop keeps
the best state by and a learning-rate search ranks its trials by), what early stopping watches, and a
divergence's record. Plain Python: no torch."""

from __future__ import annotations

from collections.abc import Sequence

from exitflow.stages.core.phase_config import Selection

NO_STEP = float(2**53)  # "no non-finite step yet": above any step, so a MIN over ranks finds the first
DIVERGED_SCORE = -1.0  # a diverged epoch's selection score: below every accuracy, never the best


def selection_score(accuracies: Sequence[float], selection: Selection | str, phase: str,
                    flops_frac: Sequence[float] | None = None) -> float:
    """The validation score that picks a phase's best epoch and ranks a search's trials.

    `accuracies`: every exit's validation accuracy, final exit last. P1 always uses the final
    exit; otherwise `final`, `mean` over exits, or `auc`: the area under the validation
    FLOPs-accuracy points of the fixed exits (`flops_frac`: each exit's FLOPs as a share of the
    final exit's, on x; trapezoids), normalised by its x-range, so it reads as an accuracy.
    P3 freezes the final exit, whose accuracy is then the same every epoch: there `final` scores
    the deepest exit P3 trains (the last IC), which a constant would leave to the first epoch.
    """
    if phase == "P1":
        return accuracies[-1]
    if selection == "final":
        return accuracies[-2] if phase == "P3" and len(accuracies) > 1 else accuracies[-1]
    if selection == "mean":
        return sum(accuracies) / len(accuracies)
    if selection != "auc":
        raise ValueError(f"unknown selection {selection!r}; known: ['final', 'mean', 'auc']")
    xs = flops_frac
    if xs is None:
        raise ValueError("selection 'auc' needs the exits' FLOPs fractions")
    if len(xs) != len(accuracies):
        raise ValueError(f"{len(xs)} FLOPs fractions for {len(accuracies)} exits")
    if len(xs) < 2 or xs[-1] <= xs[0]:
        return accuracies[-1]
    area = sum((xs[i + 1] - xs[i]) * (accuracies[i] + accuracies[i + 1]) / 2 for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])


def monitored(phase: str, accuracies: Sequence[float]) -> list[float]:
    """The accuracies early stopping watches: P1 trains the final exit alone (the ICs' accuracies are
    noise), P3 freezes the final head (its accuracy is constant), P2 trains every exit."""
    if phase == "P1":
        return list(accuracies[-1:])
    return list(accuracies[:-1] if phase == "P3" else accuracies)


def divergence_message(epoch: int, step: int) -> str:
    return f"non-finite loss at epoch {epoch}, step {step}"


def diverged_in(history: Sequence[dict[str, float]]) -> str:
    """The divergence recorded in a phase's history, or "" (a history is what checkpoints keep)."""
    bad = [m for m in history if m.get("nonfinite_step", -1) >= 0]
    return divergence_message(int(bad[0]["epoch"]), int(bad[0]["nonfinite_step"])) if bad else ""
