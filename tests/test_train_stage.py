"""The train stage on real Ray Train V2: 2-worker gloo DDP, resume after an interruption, worker faults."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import phase_job

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def test_two_worker_gloo_ddp_checkpoint_loads_into_fresh_net(ray_session: None, storage: str, tmp_path: Path) -> None:
    from stages.core.nets import create_net
    from stages.train import run_phase, scaling_config

    job = phase_job(max_epochs=2)
    outcome = run_phase(job, scaling_config(2, False, 1.0, 0.0), "ddp", storage, max_failures=0)
    assert outcome.epochs_run == 2
    assert outcome.best_val["val_acc_final"] > 0.5  # two epochs of real learning, sharded over 2 ranks
    net = create_net(job.net)
    net.load_state_dict(outcome.best_state)  # strict: no `module.` prefixes, nothing missing
    for name, value in net.state_dict().items():
        assert torch.equal(value, outcome.best_state[name]), name
    net.eval()
    with torch.no_grad():
        outs = net(torch.zeros(3, 1, 8, 8))
    assert len(outs) == net.num_exits and outs[-1].shape == (3, 10)
    # Train's default actors for a fit, less Ray Data's (a phase passes no datasets: stages.train.PhaseTrainer)
    from ray.util.state import list_actors

    started = {a.class_name for a in list_actors(limit=10_000, raise_on_missing_output=False)}
    assert {"TrainController", "SynchronizationActor", "PlacementGroupCleaner"} <= started and "DatasetManager" not in started


def test_interrupted_phase_resumes_from_its_checkpoint(ray_session: None, storage: str, tmp_path: Path) -> None:
    from ray.train import TrainingFailedError

    from stages.train import run_phase, scaling_config

    marker = tmp_path / "fault-fired"
    scaling = scaling_config(1, False, 1.0, 0.0)
    with pytest.raises(TrainingFailedError):
        run_phase(phase_job(4, f"point=train.epoch_end,epoch=2,action=raise,settle_s=5,marker={marker}"), scaling, "resume", storage, max_failures=0)
    assert marker.exists()
    outcome = run_phase(phase_job(4), scaling, "resume", storage, max_failures=0)
    assert outcome.resumed_at == 2  # epochs 0-1 came from the checkpoint, not from a fresh start
    assert [int(m["epoch"]) for m in outcome.history] == [0, 1, 2, 3]
    assert [m["resumed_at"] for m in outcome.history] == [-1.0, -1.0, 2.0, 2.0]


def test_killed_worker_restarts_from_last_checkpoint(ray_session: None, storage: str, tmp_path: Path) -> None:
    from stages.train import run_phase, scaling_config

    marker = tmp_path / "worker-killed"
    job = phase_job(3, f"point=train.epoch_end,epoch=1,settle_s=5,marker={marker}")
    outcome = run_phase(job, scaling_config(1, False, 1.0, 0.0), "killed", storage, max_failures=1)
    assert marker.exists()  # the worker process really died (SIGKILL) in epoch 1
    assert outcome.resumed_at == 1
    assert outcome.epochs_run == 3


def test_a_phase_whose_checkpoint_cannot_be_read_starts_afresh(ray_session: None, storage: str) -> None:
    from stages.train import STATE_FILE, run_phase, scaling_config

    scaling = scaling_config(1, False, 1.0, 0.0)
    run_phase(phase_job(1), scaling, "unreadable", storage, max_failures=0)
    states = list(Path(storage).glob(f"unreadable/checkpoint_*/{STATE_FILE}"))
    assert states
    for state in states:
        state.write_bytes(b"truncated")  # what a disk that filled up mid-write leaves
    outcome = run_phase(phase_job(2), scaling, "unreadable", storage, max_failures=0)
    assert outcome.resumed_at is None and [int(m["epoch"]) for m in outcome.history] == [0, 1]  # from scratch
