"""Fault injection on the real command: `exitflow run` SIGKILLed mid-phase, and two runs at once.

These drive `exitflow run` as a user does, in its own process with its own local Ray and its
own MLflow server on a sqlite store in a fresh working directory, then read that store.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers import run_in_terminal
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.yaml"
SMALL = ["regimes=[joint]", "net.width=8", "evaluation.thresholds=20", "resources.torch_threads=1"]


def _command(*sets: str) -> list[str]:
    args = [a for s in (*SMALL, *sets) for a in ("--set", s)]
    return [sys.executable, "-m", "exitflow.pipeline.cli", "run", str(EXAMPLE), *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return {**env, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    w = tmp_path / "work"
    w.mkdir()
    return w


def _read_store(work: Path) -> list[Any]:
    """Every run of the study in the working directory's store."""
    from exitflow.pipeline.tracking_server import serve_store

    with serve_store(f"sqlite:///{work / 'mlflow.db'}") as url:
        c = MlflowClient(url)
        exp = c.get_experiment_by_name("digits-study")
        return c.search_runs([exp.experiment_id], max_results=1000)


def _guards_of(pid: int) -> list[int]:
    """Live store guards started by process `pid` (they must not outlive it)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"exitflow.pipeline.store_guard" in argv and str(pid).encode() in argv:
            found.append(int(cmdline.parent.name))
    return found


def test_sigkill_of_the_driver_mid_phase_then_a_rerun_completes(work: Path) -> None:
    """The user's own set-up (a local Ray and MLflow server the driver starts), killed at the end
    of P2's second epoch by the project's fault hook; the fault matrix covers every other moment, with
    one-worker phases in process (the default): this one trains under Ray Train, whose own
    checkpoints the re-run resumes from."""
    cmd = _command("phases.P2.max_epochs=3", "phases.P2.patience=4", "resources.trainer=ray_train")
    marker = work.parent / "fired"
    fault = f"point=train.epoch_end,node=seed0/joint/P2,epoch=1,target=driver,marker={marker}"
    driver = subprocess.Popen(cmd, cwd=work, env={**_env(), "EXITFLOW_FAULT": fault},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert driver.wait(timeout=600) == -signal.SIGKILL  # the driver alone, as the OOM killer or `kill -9` would
    assert json.loads(marker.read_text())["context"]["epoch"] == 1
    deadline = time.monotonic() + 15
    while _guards_of(driver.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _guards_of(driver.pid) == []  # its MLflow server went down with it

    # The re-run in a terminal, as a user runs it: one live display, then the table; nothing of Ray's.
    rc, screen = run_in_terminal(cmd, work, _env(), timeout=600)
    assert rc == 0, screen[-3000:]
    assert "recovered: run" in screen and "resuming after epoch" in screen  # printed above the live view
    assert re.search(r"seed0/joint/P2 +train +running +epoch 3/3  val acc( \d\.\d\d){4}", screen), screen[-3000:]
    assert re.search(r"exitflow digits-study: .*2 done.*\n", screen)  # the view's header
    assert screen.rindex("exitflow digits-study:") < screen.index("regime ") < screen.index("1 phases trained")
    assert not re.search(r"Traceback|pid=|Token authentication|WARNING|Warning:|Error", screen), screen[-3000:]
    assert not re.search(r"seed0/joint/P2 epoch \d: train_loss", screen)  # the epochs are the view's row, not lines

    runs = _read_store(work)
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []  # no zombie in the UI
    parents = {r.info.status for r in runs if r.data.tags.get("exitflow.stage") == "pipeline"}
    assert parents == {"KILLED", "FINISHED"}
    phase = [r for r in runs if r.data.tags.get("exitflow.node") == "seed0/joint/P2"]
    assert sorted(r.info.status for r in phase) == ["FAILED", "FINISHED"]
    [killed] = [r for r in phase if r.info.status == "FAILED"]
    assert "died" in killed.data.tags["exitflow.recovered"]
    [done] = [r for r in phase if r.info.status == "FINISHED"]
    summary = json.loads(done.data.tags["exitflow.summary"])
    assert summary["resumed_at"] == 1 and summary["epochs"] == 3  # after its reported epoch 0, not from scratch


def test_two_runs_at_once_train_each_node_once(work: Path) -> None:
    """Also: every socket a local run listens on (its Ray's, its MLflow server's) is on loopback."""
    from helpers import is_loopback, listening_addresses

    cmd = _command("phases.P2.max_epochs=2", "phases.P2.patience=3")
    env = {k: v for k, v in _env().items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}  # as a user's shell has it
    procs = [subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    sockets: set[tuple[int, str, int]] = set()
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(p.communicate, timeout=600) for p in procs]
        while not all(f.done() for f in pending):
            for p in procs:
                sockets |= listening_addresses(p.pid)
            time.sleep(2)
        outs = [f.result() for f in pending]
    assert {"raylet", "gcs_server"} <= {name for name, _, _ in sockets}  # Ray's own, seen listening
    # The one exception (docs/loopback.md): PyTorch's rendezvous store in a Train worker, which binds
    # every interface (TCPStore takes no bind address) while its phase runs. The worker's title is
    # ray::RayTrainWorker, or ray::execute.<function> while Train V2 runs one of its named calls there.
    train_worker = ("ray::RayTrainWorker", "ray::execute.")
    assert [s for s in sockets if not is_loopback(s[1]) and not s[0].startswith(train_worker)] == []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    tables = [out.split("pipeline run")[0] for out, _ in outs]
    assert tables[0] == tables[1] and "joint" in tables[0]
    assert sorted("0 phases trained" in out for out, _ in outs) == [False, True]  # one trained, one reused
    # The terminal shows exitflow's lines only, relayed from the processes Ray runs, in order.
    for _, err in outs:
        assert "pid=" not in err and "Traceback" not in err and "Token authentication" not in err, err[-3000:]
    [trained_err] = [err for out, err in outs if "0 phases trained" not in out]
    lines = trained_err.splitlines()
    epochs = [i for i, line in enumerate(lines) if line.startswith("seed0/joint/P2 epoch ")]
    assert len(epochs) >= 2, trained_err[-3000:]  # from the Train worker
    assert max(epochs) < next(i for i, line in enumerate(lines) if line.startswith("done   seed0/joint/P2 "))

    runs = _read_store(work)
    assert [r for r in runs if r.info.status == "RUNNING"] == []
    for node in ("seed0/joint/P2", "seed0/joint/evaluate", "report"):
        assert len([r for r in runs if r.data.tags.get("exitflow.node") == node]) == 1, node
    assert len([r for r in runs if r.data.tags.get("exitflow.stage") == "pipeline" and r.info.status == "FINISHED"]) == 2
