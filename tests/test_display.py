"""The run's display: plain lines off a terminal, one live view on it (the end-to-end run under a
pseudo-terminal is in test_faults.py)."""

from __future__ import annotations

import io
import time

from rich.console import Console

from exitflow.pipeline.display import (EPOCH, SEARCH, LiveDisplay, PlainDisplay, StudyView, Training, choose_display,
                              describe_training)

NODES = {"seed0/P1": "train", "seed0/joint/P2": "tune", "seed0/mixed/P2": "train", "evaluate": "evaluate", "report": "report"}


def _epoch(node: str, epoch: int, epochs: int = 10, trial: str = "", lr: float | None = None, seconds: float = 2.0,
           score: float = 0.5) -> dict:
    return {"kind": EPOCH, "node": node, "trial": trial, "lr": lr, "epoch": epoch, "epochs": epochs,
            "val_acc": [0.5, 0.75, 0.9], "score": score, "seconds": seconds}


def _live() -> tuple[LiveDisplay, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    return LiveDisplay(console, refresh_per_second=20), out


def _frame(display: LiveDisplay) -> str:
    """What the live view draws now, as text."""
    buf = io.StringIO()
    Console(file=buf, width=160, color_system=None).print(display._render())
    return buf.getvalue()


def test_plain_display_prints_every_line_it_is_given() -> None:
    lines: list[str] = []
    d = PlainDisplay(lines.append)
    d.plan("s", NODES)
    d.node("seed0/P1", "running")  # no line: plain output says nothing of a start
    d.node("seed0/P1", "queued", "waiting seed0/P1: needs 3 CPU", why="needs 3 CPU")
    d.show("seed0/P1 epoch 0: ...", _epoch("seed0/P1", 0))
    d.show("digits: ok")
    d.node("seed0/P1", "done", "done    seed0/P1 ...")
    d.note("Ray's own output: /tmp/x")
    assert lines == ["waiting seed0/P1: needs 3 CPU", "seed0/P1 epoch 0: ...", "digits: ok", "done    seed0/P1 ...",
                     "Ray's own output: /tmp/x"]


def test_an_epoch_event_updates_the_phase_and_its_eta() -> None:
    view = StudyView()
    view.plan("s", NODES)
    view.set_state("seed0/P1", "running")
    assert view.apply(_epoch("seed0/P1", 0, seconds=2.0))
    assert view.apply(_epoch("seed0/P1", 1, seconds=4.0))
    t = view.nodes["seed0/P1"].training
    assert t is not None and t.epoch == 1 and t.seconds == [2.0, 4.0]
    assert t.eta() == 3.0 * 8  # mean epoch time x the 8 epochs left
    assert not view.apply(_epoch("not/a/node", 0))  # an unknown node's line is shown as a line
    # A resumed phase re-reports from its checkpoint: the times restart, never mix attempts
    assert view.apply(_epoch("seed0/P1", 1, seconds=1.0))
    assert view.nodes["seed0/P1"].training.seconds == [1.0]
    assert describe_training(Training(2, 10, [0.5, 0.91], [5.0, 5.0])) == "epoch 3/10  val acc 0.50 0.91  ETA 0:35"


def test_a_search_shows_its_trial_counts_and_running_trials() -> None:
    view = StudyView()
    view.plan("s", NODES)
    view.set_state("seed0/joint/P2", "running")
    view.apply({"kind": SEARCH, "node": "seed0/joint/P2", "done": 0, "running": 2, "pending": 1, "total": 3, "ended": []})
    view.apply(_epoch("seed0/joint/P2", 0, trial="t1", lr=1e-3, score=0.4))
    view.apply(_epoch("seed0/joint/P2", 0, trial="t2", lr=1e-2, score=0.7))
    node = view.nodes["seed0/joint/P2"]
    assert set(node.trials) == {"t1", "t2"} and node.best == 0.7 and node.training is None
    view.apply({"kind": SEARCH, "node": "seed0/joint/P2", "done": 1, "running": 2, "pending": 0, "total": 3, "ended": ["t2"]})
    assert set(node.trials) == {"t1"} and node.trial_counts == {"done": 1, "running": 2, "pending": 0, "total": 3}


def test_the_live_view_has_a_row_per_active_node_and_prints_what_finished() -> None:
    d, out = _live()
    try:
        d.note("recovered: run abc")  # before the view: a plain line
        d.plan("digits-study", NODES)
        d.node("seed0/P1", "cached", "cached  seed0/P1 train 12.0s")
        d.node("seed0/joint/P2", "running")
        d.node("seed0/mixed/P2", "queued", "waiting seed0/mixed/P2: needs 3 CPU", why="needs 3 CPU; 3 of 4 held")
        d.note("Ray's own output: /tmp/ray/session_x/logs")
        d.show("seed0/joint/P2: trial lr=0.001 started (0 of 2 done, 1 running)",
               {"kind": SEARCH, "node": "seed0/joint/P2", "done": 0, "running": 1, "pending": 1, "total": 2, "ended": []})
        d.show("seed0/joint/P2 epoch 2: train_loss ...", _epoch("seed0/joint/P2", 2, trial="t1", lr=1e-3))
        d.show("digits: 1437 train / 360 val / 360 test")  # no event: printed above the view
        frame = _frame(d)
        assert frame.startswith("exitflow digits-study: 2 pending, 1 queued, 1 running, 1 cached")
        assert "trials 0/2 done, 1 running" in frame
        assert "lr=0.001  epoch 3/10  val acc 0.50 0.75 0.90  ETA 0:14" in frame
        assert "waiting for room: needs 3 CPU; 3 of 4 held" in frame
        assert "Ray's own output: /tmp/ray/session_x/logs" in frame
        assert "seed0/P1" not in frame  # cached: counted in the header, printed above
        d.node("seed0/joint/P2", "done", "done    seed0/joint/P2 tune 30.0s")
        d.node("seed0/mixed/P2", "failed", "FAILED  seed0/mixed/P2: PhaseDiverged: ...", why="PhaseDiverged: ...")
        assert "FAILED" not in _frame(d).split("\n")[0] and "PhaseDiverged" in _frame(d)  # a failed node keeps its row
    finally:
        d.close()
    text = out.getvalue()
    for line in ("recovered: run abc", "cached  seed0/P1 train 12.0s", "digits: 1437 train / 360 val / 360 test",
                 "done    seed0/joint/P2 tune 30.0s", "FAILED  seed0/mixed/P2: PhaseDiverged: ..."):
        assert line in text
    assert "epoch 2: train_loss" not in text  # an event's line is the row, not scroll-back
    assert "waiting seed0/mixed/P2" not in text


def test_a_running_node_without_epochs_says_how_long_it_has_run() -> None:
    d, _ = _live()
    d.view.plan("s", NODES)
    d.view.set_state("evaluate", "running")
    d.view.set_state("seed0/P1", "running")
    d.view.nodes["evaluate"].since = d.view.nodes["seed0/P1"].since = time.monotonic() - 65
    frame = _frame(d)
    assert "running for 1:05" in frame and "starting workers (1:05)" in frame


def test_choose_display_is_plain_off_a_terminal_or_when_asked(capsys) -> None:
    assert isinstance(choose_display(print), PlainDisplay)  # pytest's captured stderr is no terminal
    assert isinstance(choose_display(print, plain=True), PlainDisplay)
