"""`exitflow submit|status|logs|stop`: the job commands against a Ray dashboard.

An unreachable address is an exit-2 error naming it, for every command. On the suite's own Ray
(its dashboard serves the job API as a cluster head's does), a job submitted there is read back
by `status` and `logs`, and `stop` stops a running one.
"""

from __future__ import annotations

import http.server
import json
import shlex
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from exitflow.pipeline.cli import app

UNREACHABLE = "http://127.0.0.1:1"


@pytest.mark.parametrize("command", ["status", "logs", "stop"])
def test_an_unreachable_dashboard_exits_2_naming_it(command: str) -> None:
    result = CliRunner().invoke(app, [command, "raysubmit_nope", "--address", UNREACHABLE])
    assert result.exit_code == 2, result.output
    assert f"cannot reach the Ray dashboard at {UNREACHABLE}" in result.output and "Traceback" not in result.output


def test_submit_to_an_unreachable_dashboard_exits_2(cwd: Path) -> None:
    result = CliRunner().invoke(app, ["submit", "empty.yaml", "--address", UNREACHABLE, "--tracking-uri", "http://127.0.0.1:5000"])
    assert result.exit_code == 2 and f"cannot reach the Ray dashboard at {UNREACHABLE}" in result.output


class _OtherRayDashboard(http.server.BaseHTTPRequestHandler):
    """A dashboard that says it runs another Ray (no cluster of another version runs here): what
    `JobSubmissionClient` reads when it connects."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps({"version": "4", "ray_version": "2.0.0", "ray_commit": "0" * 40, "session_name": "s"}).encode()
        self.send_response(200 if self.path == "/api/version" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("command", ["submit", "status"])
def test_a_cluster_of_another_ray_version_exits_2_naming_both(cwd: Path, command: str) -> None:
    import ray

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OtherRayDashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        args = ["empty.yaml", "--tracking-uri", "http://127.0.0.1:5000"] if command == "submit" else ["raysubmit_x"]
        result = CliRunner().invoke(app, [command, *args, "--address", address])
    finally:
        server.shutdown()
    assert result.exit_code == 2, result.output
    assert f"runs Ray 2.0.0, this machine Ray {ray.__version__}" in result.output and "install ray==2.0.0" in result.output
    assert "Traceback" not in result.output


def _wait_for(client: object, job_id: str, states: set[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id))  # type: ignore[attr-defined]
        if status in states:
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} never reached {states}")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_status_logs_and_stop_read_a_real_job(ray_dashboard: str) -> None:
    from ray.job_submission import JobSubmissionClient

    from exitflow.pipeline.job_submit import submit_job

    client = JobSubmissionClient(ray_dashboard)
    python = shlex.quote(sys.executable)
    # as `exitflow submit` does: a job agent still starting (a loaded machine) is waited for, not a failure
    done = submit_job(client, entrypoint=f"{python} -c \"print('hello from the job')\"")
    assert _wait_for(client, done, {"SUCCEEDED", "FAILED"}) == "SUCCEEDED"
    status = CliRunner().invoke(app, ["status", done, "--address", ray_dashboard])
    assert status.exit_code == 0 and f"job {done}: SUCCEEDED" in status.output
    logs = CliRunner().invoke(app, ["logs", done, "--address", ray_dashboard])
    assert logs.exit_code == 0 and "hello from the job" in logs.output
    followed = CliRunner().invoke(app, ["logs", done, "--follow", "--address", ray_dashboard])
    assert followed.exit_code == 0 and "hello from the job" in followed.output  # the job's outcome: success

    running = submit_job(client, entrypoint=f"{python} -c \"import time; time.sleep(120)\"")
    _wait_for(client, running, {"RUNNING"})
    stopped = CliRunner().invoke(app, ["stop", running, "--address", ray_dashboard])
    assert stopped.exit_code == 0 and "stopping" in stopped.output
    assert _wait_for(client, running, {"STOPPED", "FAILED", "SUCCEEDED"}) == "STOPPED"
    failed = CliRunner().invoke(app, ["logs", running, "--follow", "--address", ray_dashboard])
    assert failed.exit_code == 1  # --follow exits with the job's outcome
    unknown = CliRunner().invoke(app, ["status", "raysubmit_nope", "--address", ray_dashboard])
    assert unknown.exit_code == 2 and "raysubmit_nope" in unknown.output
