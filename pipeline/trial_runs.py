"""Each trial of a search as an MLflow run nested under its stage's run (`pipeline.stage.TrialRuns`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from exitflow.pipeline import tracking
from exitflow.pipeline.stage import TrialOutcome


@dataclass(frozen=True)
class MlflowTrialRuns:
    """Creates each trial's nested MLflow run under its stage's run (picklable: it travels to the trials)."""

    tracking_uri: str
    experiment_id: str
    stage_run_id: str
    base_tags: tuple[tuple[str, str], ...]

    def _find(self, c: Any, trial_name: str) -> Any | None:
        found = c.search_runs([self.experiment_id], filter_string=f"tags.`exitflow.trial` = '{trial_name}'", max_results=1)
        return found[0] if found else None

    def __call__(self, trial_name: str, lr: float) -> tracking.MetricsSink:
        c = tracking.client(self.tracking_uri)
        found = self._find(c, trial_name)
        if found is not None:  # a resumed trial keeps logging to its run, now under this stage run
            run_id = found.info.run_id
            c.set_tag(run_id, tracking.PARENT_TAG, self.stage_run_id)
            tracking.set_owner(c, run_id)
            c.update_run(run_id, status="RUNNING")
        else:
            tags = {**dict(self.base_tags), **tracking.owner_tags(), "exitflow.stage": "trial", "exitflow.trial": trial_name}
            # A trial is not its stage: it must never be found as the stage's cached (or stale) run.
            tags["exitflow.search_key"] = tags.pop("exitflow.key")
            run_id = tracking.start_run(c, self.experiment_id, f"trial lr={lr:.3g}", tags, self.stage_run_id)
            c.log_param(run_id, "lr", lr)
        return tracking.MetricsSink(self.tracking_uri, run_id)

    def adopt(self, trials: Iterable[TrialOutcome]) -> None:
        """After a search: every trial's run sits under this stage run with its outcome, none left RUNNING.

        Trials that finished in an earlier, interrupted attempt join this stage run; trials the
        scheduler stopped (their process was killed before they could close their run) end here.
        """
        c = tracking.client(self.tracking_uri)
        for t in trials:
            run = self._find(c, t.name)
            if run is None:
                continue
            c.set_tag(run.info.run_id, tracking.PARENT_TAG, self.stage_run_id)
            c.set_tag(run.info.run_id, "exitflow.stopped_by", t.stopped_by)
            c.set_tag(run.info.run_id, "exitflow.chosen", str(t.chosen).lower())
            tracking.log_metrics(c, run.info.run_id, {"best_val": t.best_val, "epochs": t.epochs})
            # The search is the authority: a stopped trial's dead process may have been taken
            # for a crash (FAILED) by another exitflow run's recovery in the meantime.
            if run.info.status != "FINISHED":
                tracking.end_run(c, run.info.run_id, "FINISHED")

    def abandon(self, prefix: str) -> None:
        """After a failed search: the trial runs still open whose names start with `prefix` are KILLED
        (a re-run resumes those trials)."""
        c = tracking.client(self.tracking_uri)
        query = f"tags.`exitflow.trial` LIKE '{prefix}%' and attributes.status = 'RUNNING'"
        for r in c.search_runs([self.experiment_id], filter_string=query):
            c.set_tag(r.info.run_id, "exitflow.note", "the search failed while this trial was open; a re-run resumes it")
            tracking.end_run(c, r.info.run_id, "KILLED")
