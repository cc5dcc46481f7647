"""The fault hooks (`stages/core/faults.py`): plans parse or fail clearly, and a fault fires once, where planned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exitflow.stages.core import faults


def test_a_plan_of_two_faults_each_with_its_marker(tmp_path: Path) -> None:
    plan = faults.parse_plan(f"point=evaluate,marker={tmp_path}/a ; point=train.mid_epoch,lr=0.01,epoch=1,marker={tmp_path}/b")
    assert [f.point for f in plan] == ["evaluate", "train.mid_epoch"]
    assert plan[1].match == (("epoch", "1"), ("lr", "0.01")) and plan[1].target == "self" and plan[1].action == "kill"
    assert faults.parse_plan("") == ()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("point=evaluate", "marker= is required"),
        ("point=nowhere,marker=/m", "unknown point"),
        ("point=evaluate,marker=/m,action=explode", "action one of"),
        ("point=evaluate,marker=/m,target=driver", "needs the driver's pid"),
        ("point=evaluate,marker=/m;point=report,marker=/m", "marker of its own"),
        ("evaluate", "key=value"),
    ],
)
def test_a_malformed_plan_says_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        faults.parse_plan(text)


def test_a_fault_fires_once_and_only_where_its_context_matches(tmp_path: Path) -> None:
    marker = tmp_path / "fired"
    plan = faults.parse_plan(f"point=train.epoch_end,action=raise,lr=0.01,epoch=1,marker={marker}")
    faults.hit(plan, "train.epoch_end", lr=0.003, epoch=1)  # another trial
    faults.hit(plan, "train.epoch_end", lr=0.01, epoch=0)  # another epoch
    faults.hit(plan, "train.mid_epoch", lr=0.01, epoch=1)  # another point
    assert not marker.exists()
    with pytest.raises(faults.InjectedFault, match="train.epoch_end"):
        faults.hit(plan, "train.epoch_end", lr=0.01, epoch=1, node="seed0/P1")
    assert json.loads(marker.read_text())["context"] == {"lr": 0.01, "epoch": 1, "node": "seed0/P1"}
    faults.hit(plan, "train.epoch_end", lr=0.01, epoch=1)  # the re-run passes by
