"""The train stage on real Ray Train V2: 2-worker gloo DDP, resume after an interruption, worker faults."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import phase_job

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def test_two_worker_gloo_ddp_checkpoint_loads_into_fresh_net(ray_dashboard: str, storage: str, tmp_path: Path) -> None:
    from exitflow.stages.core.nets import create_net
    from exitflow.stages.ray_train import fit_with_torch_trainer, scaling_config

    job = phase_job(max_epochs=2)
    outcome = fit_with_torch_trainer(job, scaling_config(2, False, 1.0, 0.0), "ddp", storage, max_failures=0)
    assert outcome.epochs_run == 2
    assert outcome.best_val["val_acc_final"] > 0.5  # two epochs of real learning, sharded over 2 ranks
    net = create_net(job.net)
    net.load_state_dict(outcome.best_state_dict)  # strict: no `module.` prefixes, nothing missing
    for name, value in net.state_dict().items():
        assert torch.equal(value, outcome.best_state_dict[name]), name
    net.eval()
    with torch.no_grad():
        outs = net(torch.zeros(3, 1, 8, 8))
    assert len(outs) == net.num_exits and outs[-1].shape == (3, 10)
    # Train's default actors for a fit, less Ray Data's (a phase passes no datasets: stages.ray_train.PhaseTrainer)
    from ray.util.state import list_actors

    started = {a.class_name for a in list_actors(ray_dashboard, limit=10_000, raise_on_missing_output=False)}
    assert {"TrainController", "SynchronizationActor", "PlacementGroupCleaner"} <= started and "DatasetManager" not in started


def test_interrupted_phase_resumes_from_its_checkpoint(ray_session: None, storage: str, tmp_path: Path) -> None:
    from ray.train import TrainingFailedError

    from exitflow.stages.ray_train import fit_with_torch_trainer, scaling_config

    marker = tmp_path / "fault-fired"
    scaling = scaling_config(1, False, 1.0, 0.0)
    with pytest.raises(TrainingFailedError):
        fit_with_torch_trainer(phase_job(4, f"point=train.epoch_end,epoch=2,action=raise,settle_s=5,marker={marker}"), scaling, "resume", storage, max_failures=0)
    assert marker.exists()
    outcome = fit_with_torch_trainer(phase_job(4), scaling, "resume", storage, max_failures=0)
    assert outcome.resumed_at == 2  # epochs 0-1 came from the checkpoint, not from a fresh start
    assert [int(m["epoch"]) for m in outcome.history] == [0, 1, 2, 3]
    assert [m["resumed_at"] for m in outcome.history] == [-1.0, -1.0, 2.0, 2.0]


def test_killed_worker_restarts_from_last_checkpoint(ray_session: None, storage: str, tmp_path: Path) -> None:
    from exitflow.stages.ray_train import fit_with_torch_trainer, scaling_config

    marker = tmp_path / "worker-killed"
    job = phase_job(3, f"point=train.epoch_end,epoch=1,settle_s=5,marker={marker}")
    outcome = fit_with_torch_trainer(job, scaling_config(1, False, 1.0, 0.0), "killed", storage, max_failures=1)
    assert marker.exists()  # the worker process really died (SIGKILL) in epoch 1
    assert outcome.resumed_at == 1
    assert outcome.epochs_run == 3


def test_a_phase_whose_checkpoint_cannot_be_read_starts_afresh(ray_session: None, storage: str) -> None:
    from exitflow.stages.ray_train import STATE_FILE, fit_with_torch_trainer, scaling_config

    scaling = scaling_config(1, False, 1.0, 0.0)
    fit_with_torch_trainer(phase_job(1), scaling, "unreadable", storage, max_failures=0)
    states = list(Path(storage).glob(f"unreadable/checkpoint_*/{STATE_FILE}"))
    assert states
    for state in states:
        state.write_bytes(b"truncated")  # what a disk that filled up mid-write leaves
    outcome = fit_with_torch_trainer(phase_job(2), scaling, "unreadable", storage, max_failures=0)
    assert outcome.resumed_at is None and [int(m["epoch"]) for m in outcome.history] == [0, 1]  # from scratch


# ------------------------------------------------------------------ one worker, in its stage's own process


def _in_task(job, name: str, storage: str, max_failures: int, retries: int):  # noqa: ANN001, ANN202
    """fit_with_torch_trainer in process, inside a Ray task (as the train stage runs it): a kill takes the task."""
    import ray

    from exitflow.stages.ray_train import fit_with_torch_trainer, scaling_config

    def fit():  # noqa: ANN202
        return fit_with_torch_trainer(job, scaling_config(1, False, 1.0, 0.0), name, storage, max_failures, in_process=True)

    return ray.get(ray.remote(num_cpus=1, max_retries=retries)(fit).remote())


def test_in_process_a_phase_trains_without_ray_train_and_equals_its_ray_train_twin(ray_dashboard: str, storage: str) -> None:
    from ray.util.state import list_actors

    from exitflow.stages.ray_train import fit_with_torch_trainer, scaling_config

    controllers = sum(a.class_name == "TrainController" for a in list_actors(ray_dashboard, limit=10_000, raise_on_missing_output=False))
    local = _in_task(phase_job(2), "in-process", storage, 0, 0)
    assert sum(a.class_name == "TrainController" for a in list_actors(ray_dashboard, limit=10_000, raise_on_missing_output=False)) == controllers
    trained = fit_with_torch_trainer(phase_job(2), scaling_config(1, False, 1.0, 0.0), "under-train", storage, max_failures=0)
    # the same seed, data and device: the same epochs, bit for bit
    assert [m["train_loss"] for m in local.history] == [m["train_loss"] for m in trained.history]
    for name, value in trained.best_state_dict.items():
        assert torch.equal(value, local.best_state_dict[name]), name
    assert (local.ran_on, trained.ran_on) == ("1 x CPU (one process)", "1 x CPU (gloo)")  # Train makes a group of one
    assert local.nodes == trained.nodes  # the Ray nodes of the workers that trained it
    # its checkpoints lie where Train's would, named like Train's, the two newest kept
    assert len(list(Path(storage).glob("in-process/checkpoint_*/progress.json"))) == 2


def test_in_process_a_killed_task_resumes_from_its_last_checkpoint(ray_session: None, storage: str, tmp_path: Path) -> None:
    marker = tmp_path / "task-killed"
    job = phase_job(3, f"point=train.epoch_end,epoch=1,marker={marker}")  # SIGKILL of the process at the point
    outcome = _in_task(job, "killed-in-process", storage, 0, 1)  # Ray runs the task again
    assert marker.exists()
    assert outcome.resumed_at == 1 and [int(m["epoch"]) for m in outcome.history] == [0, 1, 2]
    assert [m["resumed_at"] for m in outcome.history] == [-1.0, 1.0, 1.0]


def test_in_process_a_failed_attempt_resumes_max_failures_times_then_raises(ray_session: None, storage: str,
                                                                            tmp_path: Path) -> None:
    from exitflow.stages.core.faults import InjectedFault
    from exitflow.stages.ray_train import fit_with_torch_trainer, scaling_config

    scaling = scaling_config(1, False, 1.0, 0.0)
    first, second = tmp_path / "first", tmp_path / "second"
    fault = (f"point=train.epoch_end,epoch=1,action=raise,marker={first};"
             f"point=train.epoch_end,epoch=2,action=raise,marker={second}")
    outcome = fit_with_torch_trainer(phase_job(3, fault), scaling, "retried", storage, max_failures=2, in_process=True)
    assert first.exists() and second.exists()
    assert [int(m["epoch"]) for m in outcome.history] == [0, 1, 2] and outcome.resumed_at == 1
    again = tmp_path / "again"
    with pytest.raises(InjectedFault):
        fit_with_torch_trainer(phase_job(2, f"point=train.epoch_end,epoch=0,action=raise,marker={again}"), scaling, "no-retry", storage,
                  max_failures=0, in_process=True)


def test_in_process_a_checkpoint_that_cannot_be_read_starts_the_phase_afresh(ray_session: None, storage: str) -> None:
    from exitflow.stages.ray_train import STATE_FILE, fit_with_torch_trainer, scaling_config

    scaling = scaling_config(1, False, 1.0, 0.0)
    fit_with_torch_trainer(phase_job(1), scaling, "unreadable-in-process", storage, max_failures=0, in_process=True)
    for state in Path(storage).glob(f"unreadable-in-process/checkpoint_*/{STATE_FILE}"):
        state.write_bytes(b"truncated")
    outcome = fit_with_torch_trainer(phase_job(2), scaling, "unreadable-in-process", storage, max_failures=0, in_process=True)
    assert outcome.resumed_at is None and [int(m["epoch"]) for m in outcome.history] == [0, 1]


def test_a_save_cut_short_is_never_read_and_pruning_keeps_the_two_newest(tmp_path: Path) -> None:
    from exitflow.stages.checkpoints import PROGRESS_FILE, CheckpointStore

    store = CheckpointStore(str(tmp_path), "run")
    state = {"epoch": 0, "history": [{"epoch": 0}], "early_stopping": {}, "config": {"max_epochs": 3}}
    paths = [store.save({**state, "epoch": e}) for e in range(3)]
    assert store.latest() == paths[-1] and not Path(paths[0]).exists() and Path(paths[1]).exists()
    cut = Path(store.run_dir) / "checkpoint_9999-12-31_23-59-59.999999"  # newer, but its progress never landed
    cut.mkdir()
    (cut / "state.pt").write_bytes(b"half")
    (cut / f"{PROGRESS_FILE}.partial").write_text("{")
    assert store.latest() == paths[-1] and store.load(store.latest())["epoch"] == 2
