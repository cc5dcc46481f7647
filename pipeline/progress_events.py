"""The events behind a live display (`pipeline.display`), posted from the processes of a run.

Kept out of the stages' modules on purpose: how progress is shown never changes a result, so
it is in no stage's code fingerprint (editing it re-trains nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray import tune

from exitflow.pipeline.events import EPOCH, SEARCH
from exitflow.pipeline.relay import publish


def publish_epoch(node: str, trial: str, lr: float | None, epoch: int, max_epochs: int, metrics: dict[str, float],
                  exits: int) -> None:
    """A phase's epoch (one trial's, in a search): its progress line, with the event a live display shows."""
    val_acc = [float(metrics[f"val_acc_{k}"]) for k in range(exits)]
    line = (f"{node} epoch {epoch}: train_loss {metrics['train_loss']:.4f} "
            f"val_acc {' '.join(f'{a:.3f}' for a in val_acc)} score {metrics['val_score']:.4f}")
    publish(line, {"kind": EPOCH, "node": node, "trial": trial, "lr": lr if trial else None, "epoch": epoch,
                   "epochs": max_epochs, "val_acc": val_acc, "score": float(metrics["val_score"]),
                   "seconds": float(metrics.get("epoch_time", 0.0))})


class SearchProgress(tune.Callback):
    """A search's trial counts for the driver's display: an event when a trial starts or ends.

    Runs in the search's own process (the node task), which relays its lines. A restored search
    unpickles it from the saved state: it holds plain values and a module-level function only."""

    def __init__(self, label: str, total: int, trial_name: Callable[[str], str]) -> None:
        self.label, self.total = label, total
        self.trial_name = trial_name  # trial id -> the name its epochs are posted under

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._post(trials, trial, ended=False)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._post(trials, trial, ended=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._post(trials, trial, ended=True)

    def _post(self, trials: list[Any], trial: Any, ended: bool) -> None:
        # Tune calls back before the trial's own status changes: count it by what it is becoming.
        status = {id(t): t.status for t in trials}
        status[id(trial)] = "TERMINATED" if ended else "RUNNING"
        done = sum(s in ("TERMINATED", "ERROR") for s in status.values())
        running = sum(s == "RUNNING" for s in status.values())
        pending = max(0, self.total - done - running)
        lr = float(trial.config.get("lr", float("nan")))
        if ended:
            epochs = int((trial.last_result or {}).get("epoch", -1)) + 1
            what = f"ended after {epochs} epoch(s)" if epochs > 0 else "ended"
        else:
            what = "started"
        line = f"{self.label}: trial lr={lr:g} {what} ({done} of {self.total} done, {running} running)"
        name = self.trial_name(trial.trial_id)
        publish(line, {"kind": SEARCH, "node": self.label, "done": done, "running": running, "pending": pending,
                       "total": self.total, "ended": [name] if ended else []})
