"""The fault matrix: `exitflow run` killed at every kind of moment, then the same command again.

Each cell plans one fault with the project's own hooks (`stages/core/faults.py`, $EXITFLOW_FAULT), so
the kill lands at exactly its moment: a SIGKILL of the driver (the `exitflow run` process), or of
the process standing at the moment (the worker training a phase, a Tune trial, the Ray task running
a stage). The study's phases have one worker each, so (`resources.trainer: auto`) each trains in its
stage's task or its trial's process, which is the worker killed; Ray Train's own workers are killed
in tests/test_train_stage.py and tests/test_tune.py, and its resume after a driver kill in
tests/test_faults.py.
Then the same command runs again, and the cell asserts:

1. the re-run exits 0;
2. no finished phase or trial (a run of it closed FINISHED when the first run ended) is trained
   again (epochs logged per phase and per trial, against the uninterrupted run: at most the epoch
   in flight at the kill may run twice, and the last epoch of a trial still closing then);
3. no run is left RUNNING;
4. the budget table is identical to the uninterrupted run's (same seeds, deterministic training);
5. no search's saved state is set aside as unresumable.

Cells share what they can: the suite's Ray session (each driver joins it with --address), its
MLflow server, and one experiment per kill target whose cells run in order. Before a cell, the
nodes from its moment on are forgotten (their runs deleted, their Ray storage removed), so each
cell trains only what its moment needs; the moments after a search's last trial keep its trials.
A killed driver ends its run, so each driver moment is a cell; killed workers are recovered
inside the run, so the worker moments share two runs (see WORKER_RUNS). The cells run in three
streams side by side (see STREAMS).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

# The module fixture (every cell: 7-10 min on 2 cores, up to ~12 on a slow day) runs inside the first test's timeout.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(3000)]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.yaml"
P1, P3, EVALUATE, REPORT = "seed0/P1", "seed0/disjoint/P3", "seed0/disjoint/evaluate", "report"
DOWNSTREAM = {P1: [P1, P3, EVALUATE, REPORT], P3: [P3, EVALUATE, REPORT], EVALUATE: [EVALUATE, REPORT], REPORT: [REPORT]}
# disjoint: a fixed-lr P1, then a search over two P3 learning rates. 1e-6 learns nothing, so its
# trial stops early (patience 1) at epoch 1; 3e-3 trains both epochs.
STUDY = [
    "regimes=[disjoint]", "net.width=8", "evaluation.thresholds=20", "resources.torch_threads=1",
    "phases.P1.max_epochs=2", "phases.P1.patience=3",
    "phases.P3.lr=[1.0e-6,3.0e-3]", "phases.P3.max_epochs=2", "phases.P3.patience=1",
]
# One `exitflow run` of a cell. The longest, the run with eight worker kills, took 780 s beside the
# other two streams on 2 cores (a 900 s limit failed it on a slower day): a hang, not a slow day, fails.
RUN_LIMIT_S = 1500
@dataclass(frozen=True)
class Moment:
    name: str
    fault: str  # point and context filters of EXITFLOW_FAULT
    first_node: str  # the node at the moment: it and everything after it run in the cell
    sets: tuple[str, ...] = ()  # for the cell's two runs alike (not in any cache key)
    # The search's trials are kept (their runs and Ray storage), only its stage run is forgotten:
    # the state a kill after the last trial leaves, reached without training the trials again.
    keep_trials: bool = False

    @property
    def point(self) -> str:
        return self.fault.split(",")[0].removeprefix("point=")


MOMENTS = [
    Moment("fixed-lr phase, mid-epoch", f"point=train.mid_epoch,node={P1},epoch=1", P1),
    Moment("start of a search", "point=search.start", P3),
    Moment("trial, mid-epoch", "point=train.mid_epoch,search=1,lr=0.003,epoch=1", P3),
    Moment("trial at its early-stopping point", "point=train.stopped,search=1,lr=1e-06", P3),
    Moment("between trials", "point=trial.start,lr=0.003", P3, ("search.max_concurrent_trials=1",)),
    Moment("after the last trial, stage run open", "point=search.end", P3, keep_trials=True),
    Moment("artifact upload (checkpoint)", "point=upload,path=checkpoint/model.pt", P3, keep_trials=True),
    Moment("evaluate", "point=evaluate", EVALUATE),
    Moment("report", "point=report", REPORT),
]
BY_NAME = {m.name: m for m in MOMENTS}
TARGETS = ("driver", "worker")
REPRODUCTION = "trial at its early-stopping point"  # the issue's report: a third run must succeed too
# A killed driver ends its run, so each of its moments is a cell of its own. A killed worker is
# recovered inside the run (Ray runs a stage's task again, Tune restarts a trial), so a run takes
# several worker kills whose recoveries do not share a budget: a node's task dies at most once per
# run, P1's twice (with one worker its task is also its worker: max_failures more retries), a trial
# twice (as the trial, and as its worker). The P3 task's second moment (search.end) gets a run of
# its own, with the kills of the nodes after it.
DOWNSTREAM_MOMENTS = ("after the last trial, stage run open", "evaluate", "report")
WORKER_RUNS = [
    tuple(m.name for m in MOMENTS if m.name not in DOWNSTREAM_MOMENTS),
    DOWNSTREAM_MOMENTS,
]
# Three streams of cells run side by side, each in an experiment and a Ray storage of its own, its
# cells in order (each starts from what the one before left), of about equal length. The first
# stream begins with the uninterrupted reference run, whose state its later cells start from.
REFERENCE = "reference"
STREAMS: list[list[Any]] = [
    [REFERENCE, ("driver", ("trial at its early-stopping point",)), ("driver", ("between trials",)),
     ("driver", ("after the last trial, stage run open",)), ("driver", ("artifact upload (checkpoint)",))],
    [("worker", WORKER_RUNS[0]), ("worker", WORKER_RUNS[1])],
    [("driver", ("fixed-lr phase, mid-epoch",)), ("driver", ("start of a search",)), ("driver", ("trial, mid-epoch",)),
     ("driver", ("evaluate",)), ("driver", ("report",))],
]
# (In the shared worker run, the checkpoint upload killed is P1's, the first of the run.)
TRAINING_POINTS = ("train.mid_epoch", "train.epoch_end")  # a kill here may cost the epoch in flight


@dataclass
class Cell:
    moments: list[Moment]
    target: str
    first: Any = None  # CompletedProcess of the run with the fault(s)
    rerun: Any = None
    third: Any = None  # REPRODUCTION/driver only: one more run
    fired: dict[str, dict[str, Any]] = field(default_factory=dict)  # per moment: what its marker recorded (point, context, pid)
    at_kill: dict[str, list[int]] = field(default_factory=dict)  # epochs logged per phase/trial after the first run
    finished_at_kill: set[str] = field(default_factory=set)  # phases/trials with a FINISHED run after the first run
    after: dict[str, list[int]] = field(default_factory=dict)  # ... after the re-run
    running: list[str] = field(default_factory=list)  # runs RUNNING after the re-run
    seconds: float = 0.0

    @property
    def in_flight_kills(self) -> int:
        """Kills that may land inside an epoch: each may cost that epoch once more."""
        return sum(m.point in TRAINING_POINTS for m in self.moments)


def _command(address: str, uri: str, experiment: str, storage: Path, sets: tuple[str, ...]) -> list[str]:
    all_sets = [*STUDY, f"tracking.experiment={experiment}", f"tracking.storage_path={storage}", *sets]
    return [sys.executable, "-m", "exitflow.pipeline.cli", "run", str(EXAMPLE), "--address", address, "--tracking-uri", uri,
            *[a for s in all_sets for a in ("--set", s)]]


def _run(cmd: list[str], cwd: Path, log: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run one `exitflow run`; its output also lands in files beside `cwd` (logs/LOG.out|err), readable
    while it runs, and a run past the limit fails the cell with the end of what it printed."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "EXITFLOW_FAULT")}
    # Train's metrics export feeds the Ray dashboard's charts, which no cell reads: a cost per run, off.
    env.update(PYTHONUNBUFFERED="1", RAY_TRAIN_METRICS_ENABLED="0")
    if fault:
        env["EXITFLOW_FAULT"] = fault
    logs = cwd.parent / "logs"
    logs.mkdir(exist_ok=True)
    out, err = logs / f"{log}.out", logs / f"{log}.err"
    with out.open("w") as o, err.open("w") as e:
        try:
            code = subprocess.run(cmd, cwd=cwd, env=env, stdout=o, stderr=e, text=True, timeout=RUN_LIMIT_S).returncode
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{log} ran past {RUN_LIMIT_S} s; it printed last:\n{err.read_text()[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, code, out.read_text(), err.read_text())


def table(proc: subprocess.CompletedProcess[str]) -> str:
    """The budget table a run printed: from its heading to the training-cost table (whose times
    are those of the runs that trained each phase, so they differ after a kill)."""
    text = proc.stdout.split("pipeline run")[0].split("training cost per regime")[0]
    return text[text.find("test accuracy (%)"):].strip()


def _experiment(c: MlflowClient, name: str) -> str:
    return c.get_experiment_by_name(name).experiment_id


def _phase_runs(c: MlflowClient, experiment: str) -> list[tuple[str, Any]]:
    """(ident, run) of every phase ('seed0/P1') and trial ('seed0/disjoint/P3 lr=0.003') run."""
    out = []
    for r in c.search_runs([_experiment(c, experiment)], max_results=5000):
        tags = r.data.tags
        if tags.get("exitflow.stage") == "train":
            out.append((tags["exitflow.node"], r))
        elif tags.get("exitflow.stage") == "trial":
            out.append((f"{tags['exitflow.node']} lr={float(r.data.params['lr']):g}", r))
    return out


def ledger(c: MlflowClient, experiment: str) -> dict[str, list[int]]:
    """Epochs logged per phase and per trial, over all their runs."""
    out: dict[str, list[int]] = {}
    for ident, r in _phase_runs(c, experiment):
        out.setdefault(ident, []).extend(m.step for m in c.get_metric_history(r.info.run_id, "train_loss"))
    return {k: sorted(v) for k, v in out.items()}


def finished(c: MlflowClient, experiment: str) -> set[str]:
    """Phases and trials with a run closed FINISHED. One that has logged its last epoch but is still
    closing (its checkpoint not yet registered by Ray Train) is not finished: a kill then may cost
    that epoch once more, as for any epoch in flight."""
    return {ident for ident, r in _phase_runs(c, experiment) if r.info.status == "FINISHED"}


def _forget(c: MlflowClient, experiment: str, storage: Path, nodes: list[str], keep_trials: bool) -> None:
    """Make the store and storage look as if `nodes` had never run (their runs deleted, their Ray
    state removed), or, with `keep_trials`, as if the first of them had died after its last trial."""
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return
    for r in c.search_runs([exp.experiment_id], max_results=5000):
        tags = r.data.tags
        if tags.get("exitflow.node") not in nodes:
            continue
        if keep_trials and tags.get("exitflow.node") == nodes[0]:
            if tags.get("exitflow.stage") != "trial":
                c.delete_run(r.info.run_id)
            continue
        key = (tags.get("exitflow.key") or tags.get("exitflow.search_key") or "").removeprefix("invalid:")
        for p in storage.glob(f"{key}-*") if key else []:
            shutil.rmtree(p)
        c.delete_run(r.info.run_id)


def _cell(cell: Cell, stream: int, c: MlflowClient, address: str, uri: str, root: Path) -> Cell:
    """Forget what the cell's first moment needs to run, run with its faults, run again."""
    experiment, storage, work = f"matrix-{stream}", root / f"ray-{stream}", root / f"work-{stream}"
    how = "target=driver" if cell.target == "driver" else "target=self,action=kill"
    plan = [(m, f"{m.fault},{how}") for m in cell.moments]
    start = time.monotonic()
    first = cell.moments[0]
    label = f"{cell.target}-{MOMENTS.index(first)}"
    _forget(c, experiment, storage, DOWNSTREAM[first.first_node], first.keep_trials)
    markers = {m.name: root / f"fired-{cell.target}-{MOMENTS.index(m)}" for m, _ in plan}
    cmd = _command(address, uri, experiment, storage, tuple(s for m in cell.moments for s in m.sets))
    cell.first = _run(cmd, work, f"{label}-first", ";".join(f"{fault},marker={markers[m.name]}" for m, fault in plan))
    cell.fired = {name: json.loads(p.read_text()) for name, p in markers.items() if p.exists()}
    cell.at_kill = ledger(c, experiment)
    cell.finished_at_kill = finished(c, experiment)
    cell.rerun = _run(cmd, work, f"{label}-rerun")
    cell.after = ledger(c, experiment)
    exp = _experiment(c, experiment)
    cell.running = [r.info.run_id for r in c.search_runs([exp], "attributes.status = 'RUNNING'", max_results=5000)]
    if cell.target == "driver" and first.name == REPRODUCTION:
        cell.third = _run(cmd, work, f"{label}-third")
    cell.seconds = time.monotonic() - start
    return cell


def _stream(stream: int, address: str, uri: str, root: Path) -> tuple[Any, dict[str, list[int]], list[Cell]]:
    """Run a stream's cells in order; the reference run (if the stream has it) and its ledger too."""
    c = MlflowClient(uri)
    (root / f"work-{stream}").mkdir()
    reference, reference_ledger, cells = None, {}, []
    for job in STREAMS[stream]:
        if job == REFERENCE:
            experiment = f"matrix-{stream}"
            reference = _run(_command(address, uri, experiment, root / f"ray-{stream}", ()), root / f"work-{stream}", REFERENCE)
            reference_ledger = ledger(c, experiment) if reference.returncode == 0 else {}
            continue
        target, names = job
        cells.append(_cell(Cell([BY_NAME[n] for n in names], target), stream, c, address, uri, root))
    return reference, reference_ledger, cells


@dataclass
class Matrix:
    reference: Any  # the uninterrupted run
    reference_ledger: dict[str, list[int]]
    cells: list[Cell]

    def cell(self, target: str, moment: str) -> Cell:
        return next(c for c in self.cells if c.target == target and any(m.name == moment for m in c.moments))


def retrained(cell: Cell) -> dict[str, list[int]]:
    """Epochs trained more than once, per phase or trial."""
    return {k: sorted(e for e, n in Counter(v).items() if n > 1) for k, v in cell.after.items() if len(set(v)) < len(v)}


def complete_at_kill(cell: Cell, reference: dict[str, list[int]]) -> list[str]:
    """Phases and trials finished when the first run ended: every epoch of the uninterrupted run
    logged, and a run closed FINISHED."""
    return [k for k, v in reference.items() if set(cell.at_kill.get(k, [])) >= set(v) and k in cell.finished_at_kill]


def closing_at_kill(cell: Cell, reference: dict[str, list[int]]) -> list[str]:
    """Phases and trials whose every epoch was logged but whose run was not yet FINISHED at the kill."""
    return [k for k, v in reference.items() if set(cell.at_kill.get(k, [])) >= set(v) and k not in cell.finished_at_kill]


def _summary_table(m: Matrix) -> str:
    lines = ["| moment | kill | first run | re-run | phases trained by the re-run | epochs trained twice | s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for moment in MOMENTS:
        for target in TARGETS:
            cell = m.cell(target, moment.name)
            shared = f" (one run, {len(cell.moments)} kills)" if len(cell.moments) > 1 else ""
            trained = next((line.split(",")[2].strip() for line in cell.rerun.stdout.splitlines() if "phases trained" in line), "?")
            again = ", ".join(f"{k} {v}" for k, v in retrained(cell).items()) or "none"
            lines.append(f"| {moment.name} | {target}{shared} | exit {cell.first.returncode} | exit {cell.rerun.returncode} | "
                         f"{trained} | {again} | {cell.seconds:.0f} |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def matrix(ray_address: str, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Matrix:
    root = tmp_path_factory.mktemp("matrix")
    with ThreadPoolExecutor(len(STREAMS)) as pool:
        streams = list(pool.map(lambda i: _stream(i, ray_address, mlflow_uri, root), range(len(STREAMS))))
    [(reference, reference_ledger)] = [(r, led) for r, led, _ in streams if r is not None]
    assert reference.returncode == 0, reference.stderr[-3000:]
    m = Matrix(reference, reference_ledger, [cell for _, _, cells in streams for cell in cells])
    summary = _summary_table(m)
    (root / "fault-matrix.md").write_text(summary + "\n")
    print("\n" + summary)  # the matrix as a table (pytest -s shows it; the file stays in the test's tmp folder)
    return m


def test_every_moment_is_killed_in_both_targets_once() -> None:
    planned = Counter((t, n) for stream in STREAMS for job in stream if job != REFERENCE for t, names in [job] for n in names)
    assert planned == Counter((t, m.name) for m in MOMENTS for t in TARGETS)


def test_the_uninterrupted_run_trains_what_the_cells_need(matrix: Matrix) -> None:
    assert matrix.reference_ledger == {P1: [0, 1], f"{P3} lr=1e-06": [0, 1], f"{P3} lr=0.003": [0, 1]}
    assert "disjoint" in table(matrix.reference) and "P3=0.003" in table(matrix.reference)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("moment", [m.name for m in MOMENTS])
def test_every_kill_then_a_rerun_recovers(matrix: Matrix, moment: str, target: str) -> None:
    cell = matrix.cell(target, moment)
    fired = cell.fired.get(moment, {})
    assert fired.get("point") == BY_NAME[moment].point, f"the fault never fired: {cell.first.stderr[-3000:]}"
    if target == "driver":
        assert cell.first.returncode == -9  # SIGKILLed at the moment
    else:  # a dead worker is restarted by Train, Tune or Ray (node tasks are retried): the run itself recovers
        assert cell.first.returncode == 0, cell.first.stderr[-3000:]
    # 1. the same command again completes
    assert cell.rerun.returncode == 0, cell.rerun.stderr[-3000:]
    # 2. nothing finished is trained again; every epoch of the uninterrupted run ran; at most the
    #    epoch in flight at a kill ran twice
    for ident, epochs in matrix.reference_ledger.items():
        assert set(cell.after.get(ident, [])) == set(epochs), (ident, cell.after)
    for ident in complete_at_kill(cell, matrix.reference_ledger):
        assert cell.after[ident] == cell.at_kill[ident], f"{ident} was finished at the kill and trained again"
    allowed = cell.in_flight_kills + len(closing_at_kill(cell, matrix.reference_ledger))
    assert sum(len(v) for v in retrained(cell).values()) <= allowed, retrained(cell)
    if target == "worker":
        assert cell.after == cell.at_kill and "0 phases trained" in cell.rerun.stdout  # the re-run: all cached
    # 3. no run left RUNNING
    assert cell.running == []
    # 4. the uninterrupted run's table
    assert table(cell.rerun) == table(matrix.reference)
    assert "Traceback" not in cell.rerun.stderr
    # Ray's notices (a worker died, a task runs again) are exitflow lines on stderr: stdout is the results
    assert "(raylet)" not in cell.first.stdout + cell.rerun.stdout
    if target == "worker":  # each worker run kills node tasks' processes
        assert "ray: A worker died" in cell.first.stderr, cell.first.stderr[-3000:]
        # and Ray's notice of the retry names the node (Ray names a task by its function)
        assert "ray: Task exitflow:" in cell.first.stderr and "_node_task" not in cell.first.stderr, cell.first.stderr[-3000:]
    # 5. every search state a kill leaves is resumed, never set aside for a fresh start
    assert "cannot resume its saved state" not in cell.first.stderr + cell.rerun.stderr


def test_the_issue_reproduction_a_trial_killed_at_its_stopping_point_then_two_reruns(matrix: Matrix) -> None:
    """Killed inside a searched trial at its early-stopping point: the re-run resumes the trial at
    its stopping point and keeps its recorded best state (it used to fail, and every run after it)."""
    cell = matrix.cell("driver", REPRODUCTION)
    context = cell.fired[REPRODUCTION]["context"]
    assert context["epoch"] == 1 and context["lr"] == 1e-6
    assert cell.rerun.returncode == 0, cell.rerun.stderr[-3000:]
    assert "already complete after epoch 1" in cell.rerun.stderr  # resumed at the stopping point, not retrained
    assert cell.third.returncode == 0 and "0 phases trained" in cell.third.stdout
    assert table(cell.third) == table(matrix.reference)
