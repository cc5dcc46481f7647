"""The report's training-cost table (`stages.core.report.training_costs`) and each phase's cost record."""

from __future__ import annotations

import pytest

from exitflow.pipeline.stage import RunSettings
from exitflow.stages.core.report import training_costs
from exitflow.stages.phase_kind import epoch_seconds, phase_cost


def _cost(phase: str, epochs: int, train: float, wall: float, resumed: bool = False) -> dict:
    return phase_cost(phase, RunSettings(num_workers=2, cpus_per_worker=2), epochs, train, wall, resumed)


def _lineages() -> dict:
    out = {}
    for seed in (0, 1):
        p1 = {f"seed{seed}/P1": _cost("P1", 10, 100.0 + seed, 130.0)}
        out[("joint", seed)] = {f"seed{seed}/joint/P2": _cost("P2", 8, 90.0, 110.0)}
        out[("disjoint", seed)] = {**p1, f"seed{seed}/disjoint/P3": _cost("P3", 6, 20.0, 40.0)}
        out[("mixed", seed)] = {**p1, f"seed{seed}/mixed/P2": _cost("P2", 4, 45.0, 60.0, resumed=seed == 1)}
    return out


def test_a_phase_records_its_epochs_time_and_device_hours() -> None:
    cost = _cost("P1", 10, 360.0, 400.0)
    assert cost == {"phase": "P1", "epochs": 10, "train_seconds": 360.0, "wall_seconds": 400.0, "device": "CPU",
                    "device_hours": pytest.approx(360.0 * 4 / 3600), "resumed": False, "ran_on": ""}  # 2 workers x 2 CPUs
    gpu = phase_cost("P2", RunSettings(num_workers=4, use_gpu=True, gpus_per_worker=1.0), 3, 3600.0, 3700.0, False)
    assert gpu["device"] == "GPU" and gpu["device_hours"] == pytest.approx(4.0)
    assert epoch_seconds([{"epoch_time": 1.5}, {"epoch_time": 2.0}, {}]) == 3.5


def test_each_regime_counts_what_is_behind_its_model_and_the_study_counts_a_shared_p1_once() -> None:
    table, text = training_costs(_lineages())
    rows = table.to_pylist()
    assert len(rows) == 2 * (1 + 2 + 2)
    assert {r["node"] for r in rows if r["shared"]} == {"seed0/P1", "seed1/P1"}  # disjoint and mixed both use it
    lines = {line.split()[0]: line.split() for line in text.splitlines()[3:] if line and line[0].isalpha() and "  " in line}
    # disjoint per seed: P1 (10 epochs, 100 / 101 s) + P3 (6 epochs, 20 s): 16 epochs, 120.5 s on average
    assert lines["disjoint"][-4:-1] == ["16", "120.5", "170.0"]
    assert "P1 (shared) + P3" in text
    # study per seed: P1 + joint P2 + P3 + mixed P2 = 10 + 8 + 6 + 4 epochs; P1 once
    assert lines["study"][-4:-1] == ["28", f"{(100.5 + 90 + 20 + 45):.1f}", f"{130 + 110 + 40 + 60:.1f}"]
    assert lines["study"][-1] == f"{(100.5 + 90 + 20 + 45) * 4 / 3600:.4f}"
    assert "CPU-hours" in text and "counts from its resume" in text  # seed1's mixed P2 resumed


def test_the_table_says_where_the_phases_ran_as_their_workers_saw_it() -> None:
    lineages = _lineages()
    lineages[("joint", 0)]["seed0/joint/P2"]["ran_on"] = "1 x NVIDIA H200 (nccl, bf16, channels_last)"
    table, text = training_costs(lineages)
    assert "ran on: 1 x NVIDIA H200 (nccl, bf16, channels_last)" in text
    assert table.to_pylist()[0]["ran_on"] in ("", "1 x NVIDIA H200 (nccl, bf16, channels_last)")
    assert "ran on" not in training_costs(_lineages())[1]  # costs recorded without the field print no line


def test_ran_on_names_only_what_the_device_did() -> None:
    import torch

    from exitflow.stages.core.loop import PhaseConfig
    from exitflow.stages.ray_train import ran_on

    # bf16 and channels_last are no-ops on a CPU: the record must not claim them
    assert ran_on(torch.device("cpu"), 1, PhaseConfig(bf16=True, channels_last=True)) == "1 x CPU (one process)"


def test_no_phase_no_table() -> None:
    table, text = training_costs({})
    assert table.num_rows == 0 and text == ""


def test_a_mean_over_seeds_of_epochs_is_rounded_like_the_other_columns() -> None:
    lineages = {("joint", seed): {f"seed{seed}/joint/P2": _cost("P2", epochs, 9.0, 10.0)} for seed, epochs in ((0, 13), (1, 14), (2, 14))}
    _, text = training_costs(lineages)
    [joint] = [line.split() for line in text.splitlines() if line.startswith("joint")]
    assert joint[3] == "13.7"  # (13 + 14 + 14) / 3, not 13.6667
