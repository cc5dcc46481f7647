"""Submitting a Ray job as soon as the cluster can take it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# What Ray's dashboard answers (HTTP 500) while the head's job agent is not up yet: for seconds after a
# cluster starts, longer on a loaded machine. Ray's own advice is to try again later.
NO_AGENT = "No available agent to submit job"
AGENT_WAIT_S = 60.0


def submit_job(client: Any, wait_s: float = AGENT_WAIT_S, on_wait: Callable[[str], None] | None = None, **job: Any) -> str:
    """`client.submit_job(**job)` (a `ray.job_submission.JobSubmissionClient`), tried again every second
    while the cluster has no job agent yet, for up to `wait_s`; `on_wait` hears once why it waits.
    Any other error, or no agent by then, is raised as Ray raised it."""
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if NO_AGENT not in str(e) or time.monotonic() > deadline:
                raise
            if on_wait is not None and not told:
                on_wait(f"the cluster's job agent is not up yet; trying again for up to {wait_s:.0f} s")
                told = True
            time.sleep(1.0)
