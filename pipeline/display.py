"""What the person running a study sees: one live display in a terminal, plain lines elsewhere.

The runner tells a display each node's state (pending, queued for room, running, cached, done,
failed, skipped) with the line plain output prints for it; the relay hands it the lines the
job's processes post, some carrying an event (a phase's epoch, a search's trial counts).

`PlainDisplay` prints the lines, as a log or CI wants them. `LiveDisplay` (rich) keeps a header
of state counts and a row per running or queued node, updated in place: a phase's epoch,
validation accuracy per exit and ETA; a search's trial counts and a row per running trial.
Finished nodes and warnings print above it, so the scroll-back keeps them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from exitflow.pipeline.events import EPOCH, SEARCH, Event
from exitflow.pipeline.stage import PHASE, role_of

STATES = ("pending", "queued", "running", "cached", "done", "failed", "skipped")
ACTIVE = ("running", "queued", "failed")  # the states a live display gives a row


class Display(Protocol):
    def plan(self, study: str, nodes: dict[str, str]) -> None:
        """The study's name and its nodes (id -> stage kind), all pending."""

    def node(self, node_id: str, state: str, line: str = "", why: str = "") -> None:
        """A node's new state; `line` is what plain output says of it ("" for nothing), `why` a
        queued node's reason."""

    def show(self, line: str, event: Event | None = None) -> None:
        """A line a process posted, with its event or None."""

    def note(self, line: str) -> None:
        """A line of the driver's own (where Ray's output goes, a recovered run...)."""

    def close(self) -> None:
        """The study is over (whatever the outcome): leave the terminal to what follows."""


class PlainDisplay:
    """Every line as it comes: what a log file, a pipe or CI should hold."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write

    def plan(self, study: str, nodes: dict[str, str]) -> None:
        pass

    def node(self, node_id: str, state: str, line: str = "", why: str = "") -> None:
        if line:
            self._write(line)

    def show(self, line: str, event: Event | None = None) -> None:
        self._write(line)

    def note(self, line: str) -> None:
        self._write(line)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- the live display's model


@dataclass
class Training:
    """A phase's (or one trial's) latest epoch."""

    epoch: int  # 0-based, as reported
    epochs: int  # the phase's maximum
    val_acc: list[float]
    seconds: list[float] = field(default_factory=list)  # each epoch's own time
    lr: float | None = None

    def eta(self) -> float | None:
        """Seconds to the phase's last epoch at the mean epoch time (early stopping may end it sooner)."""
        if not self.seconds:
            return None
        return sum(self.seconds) / len(self.seconds) * max(0, self.epochs - self.epoch - 1)


@dataclass
class NodeView:
    kind: str
    state: str = "pending"
    since: float = field(default_factory=time.monotonic)
    why: str = ""  # a queued node's reason
    training: Training | None = None  # a train node's phase
    trials: dict[str, Training] = field(default_factory=dict)  # a search's running trials, by name
    trial_counts: dict[str, int] = field(default_factory=dict)  # done, running, pending, total
    best: float | None = None  # a search's best validation score so far


class StudyView:
    """The state a live display draws, fed from the runner and the relay (thread-safe)."""

    def __init__(self) -> None:
        self.study = ""
        self.nodes: dict[str, NodeView] = {}
        self.started = time.monotonic()
        self.lock = threading.Lock()

    def plan(self, study: str, nodes: dict[str, str]) -> None:
        with self.lock:
            self.study = study
            self.nodes = {nid: NodeView(kind) for nid, kind in nodes.items()}

    def set_state(self, node_id: str, state: str, why: str = "") -> None:
        with self.lock:
            view = self.nodes.setdefault(node_id, NodeView(""))
            if view.state != state:
                view.since = time.monotonic()
            view.state, view.why = state, why

    def apply(self, event: Event) -> bool:
        """Take an event in; False when it names no node of the study (show its line instead)."""
        with self.lock:
            view = self.nodes.get(str(event.get("node")))
            if view is None:
                return False
            if event.get("kind") == EPOCH:
                trial = event.get("trial") or ""
                old = view.trials.get(trial) if trial else view.training
                seconds = (old.seconds if old is not None and old.epoch < event["epoch"] else [])
                now = Training(int(event["epoch"]), int(event["epochs"]), list(event["val_acc"]),
                               seconds + [float(event.get("seconds", 0.0))], event.get("lr"))
                if trial:
                    view.trials[trial] = now
                    score = event.get("score")
                    if score is not None and (view.best is None or score > view.best):
                        view.best = float(score)
                else:
                    view.training = now
                return True
            if event.get("kind") == SEARCH:
                view.trial_counts = {k: int(event[k]) for k in ("done", "running", "pending", "total") if k in event}
                for name in event.get("ended", ()):
                    view.trials.pop(name, None)
                return True
            return False

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for view in self.nodes.values():
            out[view.state] = out.get(view.state, 0) + 1
        return out


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _accuracies(val_acc: list[float]) -> str:
    return " ".join(f"{a:.2f}" for a in val_acc)


def describe_training(t: Training) -> str:
    """`epoch 3/10  val acc 0.52 0.71 0.93  ETA 0:14` (the accuracies per exit, the final one last)."""
    eta = t.eta()
    return (f"epoch {t.epoch + 1}/{t.epochs}  val acc {_accuracies(t.val_acc)}"
            + (f"  ETA {_clock(eta)}" if eta is not None else ""))


def describe_node(view: NodeView, now: float) -> str:
    """The detail column of a node's row."""
    if view.state == "queued":
        return f"waiting for room: {view.why}" if view.why else "waiting for room"
    if view.state != "running":
        return view.why
    if view.trial_counts:
        c = view.trial_counts
        text = f"trials {c.get('done', 0)}/{c.get('total', '?')} done, {c.get('running', 0)} running"
        return text + (f"  best score {view.best:.3f}" if view.best is not None else "")
    if view.training is not None:
        return describe_training(view.training)
    if role_of(view.kind) == PHASE:  # a phase's first epoch waits for its workers to start
        return f"starting workers ({_clock(now - view.since)})"
    return f"running for {_clock(now - view.since)}"


def header(view: StudyView, now: float) -> str:
    counts = view.counts()
    parts = [f"{counts[s]} {s}" for s in STATES if counts[s]]
    return f"exitflow {view.study}: {', '.join(parts)}  ({_clock(now - view.started)})"


# ----------------------------------------------------------------------------- the live display


class LiveDisplay:
    """A rich Live view on the terminal: a header, a row per running or queued node; finished nodes,
    warnings and failures print above it."""

    def __init__(self, console: Any = None, refresh_per_second: float = 4) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = console or Console(stderr=True)
        self.view = StudyView()
        self.footer = ""  # where Ray's own output goes
        # Live redirects this process's own stdout/stderr writes above the view, so none tears it.
        self._live = Live(console=self.console, refresh_per_second=refresh_per_second, transient=False,
                          get_renderable=self._render)
        self._started = False

    def _print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def plan(self, study: str, nodes: dict[str, str]) -> None:
        self.view.plan(study, nodes)
        if not self._started:
            self._started = True
            self._live.start()

    def node(self, node_id: str, state: str, line: str = "", why: str = "") -> None:
        self.view.set_state(node_id, state, why)
        if line and state not in ("queued", "running"):  # the row says those, kept up to date
            self._print(line)

    def show(self, line: str, event: Event | None = None) -> None:
        if event is not None and self.view.apply(event):
            if event.get("kind") == SEARCH and event.get("ended"):
                self._print(line)  # a trial that ended: worth a line in the scroll-back
            return
        self._print(line)

    def note(self, line: str) -> None:
        if line.startswith("Ray's own output: "):
            self.footer = line
            return
        self._print(line)

    def _render(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        now = time.monotonic()
        with self.view.lock:
            top = Text(header(self.view, now), style="bold")
            table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
            table.add_column("node", no_wrap=True)
            table.add_column("kind", style="dim", no_wrap=True)
            table.add_column("state", no_wrap=True)
            table.add_column("detail", overflow="fold")
            style = {"running": "cyan", "queued": "yellow", "failed": "red"}
            for nid, node in self.view.nodes.items():
                if node.state not in ACTIVE:
                    continue
                table.add_row(nid, node.kind, Text(node.state, style=style[node.state]), describe_node(node, now))
                for name, trial in node.trials.items():
                    lr = f"lr={trial.lr:g}" if trial.lr is not None else name
                    table.add_row("", "", Text("trial", style="dim"), f"{lr}  {describe_training(trial)}")
            parts: list[Any] = [top, table] if table.row_count else [top]
            if self.footer:
                parts.append(Text(self.footer, style="dim"))
        return Group(*parts)

    def close(self) -> None:
        if self._started:
            self._live.refresh()
            self._live.stop()
            self._started = False


def choose_display(write: Callable[[str], None], plain: bool = False) -> Display:
    """Live on a terminal (stderr), plain lines otherwise or when asked."""
    if not plain:
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal and not console.is_dumb_terminal:
            return LiveDisplay(console)
    return PlainDisplay(write)
