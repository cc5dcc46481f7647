"""The per-phase learning-rate search on real Ray Tune over Ray Train V2, and its MLflow record."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray.cloudpickle
from helpers import phase_job, runs, tiny_spec
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

# Trial functions are pickled into Ray workers, which cannot import this test module by name.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NAME = "tune-grid"
GRID = [1e-3, 5e-3]  # a real choice between two rates; each more is three more trials
SEARCHED = [f"phases.{p}.lr=[{','.join(map(str, GRID))}]" for p in ("P1", "P2", "P3")]


@pytest.fixture(scope="module")
def study(ray_session: None, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """disjoint + mixed: one search per phase kind (P1 shared, P2, P3), three learning rates each."""
    from exitflow.pipeline.runner import run_study

    storage = tmp_path_factory.mktemp("ray")
    return run_study(tiny_spec(storage, f"name={NAME}", "regimes=[disjoint,mixed]", *SEARCHED), mlflow_uri)


@pytest.fixture(scope="module")
def client(mlflow_uri: str) -> MlflowClient:
    return MlflowClient(mlflow_uri)


SEARCHES = ["seed0/P1", "seed0/disjoint/P3", "seed0/mixed/P2"]


@pytest.mark.parametrize("node", SEARCHES)
def test_every_phase_searches_the_grid_and_logs_every_trial(study: Any, client: MlflowClient, node: str) -> None:
    from exitflow.pipeline.artifacts import ArtifactStore

    result = study.results[node]
    stage = client.get_run(result.run_id)
    assert stage.data.tags["exitflow.stage"] == "tune"
    trials = ArtifactStore(client).load_table(result.run_id, "trials").to_pylist()
    assert sorted(t["lr"] for t in trials) == pytest.approx(GRID)
    best = max(trials, key=lambda t: (t["best_val"], -t["lr"]))
    assert best["chosen"] and sum(t["chosen"] for t in trials) == 1
    assert float(stage.data.params["chosen_lr"]) == pytest.approx(best["lr"]) == result.summary["lr"]
    assert "lr_search.png" in {f.path for f in client.list_artifacts(result.run_id)}

    nested = [r for r in runs(client, NAME, stage="trial") if r.data.tags["mlflow.parentRunId"] == result.run_id]
    assert sorted(float(r.data.params["lr"]) for r in nested) == pytest.approx(GRID)
    for run in nested:
        assert run.info.status == "FINISHED"
        assert "exitflow.key" not in run.data.tags  # never mistaken for the stage's cached run
        curve = client.get_metric_history(run.info.run_id, "val_acc_final")
        assert [m.step for m in curve] == [0, 1]  # the trial's validation curve, epoch by epoch
    assert [r for r in runs(client, NAME) if r.info.status == "RUNNING"] == []


@pytest.mark.parametrize("node", SEARCHES)
def test_the_phase_model_is_exactly_the_best_trials_checkpoint(study: Any, client: MlflowClient, node: str) -> None:
    from exitflow.pipeline.artifacts import ArtifactStore, state_dict_hash
    from exitflow.stages.ray_train import outcome_from_checkpoint

    result = study.results[node]
    trial_state = outcome_from_checkpoint(result.summary["best_trial_checkpoint"]).best_state_dict
    state, spec = ArtifactStore(client).load_checkpoint(result.run_id)
    assert state_dict_hash(state) == state_dict_hash(trial_state) == spec["state_sha256"]
    assert spec["lr"] == result.summary["lr"]


def test_the_report_says_which_lr_each_phase_chose(study: Any) -> None:
    chosen = {n: study.results[n].summary["lr"] for n in SEARCHES}
    budget_table = study.table.split("training cost per regime")[0]  # the cost table below has regime rows too
    rows = {line.split()[0]: line for line in budget_table.splitlines() if line.split()[:1] in (["disjoint"], ["mixed"])}
    assert f"P1={chosen['seed0/P1']:.3g}" in rows["disjoint"] and f"P3={chosen['seed0/disjoint/P3']:.3g}" in rows["disjoint"]
    assert f"P1={chosen['seed0/P1']:.3g}" in rows["mixed"] and f"P2={chosen['seed0/mixed/P2']:.3g}" in rows["mixed"]
    assert study.results["report"].summary["chosen_lrs"]["mixed"]["P1"] == chosen["seed0/P1"]


TRAINERS = pytest.mark.parametrize("in_process", [False, True], ids=["ray_train", "in_process"])


@TRAINERS
def test_asha_stops_poor_learning_rates_early(ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              in_process: bool) -> None:
    """Also: the search tells the driver's display its trial counts as trials start and end."""
    from exitflow.pipeline import relay
    from exitflow.stages.ray_train import scaling_config
    from exitflow.stages.phase_plan import SearchPlan
    from exitflow.stages.ray_tune import run_search

    posted: list[tuple[str, dict]] = []
    monkeypatch.setattr(relay, "_post", lambda line, event=None: posted.append((line, event)))
    # Grid order is trial order: the two good rates reach the first rung before the poor one starts.
    plan = SearchPlan(grid=(3e-3, 1e-3, 1e-6), scheduler="asha", grace_period=1, reduction_factor=2)
    search = run_search(phase_job(max_epochs=4), plan, scaling_config(1, False, 1.0, 0.0), "asha", str(tmp_path), 0,
                        in_process=in_process)
    by_lr = {t.lr: t for t in search.trials}
    # compared at the first rung with the good rates: below the cut
    assert by_lr[1e-6].stopped_by == "scheduler" and by_lr[1e-6].epochs == 1, [(t.lr, t.epochs) for t in search.trials]
    assert search.best.lr in (3e-3, 1e-3) and search.best.epochs == 4 and search.best.stopped_by == ""

    events = [e for _, e in posted if e is not None and e["kind"] == "search"]
    ended = [e for e in events if e["ended"]]
    assert len(events) == 6 and len(ended) == 3, posted  # each trial starts and ends once
    assert [e["done"] for e in ended] == [1, 2, 3] and {e["total"] for e in events} == {3}
    assert max(e["running"] for e in events) <= 2  # max_concurrent_trials
    lines = [line for line, e in posted if e is not None and e["ended"]]
    assert any("ended after 1 epoch(s)" in line for line in lines) and any("ended after 4 epoch(s)" in line for line in lines)


@dataclass(frozen=True)
class _NoLog:
    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self, status: str) -> None:
        pass


@dataclass(frozen=True)
class RecordingLogs:
    """A trial-log factory that appends each trial start to a file (called once per attempt of a trial)."""

    path: str

    def __call__(self, trial_name: str, lr: float) -> _NoLog:
        with open(self.path, "a") as f:
            f.write(f"{lr}\n")
        return _NoLog()


@TRAINERS
def test_an_interrupted_search_resumes_without_rerunning_finished_trials(ray_session: None, tmp_path: Path,
                                                                         in_process: bool) -> None:
    from exitflow.stages.ray_train import outcome_from_checkpoint, scaling_config
    from exitflow.stages.phase_plan import SearchPlan
    from exitflow.stages.ray_tune import SearchFailed, run_search

    plan = SearchPlan(grid=(3e-3, 1e-3))  # one trial at a time (below): 3e-3 finishes first
    scaling, storage = scaling_config(1, False, 1.0, 0.0), str(tmp_path / "ray")
    starts = tmp_path / "starts.txt"
    faulty = phase_job(max_epochs=3, fault=f"point=train.epoch_end,epoch=1,action=raise,settle_s=5,lr=0.001,marker={tmp_path / 'fired'}")
    with pytest.raises(SearchFailed, match="1 of 2 trial"):
        run_search(faulty, plan, scaling, "resume", storage, 0, RecordingLogs(str(starts)), max_concurrent_trials=1,
                   in_process=in_process)
    assert starts.read_text().split() == ["0.003", "0.001"]

    search = run_search(phase_job(max_epochs=3), plan, scaling, "resume", storage, 0, RecordingLogs(str(starts)),
                        max_concurrent_trials=1, in_process=in_process)
    assert starts.read_text().split() == ["0.003", "0.001", "0.001"]  # only the failed trial ran again
    by_lr = {t.lr: t for t in search.trials}
    assert by_lr[1e-3].epochs == by_lr[3e-3].epochs == 3
    assert outcome_from_checkpoint(by_lr[1e-3].checkpoint_path).resumed_at == 1  # from its checkpoint, not epoch 0


def test_a_search_whose_state_cannot_be_read_says_why_and_starts_afresh(
    ray_session: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from exitflow.stages.ray_train import scaling_config
    from exitflow.stages.phase_plan import SearchPlan
    from exitflow.stages.ray_tune import run_search, search_dir

    storage = tmp_path / "ray"
    folder = search_dir("broken", str(storage))
    broken = storage / folder
    broken.mkdir(parents=True)
    (broken / "tuner.pkl").write_bytes(b"not a pickle: a half-written file from a dead process")
    with caplog.at_level("WARNING", logger="exitflow.stages.ray_tune"):
        # The trials train in process: what is broken is Tune's own saved state, the same under either trainer.
        search = run_search(phase_job(max_epochs=1), SearchPlan(grid=(3e-3,)), scaling_config(1, False, 1.0, 0.0),
                            "broken", str(storage), 0, in_process=True)
    assert [t.epochs for t in search.trials] == [1]  # the search ran, from scratch
    [warning] = [r.getMessage() for r in caplog.records if "cannot resume" in r.getMessage()]
    assert "starting it afresh" in warning and f"{folder}.unresumable-1" in warning and str(storage) not in warning
    assert (storage / f"{folder}.unresumable-1" / "tuner.pkl").exists()  # set aside, not deleted


def test_the_same_search_in_two_storages_is_staged_apart(ray_session: None, tmp_path: Path) -> None:
    """Tune stages a search's state on the node under <Ray session>/artifacts/<second it started>/<name>
    and copies it to storage. The same search of two studies in two storages (one cluster, two
    experiments) started in one second shared that folder, and each storage got the other's state:
    the fault matrix's streams saw a search restored with the other study's trials. The search's
    name carries its storage, and stays the same for a restored search."""
    from ray.train._internal.storage import StorageContext

    from exitflow.stages.ray_tune import search_dir

    a, b = str(tmp_path / "a"), str(tmp_path / "b")

    def staging(storage: str, name: str) -> str:
        context = StorageContext(storage, name)
        context._timestamp = "one-second"  # both searches start in the same second
        return context.experiment_driver_staging_path

    assert staging(a, "key-P3") == staging(b, "key-P3")  # what Tune does with one name: shared
    assert staging(a, search_dir("key-P3", a)) != staging(b, search_dir("key-P3", b))
    assert search_dir("key-P3", a) == search_dir("key-P3", a) and search_dir("key-P3", a).startswith("key-P3-")


def test_a_trial_whose_recorded_checkpoint_is_gone_reads_its_runs_newest_whole_one(tmp_path: Path) -> None:
    """Tune's record of a trial's checkpoint may be older than its Train run's own (an attempt Tune
    never heard of reported again and Train, keeping two, removed the old one): the newest whole
    checkpoint of the run is read instead; none whole is an error naming the trial and the run."""
    from exitflow.stages.ray_train import PROGRESS_FILE, STATE_FILE
    from exitflow.stages.ray_tune import SearchFailed, latest_complete_checkpoint

    run = tmp_path / "search-trial_00001"
    for name, files in (("checkpoint_2026-11-30_14-56-09.354454", [STATE_FILE]),  # Tune's: half removed
                        ("checkpoint_2026-11-30_14-56-12.100000", [STATE_FILE, PROGRESS_FILE]),
                        ("checkpoint_2026-11-30_14-56-15.000000", [STATE_FILE, PROGRESS_FILE]),
                        ("checkpoint_2026-11-30_14-56-16.000000", [STATE_FILE])):  # an upload cut short
        (run / name).mkdir(parents=True)
        for f in files:
            (run / name / f).write_text("x")
    recorded = str(run / "checkpoint_2026-11-30_14-56-09.354454")
    assert latest_complete_checkpoint(recorded, str(tmp_path), "trial t") == str(run / "checkpoint_2026-11-30_14-56-15.000000")
    whole = str(run / "checkpoint_2026-11-30_14-56-12.100000")
    assert latest_complete_checkpoint(whole, str(tmp_path), "trial t") == whole  # a whole one is Tune's word
    for d in run.iterdir():
        (d / PROGRESS_FILE).unlink(missing_ok=True)
    with pytest.raises(SearchFailed, match="trial t: its checkpoint .* search-trial_00001 keeps no complete one"):
        latest_complete_checkpoint(recorded, str(tmp_path), "trial t")
