"""Report rendering: the trade-off PNG and the budget text table."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt  # only to check that no figure leaks into pyplot's state
import numpy as np
import math

import pytest
import torch

from exitflow.stages.core.budgets import budget_table
from exitflow.stages.core.evaluation import threshold_curve
from exitflow.stages.core.report_plots import format_budget_table, interpolate_curves, plot_tradeoff

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _seed_curves(seed: int, shift: float) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (200,), generator=g)
    logits = torch.randn(3, 200, 4, generator=g) * torch.tensor([1.0, 2.0, 3.0]).view(-1, 1, 1)
    logits[:, torch.arange(200), labels] += 1.5 + shift
    exit_flops = [3e6, 6e6, 10e6]
    curve = threshold_curve(logits, labels, exit_flops, "max_softmax")
    fixed = (logits.argmax(-1) == labels).double().mean(1).numpy()
    return (curve["flops"], curve["accuracy"]), (np.array(exit_flops), fixed)


def test_plot_tradeoff_writes_png(tmp_path: Path) -> None:
    curves, fixed = {}, {}
    for i, regime in enumerate(("joint", "disjoint", "mixed")):
        pairs = [_seed_curves(seed, shift=0.3 * i) for seed in range(3)]
        curves[regime] = [c for c, _ in pairs]
        fixed[regime] = [f for _, f in pairs]
    figures_before = plt.get_fignums()
    out = plot_tradeoff(curves, fixed, backbone_flops=9e6, path=tmp_path / "plots" / "tradeoff.png", title="digits")
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert plt.get_fignums() == figures_before  # no figure leaked into pyplot's global state


def test_plot_tradeoff_single_seed(tmp_path: Path) -> None:
    curve, fixed = _seed_curves(0, 0.0)
    out = plot_tradeoff({"joint": [curve]}, {"joint": [fixed]}, 9e6, tmp_path / "one.png", "one seed")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_interpolate_curves_common_grid() -> None:
    a = (np.array([1.0, 2.0, 2.0, 4.0]), np.array([0.1, 0.2, 0.4, 0.5]))
    b = (np.array([0.0, 3.0]), np.array([0.0, 0.6]))
    grid, acc = interpolate_curves([a, b], num_points=5)
    assert grid[0] == 1.0 and grid[-1] == 3.0 and acc.shape == (2, 5)
    assert acc[0, 2] == pytest.approx(0.3)  # tie at FLOPs 2 averaged
    np.testing.assert_allclose(acc[1], grid * 0.2)


def test_format_budget_table() -> None:
    flops = np.array([1.0, 2.0, 3.0, 4.0])
    rows = budget_table(
        {"mixed": [(flops, np.array([0.5, 0.6, 0.7, 0.8]))], "joint": [(flops, np.array([0.4, 0.5, 0.6, 0.9]))] * 2},
        backbone_flops=4.0,
    )
    text = format_budget_table(rows, {"joint": {"P2": 1e-3}, "mixed": {"P1": 5e-4, "P2": 8e-4}})
    lines = text.splitlines()
    assert "0.25x" in lines[1] and "max" in lines[1] and "lr" in lines[1]
    assert lines[3].startswith("joint") and lines[4].startswith("mixed")  # paper order
    assert "50.00 ± 0.00" in lines[4] and "P1=0.0005 P2=0.0008" in lines[4]
    assert "90.00 ± 0.00" in lines[3]
    assert "lr" not in format_budget_table(rows, None).splitlines()[1]


def test_the_report_tabulates_calibration_per_exit_and_at_each_budget(tmp_path) -> None:  # noqa: ANN001
    import pyarrow as pa

    from exitflow.stages.core import report

    def curve(shift: float) -> pa.Table:  # three points at 25 %, 50 %, 100 % of the backbone's 100 FLOPs
        return pa.table({"criterion": ["max_softmax"] * 3, "threshold": [0.0, 0.5, 1.0], "flops": [25.0, 50.0, 100.0],
                         "accuracy": [0.5, 0.8, 0.9], "ece": [0.20 + shift, 0.10 + shift, 0.05 + shift]})

    def exits(shift: float) -> pa.Table:
        return pa.table({"exit": [0, 1], "flops": [25.0, 100.0], "accuracy": [0.5, 0.9], "ece": [0.3 + shift, 0.1 + shift]})

    keys = [("joint", 0), ("joint", 1), ("mixed", 0)]
    out = report.run({k: curve(0.02 * k[1]) for k in keys}, {k: exits(0.02 * k[1]) for k in keys}, 100.0,
                     [0.5, "max", 0.1], ["max_softmax"], tmp_path, "t")
    rows = {(r["criterion"], r["regime"], r["exit"], r["budget"]): r for r in out.calibration.to_pylist()}
    assert rows[("", "joint", 0, "")]["ece_mean"] == pytest.approx(0.31) and rows[("", "joint", 0, "")]["n_seeds"] == 2
    assert rows[("", "mixed", 1, "")]["ece_mean"] == pytest.approx(0.1)
    assert rows[("max_softmax", "joint", None, "0.5")]["ece_mean"] == pytest.approx(0.11)  # the 50 % point, both seeds
    assert rows[("max_softmax", "mixed", None, "max")]["ece_mean"] == pytest.approx(0.05)  # the most accurate point
    assert math.isnan(rows[("max_softmax", "joint", None, "0.1")]["ece_mean"])  # no point fits 10 %
