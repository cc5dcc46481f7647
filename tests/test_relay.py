"""Ray's notices to a driver (a worker that died, a task Ray runs again) as exitflow shows them.

The end-to-end check is in tests/test_fault_matrix.py (every run a worker is killed in keeps
stdout to exitflow's results); these pin the printer and the shortening on Ray's real texts.
"""

from __future__ import annotations

from typing import Any

import pytest

from exitflow.pipeline.relay import quiet_ray_notices, ray_notice

# As Ray 2.60's driver received them when a node task's process was SIGKILLed (ids shortened).
WORKER_DIED = (
    "A worker died or was killed while executing a task by an unexpected system error. To troubleshoot the problem, "
    "check the logs for the dead worker. Lease ID: 0200000002000000ffff Worker ID: a5752fb5ab4b Node ID: 42ee7d3990f7 "
    "Worker IP address: 127.0.0.1 Worker port: 43561 Worker PID: 2397 Worker exit type: SYSTEM_ERROR Worker exit "
    "detail: Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) ..."
)
RETRIED = "Task exitflow:seed0/disjoint/evaluate failed. There are 1 retries remaining, so the task will be retried. Error: \nTraceback (most recent call last):\n  ..."


def test_a_notice_keeps_its_opening_sentences_and_the_pid_not_the_ids() -> None:
    assert ray_notice(WORKER_DIED) == ("ray: A worker died or was killed while executing a task by an unexpected system "
                                       "error. To troubleshoot the problem, check the logs for the dead worker. (worker pid 2397)")
    assert ray_notice(RETRIED) == "ray: Task exitflow:seed0/disjoint/evaluate failed. There are 1 retries remaining, so the task will be retried."
    assert ray_notice("\x1b[33mNode lost.\x1b[0m") == "ray: Node lost."
    assert ray_notice("  \n") == ""
    assert len(ray_notice("x" * 1000)) == len("ray: ") + 200


@pytest.fixture
def ray_printer(monkeypatch: pytest.MonkeyPatch) -> Any:  # Ray's private worker module
    from ray._private import worker

    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # put back after the test
    quiet_ray_notices()
    quiet_ray_notices()  # a second driver set-up in one process wraps nothing twice
    return worker


def test_the_error_channel_reaches_stderr_as_exitflow_lines_and_stdout_stays_clean(ray_printer: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ray_printer.print_to_stdstream({"lines": [WORKER_DIED, "", RETRIED], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [ray_notice(WORKER_DIED), ray_notice(RETRIED)]


def test_other_output_keeps_rays_own_way(ray_printer: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """`run --verbose` (log_to_driver) output of a worker is not a notice: Ray prints it, prefixed."""
    ray_printer.print_to_stdstream({"lines": ["hello from a worker"], "pid": 4242, "ip": "127.0.0.1", "is_err": False,
                                    "task_name": "t", "actor_name": "", "job": "01000000"}, ignore_prefix=False)
    out, _ = capsys.readouterr()
    assert "hello from a worker" in out and "4242" in out
