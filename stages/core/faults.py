"""Fault hooks: named moments where a test kills a process, so that fault tests are deterministic.

The code calls `hit(fault, point, **context)` at each moment below; it does nothing unless
a fault of the plan (parsed from the driver's $EXITFLOW_FAULT and handed down explicitly) names
that point and its context matches. A fault fires once: the first process to fire it creates its
marker file (O_EXCL), so a re-run with the same variable, or a concurrent trial, passes by.

    EXITFLOW_FAULT="point=train.mid_epoch,target=driver,marker=/tmp/fired,lr=0.01"

A plan may hold several faults, separated by `;`, each with its own marker (one run that
recovers from a kill in P1's Train worker and then from one in the evaluate task, say).

- `point`: one of POINTS.
- `target`: `self` (the process at the point: a Train worker, a Tune trial, the Ray task that
  runs a stage) or `driver` (the `exitflow run` process, SIGKILLed from the point, which then
  stops dead so that nothing after the point happens).
- `action` (target self): `kill` (SIGKILL, as the OOM killer or a lost node), `raise` (an
  exception: a crash the code sees) or `nonfinite` (at `train.mid_epoch` only: the phase's
  trainable weights turn NaN, so the next step's loss is non-finite: a divergence at a known
  epoch and step, whatever the machine's floating point does).
- `settle_s`: seconds to wait at the point before firing (Ray Train registers a reported
  checkpoint asynchronously: a worker that dies right after reporting may die before it).
- any other key filters on the point's context: `phase`, `lr`, `epoch`, `node`, `search`.

Nothing here imports Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

FAULT_ENV = "EXITFLOW_FAULT"

# Each moment, and the process that stands at it.
POINTS: dict[str, str] = {
    "train.mid_epoch": "a training phase or trial, halfway through an epoch's batches (Train worker)",
    "train.epoch_end": "an epoch trained and scored, before it is reported and checkpointed (Train worker)",
    "train.stopped": "early stopping fired: the last epoch reported, the phase not yet ended (Train worker)",
    "search.start": "a learning-rate search, before its first trial (the stage's task)",
    "trial.start": "a trial starting; with one trial at a time, between two trials (Tune trial)",
    "search.end": "every trial ended, the stage run not yet closed (the stage's task)",
    "evaluate": "evaluation: logits computed, tables not yet stored (the stage's task)",
    "report": "the report: tables read, nothing stored yet (the stage's task)",
    "upload": "an artifact upload, its first file stored and the rest not (the stage's task)",
}
TARGETS = ("self", "driver")
ACTIONS = ("kill", "raise", "nonfinite")
NONFINITE_POINTS = ("train.mid_epoch",)  # where the process holds a net whose weights it can spoil
_RESERVED = ("point", "target", "action", "marker", "settle_s", "driver_pid")
DRIVER_STOP_S = 300.0  # how long a process that killed its driver waits to be reaped before exiting


class InjectedFault(RuntimeError):
    """The `raise` action of a fault hook."""


@dataclass(frozen=True)
class Fault:
    """One planned fault (see the module docstring for the fields)."""

    point: str
    marker: str  # absolute path: the fault fires only while it does not exist
    target: str = "self"
    action: str = "kill"
    settle_s: float = 0.0
    driver_pid: int = 0  # the driver's pid (target driver), filled in by the driver that parses the plan
    match: tuple[tuple[str, str], ...] = ()  # context filters, e.g. (("phase", "P1"), ("lr", "0.01"))

    @classmethod
    def parse(cls, text: str, driver_pid: int = 0) -> Fault:
        """`point=...,marker=...[,target=...][,action=...][,settle_s=...][,key=value...]`; ValueError if malformed."""
        try:
            kv = dict(item.split("=", 1) for item in text.split(",") if item)
        except ValueError:
            raise ValueError(f"{FAULT_ENV}: expected comma-separated key=value pairs, got {text!r}") from None
        for key in ("point", "marker"):
            if key not in kv:
                raise ValueError(f"{FAULT_ENV}: {key}= is required, got {text!r}")
        fault = cls(
            point=kv["point"], marker=kv["marker"], target=kv.get("target", "self"), action=kv.get("action", "kill"),
            settle_s=float(kv.get("settle_s", 0.0)), driver_pid=int(kv.get("driver_pid", driver_pid)),
            match=tuple(sorted((k, v) for k, v in kv.items() if k not in _RESERVED)),
        )
        if fault.point not in POINTS:
            raise ValueError(f"{FAULT_ENV}: unknown point {fault.point!r}; known: {sorted(POINTS)}")
        if fault.target not in TARGETS or fault.action not in ACTIONS:
            raise ValueError(f"{FAULT_ENV}: target is one of {TARGETS}, action one of {ACTIONS}; got {text!r}")
        if fault.action == "nonfinite" and (fault.target != "self" or fault.point not in NONFINITE_POINTS):
            raise ValueError(f"{FAULT_ENV}: action=nonfinite needs target=self at one of {NONFINITE_POINTS}; got {text!r}")
        if fault.target == "driver" and fault.driver_pid <= 0:
            raise ValueError(f"{FAULT_ENV}: target=driver needs the driver's pid")
        return fault

    def matches(self, point: str, context: dict[str, Any]) -> bool:
        return point == self.point and all(_same(context.get(k), v) for k, v in self.match)


def _same(value: Any, wanted: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return wanted.lower() in (("1", "true") if value else ("0", "false"))
    if isinstance(value, float):
        return value == float(wanted)
    return str(value) == wanted


Plan = tuple[Fault, ...]  # the faults of one run; empty: none


def parse_plan(text: str, driver_pid: int = 0) -> Plan:
    """`fault;fault;...` (see Fault.parse); ValueError if any is malformed or two share a marker."""
    plan = tuple(Fault.parse(part.strip(), driver_pid) for part in text.split(";") if part.strip())
    if len({f.marker for f in plan}) < len(plan):
        raise ValueError(f"{FAULT_ENV}: every fault of a plan needs a marker of its own, got {text!r}")
    return plan


def from_env(driver_pid: int | None = None) -> Plan:
    """The faults $EXITFLOW_FAULT plans, read by the driver (empty when unset)."""
    return parse_plan(os.environ.get(FAULT_ENV, ""), driver_pid if driver_pid is not None else os.getpid())


def _claim(marker: str) -> bool:
    """True for exactly one caller per marker: the one that creates the file."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def hit(plan: Plan, point: str, **context: Any) -> bool:
    """The moment `point` (with its context) is reached: fire the plan's faults planned here.

    True when a `nonfinite` fault fired: the caller then spoils its weights (`make_nonfinite`).
    """
    spoil = False
    for fault in plan:
        if fault.matches(point, context) and _claim(fault.marker):
            _fire(fault, point, context)
            spoil |= fault.action == "nonfinite"
    return spoil


def make_nonfinite(net: Any) -> None:
    """The `nonfinite` action: every trainable weight of `net` (a torch module) becomes NaN, so its next
    training loss is NaN, as after a real divergence."""
    import torch  # here, not at the top: the driver parses plans without needing torch for it

    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.fill_(float("nan"))


def _fire(fault: Fault, point: str, context: dict[str, Any]) -> None:
    with open(fault.marker, "w") as f:  # what fired where, for the test that planned it
        json.dump({"point": point, "context": context, "pid": os.getpid()}, f, default=str)
    time.sleep(fault.settle_s)
    if fault.target == "driver":
        with contextlib.suppress(ProcessLookupError):
            os.kill(fault.driver_pid, signal.SIGKILL)
        # Stop dead: whatever follows the point must not run; Ray reaps the job's processes.
        deadline = time.monotonic() + DRIVER_STOP_S
        while time.monotonic() < deadline:
            time.sleep(0.5)
        os._exit(1)
    if fault.action == "nonfinite":
        return  # the caller spoils its weights (hit's result)
    if fault.action == "raise":
        raise InjectedFault(f"injected fault at {point} ({', '.join(f'{k}={v}' for k, v in sorted(context.items()))})")
    os.kill(os.getpid(), signal.SIGKILL)
