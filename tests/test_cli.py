"""The commands around a study: `exitflow ui` serves the store, `exitflow report` refuses what it cannot read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from typer.testing import CliRunner

from helpers import free_port
from exitflow.pipeline.cli import app


def test_ui_serves_the_tracking_store_and_links_each_studys_runs(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    port = free_port()
    db = tmp_path / "mlflow.db"
    study = MlflowClient(f"sqlite:///{db}").create_experiment("a-study")
    # A link that opens the study's runs, not MLflow's GenAI overview (its default mode)
    link = f"a-study: http://127.0.0.1:{port}/#/experiments/{study}/runs?workflowType=machine_learning"
    cmd = [sys.executable, "-m", "exitflow.pipeline.cli", "ui", "--tracking-uri", f"sqlite:///{db}", "--port", str(port)]
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, healthy = time.monotonic() + 120, False
        while not healthy and proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    healthy = r.status == 200
            except OSError:
                time.sleep(0.5)
        assert healthy, log.read_text() if proc.poll() is not None else "no answer in 120 s"
        assert db.is_file()  # the sqlite store `exitflow run` uses by default
        deadline = time.monotonic() + 60  # the links follow once the server lists the experiments
        while link not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert link in log.read_text(), log.read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_ui_refuses_a_tracking_server() -> None:
    result = CliRunner().invoke(app, ["ui", "--tracking-uri", "http://127.0.0.1:1"])
    assert result.exit_code == 2 and "already a tracking server" in result.output


def test_report_of_an_unknown_run_fails_cleanly(mlflow_uri: str) -> None:
    result = CliRunner().invoke(app, ["report", "0123456789abcdef0123456789abcdef", "--tracking-uri", mlflow_uri])
    assert result.exit_code == 2, result.output
    assert "exitflow report:" in result.output and "Traceback" not in result.output
