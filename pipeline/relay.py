"""What a run's terminal shows: exitflow's progress lines, not Ray's output.

`exitflow run` starts (or joins) Ray with `log_to_driver=False`: Ray's INFO lines, warnings and
the tracebacks of processes it kills on purpose (a trial ASHA stops, a worker at shutdown) stay in
the session's log files. exitflow's own lines travel instead through one small actor per driver
job: every exitflow process of the job (node tasks, trials, Train workers) posts its lines to it,
and the driver shows them. A post waits for the actor, so a node's lines are all there when the
driver learns that the node finished, and show before its `done` line.

A line may carry an event (a dict: an epoch's validation accuracies, a search's trial counts):
a live display (`pipeline.display`) shows the event in place of the line; plain output prints the line.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray

from exitflow.pipeline.events import Event
from exitflow.stages.core.log_lines import progress_logging, to_stderr

Show = Callable[[str, "Event | None"], None]  # takes a line and its event
NAMESPACE = "exitflow"
POST_TIMEOUT_S = 10
DRAIN_EVERY_S = 0.25


@ray.remote(num_cpus=0, max_restarts=0)
class ProgressSink:
    """Lines (each with its event, or None) posted by a job's processes, until the driver drains them."""

    def __init__(self) -> None:
        self._items: list[tuple[str, Event | None]] = []

    def post(self, line: str, event: Event | None = None) -> None:
        self._items.append((line, event))

    def drain(self) -> list[tuple[str, Event | None]]:
        items, self._items = self._items, []
        return items


def _sink_name() -> str:
    # Every process a driver's tasks start belongs to the driver's job: the name needs no passing.
    return f"progress-{ray.get_runtime_context().get_job_id()}"


def _print_line(line: str, event: Event | None = None) -> None:
    to_stderr(line)


def _poster() -> Show:
    """Posts to this job's sink; stderr where there is none (a stage run outside `exitflow run`)
    or once it is gone (the driver died: nobody reads the lines either way)."""
    if not ray.is_initialized():
        return _print_line
    try:
        sink = ray.get_actor(_sink_name(), namespace=NAMESPACE)
    except ValueError:
        return _print_line

    def post(line: str, event: Event | None = None) -> None:
        try:
            ray.get(sink.post.remote(line, event), timeout=POST_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a lost progress line must not fail the work
            to_stderr(line)

    return post


_post: Show = _print_line  # this process's way to the driver, set by relayed_progress


def relayed_progress(*quiet: str) -> None:
    """`progress_logging` for a process inside a run: its lines reach the driver's terminal."""
    global _post
    _post = _poster()
    progress_logging(*quiet, emit=lambda line: _post(line, None))


def publish(line: str, event: Event) -> None:
    """A progress line with its event (from a process that called `relayed_progress`; printed
    to stderr elsewhere). Never raises: progress must not fail the work it reports."""
    try:
        _post(line, event)
    except Exception:  # noqa: BLE001
        to_stderr(line)


_notice: Show = _print_line  # where Ray's notices to the driver go: stderr, or the open relay's display


def quiet_ray_notices() -> None:
    """Show Ray's notices to this driver (a worker that died, a task Ray runs again) as short lines
    among exitflow's own, not as Ray prints them.

    Ray's driver prints what its error channel carries to stdout, `log_to_driver=False` or not, and
    stdout holds exitflow's results (a piped table would start with a coloured `(raylet)` paragraph).
    Ray has no setting for it: its printer is replaced; a Ray without that printer keeps its own output."""
    from ray._private import worker

    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_exitflow", False):
        return

    def printer(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":  # not the error channel: Ray's own way
            original(data, ignore_prefix)
            return
        for line in filter(None, map(ray_notice, data.get("lines", []))):
            _notice(line, None)

    printer._exitflow = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = printer


_NOTICE_DETAIL = re.compile(r"\s(?:Lease ID|RayTask ID|Task ID|Worker ID|Error):")


def ray_notice(message: str) -> str:
    """One line for a Ray notice: its opening sentences, up to the ids and error text that follow,
    and the worker's pid (details in Ray's session logs); "" for an empty one."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", message).strip()
    if not text:
        return ""
    head = _NOTICE_DETAIL.split(text.splitlines()[0], maxsplit=1)[0].strip()
    if len(head) > 200:
        head = head[:197] + "..."
    pid = re.search(r"Worker PID: (\d+)", text)
    return f"ray: {head}{f' (worker pid {pid.group(1)})' if pid else ''}"


class Relay:
    """The driver's end: shows what the job's processes post, from a thread and on `flush()`, and
    Ray's notices to the driver while it is open."""

    def __init__(self, show: Show) -> None:
        self._show = show
        self._sink: Any = ProgressSink.options(name=_sink_name(), namespace=NAMESPACE, get_if_exists=True).remote()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="exitflow-relay", daemon=True)

    def start(self) -> None:
        global _notice
        _notice = self._show_notice
        self._thread.start()

    def _show_notice(self, line: str, event: Event | None = None) -> None:
        with self._lock:  # between two drains, not inside one
            self._show(line, event)

    def flush(self) -> None:
        with self._lock:  # one drain at a time keeps the lines in order
            try:
                items = ray.get(self._sink.drain.remote(), timeout=POST_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - the terminal's lines are not worth failing a run
                return
            for line, event in items:
                self._show(line, event)

    def _loop(self) -> None:
        while not self._stop.wait(DRAIN_EVERY_S):
            self.flush()

    def close(self) -> None:
        global _notice
        _notice = _print_line
        self._stop.set()
        self._thread.join()
        self.flush()


@contextmanager
def relay(show: Show = _print_line) -> Iterator[Relay]:
    """Relay the job's progress lines and events to `show` while the block runs (Ray must be initialised)."""
    r = Relay(show)
    r.start()
    try:
        yield r
    finally:
        r.close()
