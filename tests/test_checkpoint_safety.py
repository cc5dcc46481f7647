"""Checkpoints in shared storage are read as tensors and plain values only: a file crafted to run code
when unpickled is refused unread, and a phase that would resume from it starts afresh, saying why."""

from __future__ import annotations

import logging
import pathlib
import pickle
from pathlib import Path

import pytest
import torch
from helpers import phase_job


class _RunsCode:
    """Unpickling this calls `Path.touch(marker)`: what an attacker's file would do, made visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (pathlib.Path.touch, (self.marker,))


def _plant(path: Path, marker: Path) -> None:
    """A checkpoint as torch.save writes one, whose unpickling would call code."""
    torch.save({"epoch": 0, "net": _RunsCode(marker)}, path)


def test_a_state_file_that_would_run_code_is_refused_unread(tmp_path: Path) -> None:
    from exitflow.stages.checkpoints import UnreadableCheckpoint, read_state

    good = tmp_path / "good.pt"
    torch.save({"epoch": 3, "net": {"w": torch.ones(2)}, "history": [{"epoch": 3.0}]}, good)
    assert read_state(good)["epoch"] == 3
    marker, bad = tmp_path / "code-ran", tmp_path / "state.pt"
    _plant(bad, marker)
    with pytest.raises(UnreadableCheckpoint, match="refused unread") as info:
        read_state(bad)
    assert not marker.exists()
    assert "weights_only=False" not in str(info.value)  # torch's advice is never passed on
    (tmp_path / "cut.pt").write_bytes(b"truncated")
    with pytest.raises(UnreadableCheckpoint, match="cannot be read"):
        read_state(tmp_path / "cut.pt")
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(_RunsCode(marker)))  # a bare pickle: not torch's format either
    with pytest.raises(UnreadableCheckpoint):
        read_state(tmp_path / "raw.pt")
    assert not marker.exists()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_phase_resuming_from_a_planted_pickle_starts_afresh_and_runs_nothing(
    ray_session: None, storage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from exitflow.stages.ray_train import STATE_FILE, fit_with_torch_trainer, scaling_config

    scaling = scaling_config(1, False, 1.0, 0.0)
    fit_with_torch_trainer(phase_job(1), scaling, "planted", storage, max_failures=0, in_process=True)
    states = list(Path(storage).glob(f"planted/checkpoint_*/{STATE_FILE}"))
    assert states
    marker = tmp_path / "code-ran"
    for state in states:  # whoever can write to the storage replaces the checkpoint
        _plant(state, marker)
    with caplog.at_level(logging.WARNING, logger="exitflow.stages.ray_train"):
        outcome = fit_with_torch_trainer(phase_job(2), scaling, "planted", storage, max_failures=0, in_process=True)
    assert not marker.exists()
    assert outcome.resumed_at is None and [int(m["epoch"]) for m in outcome.history] == [0, 1]  # from scratch
    assert any("starting the phase afresh" in r.getMessage() and "refused unread" in r.getMessage() for r in caplog.records)
