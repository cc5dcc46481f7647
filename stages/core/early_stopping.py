"""Early stopping over several exits (paper section 4: stop when, for `patience` consecutive
epochs, no exit beats its best validation accuracy)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class EarlyStopping:
    """Tracks per-exit best accuracies and a selection score that picks the best state.

    `update` once per epoch: an epoch counts as progress when any monitored exit strictly
    beats its own best; `stop` turns true after `patience` epochs in a row without progress.
    Independently, `update` returns True when the selection score strictly beats its best,
    which is when the caller snapshots the best state.
    """

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = patience
        self.best_accuracies: list[float] = []
        self.best_score = -math.inf
        self.best_epoch = -1
        self.epochs_without_improvement = 0

    @property
    def stop(self) -> bool:
        """True once `patience` consecutive epochs improved no exit."""
        return self.epochs_without_improvement >= self.patience

    def update(self, epoch: int, accuracies: Sequence[float], score: float) -> bool:
        """Record one epoch's monitored accuracies and selection score; True if the score improved."""
        accuracies = [float(a) for a in accuracies]
        if not self.best_accuracies:
            self.best_accuracies = [-math.inf] * len(accuracies)
        if len(accuracies) != len(self.best_accuracies):
            raise ValueError(f"expected {len(self.best_accuracies)} accuracies, got {len(accuracies)}")
        progressed = any(a > b for a, b in zip(accuracies, self.best_accuracies))
        self.best_accuracies = [max(a, b) for a, b in zip(accuracies, self.best_accuracies)]
        self.epochs_without_improvement = 0 if progressed else self.epochs_without_improvement + 1
        if score > self.best_score:
            self.best_score, self.best_epoch = float(score), epoch
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only, so a checkpoint loads with `torch.load(weights_only=True)`."""
        return {
            "patience": self.patience,
            "best_accuracies": list(self.best_accuracies),
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; the patience of this instance wins (a resumed run may change it)."""
        self.best_accuracies = [float(a) for a in state["best_accuracies"]]
        self.best_score = float(state["best_score"])
        self.best_epoch = int(state["best_epoch"])
        self.epochs_without_improvement = int(state["epochs_without_improvement"])
