"""A whole study on real Ray and a real MLflow server: DAG shape in the store, typed artifacts, cache.

One base study (joint + disjoint, seed 0, two epochs a phase) runs once per module; each test
then changes one thing and checks that exactly the nodes it should train, train. The tests do
not depend on their order: each touches nodes no other test trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from helpers import Store, runs, tiny_spec

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

NAME = "pipeline-e2e"
BASE = [f"name={NAME}", "regimes=[joint,disjoint]", "seeds=[0]"]


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One Ray storage folder for every run of the study (resume and key locks live there)."""
    return str(tmp_path_factory.mktemp("ray"))


@pytest.fixture(scope="module")
def base(ray_session: None, mlflow_uri: str, storage: str) -> Any:
    from exitflow.pipeline.runner import run_study

    return run_study(tiny_spec(storage, *BASE), mlflow_uri)


@pytest.fixture(scope="module")
def client(mlflow_uri: str) -> MlflowClient:
    return MlflowClient(mlflow_uri)


def _run(storage: str, mlflow_uri: str, *sets: str) -> Any:
    from exitflow.pipeline.runner import run_study

    return run_study(tiny_spec(storage, *BASE, *sets), mlflow_uri)


def test_the_study_lands_in_mlflow_as_a_typed_dag(base: Any, client: MlflowClient, tmp_path: Path) -> None:
    from exitflow.pipeline.artifacts import ArtifactStore

    assert sorted(base.trained) == ["seed0/P1", "seed0/disjoint/P3", "seed0/joint/P2"]
    parent = client.get_run(base.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["exitflow.stage"] == "pipeline"
    children = {r.info.run_id: r for r in runs(client, NAME) if r.data.tags.get("mlflow.parentRunId") == base.parent_run_id}
    by_node = {r.data.tags["exitflow.node"]: r for r in children.values()}
    assert set(by_node) == {"seed0/P1", "seed0/joint/P2", "seed0/disjoint/P3", "seed0/joint/evaluate",
                            "seed0/disjoint/evaluate", "report"}
    assert all(r.info.status == "FINISHED" for r in children.values())

    [p1] = [r for r in runs(client, NAME, phase="P1") if r.info.status == "FINISHED"]  # one P1 per seed, ever
    assert p1.data.tags["exitflow.regime"] == "disjoint"  # its only user here
    assert p1.data.tags["exitflow.stage"] == "train" and p1.data.tags["exitflow.seed"] == "0"
    p3 = by_node["seed0/disjoint/P3"]
    assert (p3.data.tags["exitflow.phase"], p3.data.tags["exitflow.regime"]) == ("P3", "disjoint")

    store = ArtifactStore(client)
    for regime in ("joint", "disjoint"):
        ev = by_node[f"seed0/{regime}/evaluate"]
        assert ev.data.tags["exitflow.stage"] == "evaluate"
        exits = store.load_table(ev.info.run_id, "exits").to_pylist()
        assert [row["exit"] for row in exits] == list(range(5))  # 4 ICs + the final head
        assert all(a["flops"] < b["flops"] for a, b in zip(exits, exits[1:]))
        curve = store.load_table(ev.info.run_id, "curve")
        assert curve.num_rows == 2 * 20  # two criteria x evaluation.thresholds
        assert ev.data.metrics["test_acc_final"] == pytest.approx(exits[-1]["accuracy"])

    report = by_node["report"]
    budgets = store.load_table(report.info.run_id, "budgets").to_pylist()
    assert {(r["regime"], r["budget"]) for r in budgets} == {
        (g, b) for g in ("joint", "disjoint") for b in ("0.25", "0.5", "0.75", "1.0", "max")}
    assert all(r["n_seeds"] == 1 for r in budgets)
    assert {"tradeoff.png", "budgets.txt"} <= {f.path for f in client.list_artifacts(report.info.run_id)}
    assert "joint" in base.table and "disjoint" in base.table and "P1=" in base.table
    # the budget and cost tables as MLflow tables, which the UI renders: the Parquet's rows, hashed like it
    listed = json.loads(report.data.tags["mlflow.loggedArtifacts"])
    assert {"path": "budgets.json", "type": "table"} in listed and {"path": "costs.json", "type": "table"} in listed
    view = json.loads(store.load_file(report.info.run_id, "budgets.json", tmp_path).read_text())
    nan_as_null = [{k: None if isinstance(v, float) and v != v else v for k, v in row.items()} for row in budgets]
    assert [dict(zip(view["columns"], row)) for row in view["data"]] == nan_as_null


def test_phase_runs_log_every_epoch_and_a_checkpoint_that_rebuilds_the_net(base: Any, client: MlflowClient) -> None:
    from exitflow.pipeline.artifacts import ArtifactStore, state_dict_hash
    from exitflow.stages.core.nets import NetSpec, create_net

    run_id = base.results["seed0/disjoint/P3"].run_id
    curve = client.get_metric_history(run_id, "val_acc_final")
    assert [m.step for m in curve] == [0, 1]  # one point per epoch, logged by rank 0 while training
    assert len(client.get_metric_history(run_id, "val_acc_0")) == 2
    state, spec = ArtifactStore(client).load_checkpoint(run_id)
    assert spec["phase"] == "P3" and state_dict_hash(state) == spec["state_sha256"]
    net = create_net(NetSpec.from_dict(spec["net"]))
    net.load_state_dict(state)  # strict: the unwrapped state, nothing missing or extra
    net.eval()
    with torch.no_grad():
        outs = net(torch.zeros(2, 1, 8, 8))
    assert len(outs) == 5 and outs[-1].shape == (2, 10)
    # disjoint's P3 starts from the shared P1 and cannot move the backbone
    p1_state, _ = ArtifactStore(client).load_checkpoint(base.results["seed0/P1"].run_id)
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    assert backbone and all(torch.equal(v, p1_state[k]) for k, v in backbone.items())


def test_running_again_trains_nothing(base: Any, storage: str, mlflow_uri: str, client: MlflowClient) -> None:
    from exitflow.pipeline.runner import plan

    phase_runs_before = len(runs(client, NAME, stage="train"))
    again = _run(storage, mlflow_uri)
    assert again.trained == [] and len(again.cache_hits) == len(again.results) == 6
    assert again.table == base.table
    assert "training cost per regime" in base.table and "study " in base.table
    assert len(runs(client, NAME, stage="train")) == phase_runs_before
    _, planned = plan(tiny_spec(storage, *BASE), mlflow_uri)
    assert all(p.cached_run is not None for p in planned)


def test_results_from_python_are_dataframes_whether_trained_or_cached(
    base: Any, storage: str, mlflow_uri: str, client: MlflowClient
) -> None:
    from pandas.testing import assert_frame_equal

    from exitflow.pipeline.results import open_study

    exp = client.get_experiment_by_name(NAME)
    # marked as model training; MLflow 3.17's UI opens in GenAI mode all the same (`exitflow ui` prints the runs link)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    again = _run(storage, mlflow_uri)  # every node cached: its pipeline run lists the same node runs
    with open_study(base.parent_run_id, mlflow_uri) as first, open_study(again.parent_run_id, mlflow_uri) as cached:
        budgets = first.budgets()
        assert set(budgets.columns) >= {"criterion", "regime", "budget", "accuracy_mean", "accuracy_std", "n_seeds"}
        assert len(budgets) == 2 * 2 * 5  # criteria x regimes x budgets
        exits = first.exits()
        assert list(exits.columns[:4]) == ["node", "phase", "regime", "seed"]
        assert sorted(exits.groupby("regime").size().items()) == [("disjoint", 5), ("joint", 5)]
        final = exits[(exits.regime == "joint") & (exits.exit == 4)].accuracy.item()
        assert final == pytest.approx(client.get_run(base.results["seed0/joint/evaluate"].run_id).data.metrics["test_acc_final"])
        assert set(first.curves().criterion) == {"max_softmax", "entropy"}
        histories = first.histories()
        assert sorted(histories.groupby("node").epoch.max().items()) == [
            ("seed0/P1", 1), ("seed0/disjoint/P3", 1), ("seed0/joint/P2", 1)]
        assert_frame_equal(cached.budgets(), budgets)
        assert_frame_equal(cached.histories(), histories)
        costs = first.costs()  # joint: its P2; disjoint: P1 + P3, each 2 epochs, as the histories say
        assert sorted(zip(costs.regime, costs.node, costs.epochs)) == [
            ("disjoint", "seed0/P1", 2), ("disjoint", "seed0/disjoint/P3", 2), ("joint", "seed0/joint/P2", 2)]
        assert (costs.train_seconds > 0).all() and (costs.wall_seconds >= costs.train_seconds).all()
        assert costs.ran_on.str.startswith("1 x CPU (").all(), costs.ran_on  # recorded by the worker: one Train worker on a CPU
        assert_frame_equal(cached.costs(), costs)  # a cached phase reports what it cost when trained
        # a phase's model, run with real early exits, makes the predictions the stored curve counts
        net = cached.model("seed0/joint/P2")
        curve = first.curves()
        joint = curve[(curve.node == "seed0/joint/evaluate") & (curve.criterion == "max_softmax")]
        point = joint.iloc[len(joint) // 2]  # a threshold between the ends: samples leave at several exits
        assert early_exit_accuracy(net, point.threshold) == point.accuracy
        with pytest.raises(ValueError, match="no phase node 'seed0/joint/evaluate'"):
            cached.model("seed0/joint/evaluate")


def test_results_api_gives_the_budget_table_exitflow_report_prints(base: Any, mlflow_uri: str) -> None:
    """Every cell of `exitflow report`'s tables (criterion x regime x budget, and the seed count) is
    the DataFrame's value, as the report renders it; and the DataFrame has no row the report lacks."""
    import re

    from exitflow.pipeline.cli import app
    from exitflow.pipeline.results import open_study

    printed = CliRunner().invoke(app, ["report", base.parent_run_id, "--tracking-uri", mlflow_uri])
    assert printed.exit_code == 0, printed.output
    blocks = {}  # criterion -> {regime: cells after the regime's name}
    for block in printed.output.split("test accuracy (%) at FLOPs budget")[1:]:
        criterion = re.search(r"exit criterion: (\w+)", block.splitlines()[0]).group(1)
        header, _rule, *lines = block.split("\n\n")[0].splitlines()[1:]
        columns = re.split(r"\s{2,}", header.strip())
        assert columns[:2] == ["regime", "seeds"]
        table = lines[: next((i for i, ln in enumerate(lines) if ln.startswith("read: ")), len(lines))]  # then how it was read
        assert "read: thresholds: " in block  # every table says how it was read
        rows = [re.split(r"\s{2,}", ln.strip()) for ln in table if not ln.startswith("note:")]
        blocks[criterion] = {row[0]: dict(zip(columns[1:], row[1:])) for row in rows}
    with open_study(base.parent_run_id, mlflow_uri) as study:
        budgets = study.budgets()
    assert set(blocks) == set(budgets.criterion) == {"max_softmax", "entropy"}
    for row in budgets.itertuples():
        cells = blocks[row.criterion][row.regime]  # the table's budget labels: "0.25", ..., "max"
        assert cells["seeds"] == str(row.n_seeds)
        shown = "-" if row.accuracy_mean != row.accuracy_mean else f"{100 * row.accuracy_mean:.2f} ± {100 * row.accuracy_std:.2f}"
        assert cells[f"{row.budget}x" if row.budget != "max" else "max"] == shown
    assert sum(len(b) for b in blocks.values()) == budgets.groupby(["criterion", "regime"]).ngroups


def early_exit_accuracy(net: Any, threshold: float) -> float:
    """Dynamic inference on the study's test split (digits, seed 0): the accuracy at `threshold`."""
    from exitflow.stages.core.data import DataSpec, load_splits, make_loader
    from exitflow.stages.core.inference import early_exit_predict

    test = load_splits(DataSpec(name="digits"), seed=0).test
    loader = make_loader(test, 256, shuffle=False, seed=0)
    labels = torch.cat([y for _, y in loader])
    return float((early_exit_predict(net, loader, threshold).predictions == labels).double().mean())


def test_extending_the_study_trains_only_the_new_nodes(base: Any, storage: str, mlflow_uri: str, client: MlflowClient) -> None:
    with_mixed = _run(storage, mlflow_uri, "regimes=[joint,disjoint,mixed]")
    assert with_mixed.trained == ["seed0/mixed/P2"]  # the shared P1 is reused, not retrained
    assert {"seed0/P1", "seed0/joint/P2", "seed0/disjoint/P3"} <= set(with_mixed.cache_hits)
    assert all(r in with_mixed.table for r in ("joint", "disjoint", "mixed"))
    assert len([r for r in runs(client, NAME, phase="P1") if r.info.status == "FINISHED"]) == 1

    with_seed = _run(storage, mlflow_uri, "regimes=[joint]", "seeds=[0,1]")
    assert with_seed.trained == ["seed1/joint/P2"]
    assert "seed0/joint/P2" in with_seed.cache_hits and "seed0/joint/evaluate" in with_seed.cache_hits
    assert "2  " in with_seed.table  # two seeds behind the joint row


def test_a_corrupted_checkpoint_is_refused_and_its_stage_rerun(
    base: Any, storage: str, mlflow_uri: str, mlflow_store: Store, client: MlflowClient
) -> None:
    from exitflow.pipeline.artifacts import ArtifactError, ArtifactStore

    bad = base.results["seed0/joint/P2"].run_id
    model = mlflow_store.artifact_file(client.get_run(bad).info.artifact_uri, "checkpoint/model.pt")
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: still a file, no longer the model
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted"):
        ArtifactStore(client).load_checkpoint(bad)

    rerun = _run(storage, mlflow_uri)
    assert rerun.trained == ["seed0/joint/P2"]
    assert rerun.results["seed0/joint/P2"].run_id != bad
    tags = client.get_run(bad).data.tags
    assert tags["exitflow.key"].startswith("invalid:") and "corrupted" in tags["exitflow.invalid"]
    ArtifactStore(client).load_checkpoint(rerun.results["seed0/joint/P2"].run_id)  # the new one verifies


def test_report_command_prints_the_table(base: Any, mlflow_uri: str) -> None:
    from exitflow.pipeline.cli import app

    result = CliRunner().invoke(app, ["report", base.parent_run_id, "--tracking-uri", mlflow_uri])
    assert result.exit_code == 0, result.output
    assert base.table.strip() in result.output and "tradeoff.png" in result.output


def test_history_table_matches_the_logged_epochs(base: Any, client: MlflowClient, tmp_path: Path) -> None:
    from exitflow.pipeline.artifacts import ArtifactStore

    run_id = base.results["seed0/P1"].run_id
    history = ArtifactStore(client).load_table(run_id, "history").to_pylist()
    assert [int(r["epoch"]) for r in history] == [0, 1]
    logged = [m.value for m in client.get_metric_history(run_id, "val_acc_final")]
    assert [r["val_acc_final"] for r in history] == pytest.approx(logged)
    summary = json.loads(client.get_run(run_id).data.tags["exitflow.summary"])
    assert summary["epochs"] == 2 and summary["lr"] == pytest.approx(3e-3)
    # its lineage record, which the report reads from the phase node: its lr, its cost, no diverged trial
    [record] = ArtifactStore(client).load_table(run_id, "lineage").to_pylist()
    assert (record["node"], record["phase"], record["lr"], record["epochs"]) == ("seed0/P1", "P1", pytest.approx(3e-3), 2)
    assert record["diverged"] == [] and record["device"] == "CPU" and record["train_seconds"] > 0


def test_a_failed_node_is_named_once_and_everything_downstream_is_skipped(
    ray_session: None, mlflow_uri: str, client: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exitflow.pipeline.runner import StudyFailed, run_study

    # P1 crashes in its first epoch, and Train may not restart it: P1 fails for good.
    monkeypatch.setenv("EXITFLOW_FAULT", f"point=train.epoch_end,node=seed0/P1,epoch=0,action=raise,marker={tmp_path / 'fired'}")
    # A storage of its own: the module's storage holds the base study's P1 (same key), which would be resumed, done.
    storage = str(tmp_path / "ray")
    spec = tiny_spec(storage, "name=pipeline-failure", "regimes=[disjoint,mixed]", "resources.max_failures=0")
    said: list[str] = []
    with pytest.raises(StudyFailed) as failed:
        run_study(spec, mlflow_uri, progress=said.append)
    message = str(failed.value)
    assert message.startswith("1 node(s) failed: seed0/P1; 5 skipped; seed0/P1: ")
    why = message.split("; seed0/P1: ", 1)[1]
    assert "InjectedFault" in why or "TrainingFailedError" in why, why
    assert [line for line in said if line.startswith("FAILED")] == [f"FAILED  seed0/P1: {why}"]
    [skipped] = [line for line in said if line.startswith("skipped")]
    names, _, why = skipped.removeprefix("skipped ").partition(": ")
    assert why == "input seed0/P1 failed"
    assert sorted(names.split(", ")) == ["report", "seed0/disjoint/P3", "seed0/disjoint/evaluate", "seed0/mixed/P2", "seed0/mixed/evaluate"]
    for text in [message, *said]:  # runs and nodes, never a machine's paths
        assert storage not in text and str(tmp_path) not in text and "/tmp/" not in text, text
    statuses = {r.data.tags.get("exitflow.node", "pipeline"): r.info.status for r in runs(client, "pipeline-failure")}
    assert statuses == {"pipeline": "FAILED", "seed0/P1": "FAILED"}  # nothing left RUNNING, nothing downstream started


def test_a_diverging_fixed_lr_phase_fails_with_its_message_and_is_never_reused(
    ray_session: None, storage: str, mlflow_uri: str, client: MlflowClient, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from exitflow.pipeline.runner import StudyFailed, run_study

    spec = tiny_spec(storage, "name=pipeline-diverged", "regimes=[joint]", "phases.P2.optimizer=sgd", "phases.P2.lr=1.0e5")
    for attempt in range(2):  # the second run finds the diverged phase in storage: it fails again, it is not a cache hit
        # The huge lr is what a user would try; the fault hook makes the divergence certain on any machine
        # (a marker per run: should the second run train again, it diverges there too).
        monkeypatch.setenv("EXITFLOW_FAULT", f"point=train.mid_epoch,node=seed0/joint/P2,epoch=0,action=nonfinite,"
                                             f"marker={tmp_path / f'fired{attempt}'}")
        with pytest.raises(StudyFailed, match=r"seed0/joint/P2 diverged: non-finite loss at epoch \d+, step \d+ \(lr=100000\)"):
            run_study(spec, mlflow_uri, progress=lambda _: None)
    phase = runs(client, "pipeline-diverged", node="seed0/joint/P2")
    assert [r.info.status for r in phase] == ["FAILED", "FAILED"]
    assert all(r.data.tags["exitflow.diverged"].startswith("non-finite loss at epoch") for r in phase)
    assert runs(client, "pipeline-diverged", node="seed0/joint/evaluate") == []  # skipped, never run


def test_a_search_with_a_diverging_lr_picks_a_healthy_one_and_the_report_says_so(
    ray_session: None, storage: str, mlflow_uri: str, mlflow_store: Store, client: MlflowClient, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    from exitflow.pipeline.runner import run_study

    monkeypatch.setenv("EXITFLOW_FAULT", f"point=train.mid_epoch,node=seed0/joint/P2,lr=100000,epoch=0,"
                                         f"action=nonfinite,marker={tmp_path / 'fired'}")  # certain, as above
    spec = tiny_spec(storage, "name=pipeline-diverged-search", "regimes=[joint]", "phases.P2.optimizer=sgd",
                     "phases.P2.lr=[0.05,1.0e5]")
    result = run_study(spec, mlflow_uri, progress=lambda _: None)
    [search] = runs(client, "pipeline-diverged-search", node="seed0/joint/P2", stage="tune")
    trials = pq.read_table(mlflow_store.artifact_file(search.info.artifact_uri, "trials.parquet")).to_pylist()
    by_lr = {t["lr"]: t for t in trials}
    assert by_lr[0.05]["chosen"] and not by_lr[0.05]["diverged"]
    assert not by_lr[1e5]["chosen"] and by_lr[1e5]["stopped_by"] == "diverged"
    assert by_lr[1e5]["diverged"].startswith("non-finite loss at epoch")
    assert "P2=0.05" in result.table
    assert f"note: seed0/joint/P2 search: diverged, ranked last: lr=100000: {by_lr[1e5]['diverged']}" in result.table

