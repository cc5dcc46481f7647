"""What a run's terminal shows: exitflow's progress lines, not Ray's output.

`exitflow run` starts (or joins) Ray with `log_to_driver=False`: Ray's INFO lines, warnings and
the tracebacks of processes it kills on purpose (a trial ASHA stops, a worker at shutdown) stay in
the session's log files. exitflow's own lines travel instead through one small actor per driver
job: every exitflow process of the job (node tasks, trials, Train workers) posts its lines to it,
and the driver prints them. A post waits for the actor, so a node's lines are all there when the
driver learns that the node finished, and print before its `done` line.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray

from stages.core.progress import Emit, progress_logging, to_stderr

NAMESPACE = "exitflow"
POST_TIMEOUT_S = 10
DRAIN_EVERY_S = 0.25


@ray.remote(num_cpus=0, max_restarts=0)
class ProgressSink:
    """Lines posted by a job's processes, until the driver drains them."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def post(self, line: str) -> None:
        self._lines.append(line)

    def drain(self) -> list[str]:
        lines, self._lines = self._lines, []
        return lines


def _sink_name() -> str:
    # Every process a driver's tasks start belongs to the driver's job: the name needs no passing.
    return f"progress-{ray.get_runtime_context().get_job_id()}"


def _poster() -> Emit:
    """Posts to this job's sink; stderr where there is none (a stage run outside `exitflow run`)
    or once it is gone (the driver died: nobody reads the lines either way)."""
    if not ray.is_initialized():
        return to_stderr
    try:
        sink = ray.get_actor(_sink_name(), namespace=NAMESPACE)
    except ValueError:
        return to_stderr

    def post(line: str) -> None:
        try:
            ray.get(sink.post.remote(line), timeout=POST_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a lost progress line must not fail the work
            to_stderr(line)

    return post


def relayed_progress(*quiet: str) -> None:
    """`progress_logging` for a process inside a run: its lines reach the driver's terminal."""
    progress_logging(*quiet, emit=_poster())


class Relay:
    """The driver's end: prints what the job's processes post, from a thread and on `flush()`."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write
        self._sink: Any = ProgressSink.options(name=_sink_name(), namespace=NAMESPACE, get_if_exists=True).remote()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="exitflow-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def flush(self) -> None:
        with self._lock:  # one drain at a time keeps the lines in order
            try:
                lines = ray.get(self._sink.drain.remote(), timeout=POST_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - the terminal's lines are not worth failing a run
                return
            for line in lines:
                self._write(line)

    def _loop(self) -> None:
        while not self._stop.wait(DRAIN_EVERY_S):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()


@contextmanager
def relay(write: Callable[[str], None] = to_stderr) -> Iterator[Relay]:
    """Relay the job's progress lines to `write` while the block runs (Ray must be initialised)."""
    r = Relay(write)
    r.start()
    try:
        yield r
    finally:
        r.close()
