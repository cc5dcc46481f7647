"""Early-exit methods other than SDN through a whole study: every regime, evaluated and reported.

PABEE (`net.method: pabee`) trains its depth-weighted loss; its exit rule, the `patience`
criterion, evaluates beside max softmax. Its study also weighs P2 and P3 with L2W
(`loss_weighting: l2w`, a loss weighting that works with every method), so L2W's meta steps run
in every regime's IC-training phase. ZTW (`net.method: ztw`) trains cascading ICs, then fits
its ensemble on the frozen net at the end of every phase that trained them. One epoch a phase:
this checks the plumbing (every regime trains, every curve spans the exits' costs, the report has
a row per regime, criterion and budget); the maths of the losses, ensembles and exit rules are
checked against references in test_nets.py, test_ztw.py, test_jei_dnn.py and test_evaluation.py. JEI-DNN
(`net.method: jei_dnn`) fits its exit gates, one set per lambda, at the end of the same phases, and
its "gates" curve sweeps lambda beside the criteria's. GPF (`net.method: gpf`) trains its
past-future aggregator with the ICs, and its imitation loss beside theirs.
"""

from __future__ import annotations

from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from helpers import tiny_spec

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

NAME = "methods-pabee"
REGIMES = ("joint", "disjoint", "mixed")


def _study(tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str, name: str, method: str, *sets: str) -> Any:
    """A one-epoch digits study of `method` through every regime, with the extra `sets`."""
    from exitflow.pipeline.runner import run_study

    spec = tiny_spec(tmp_path_factory.mktemp("ray"), f"name={name}", f"regimes=[{','.join(REGIMES)}]",
                     f"net.method={method}", *sets, epochs=1)
    return run_study(spec, mlflow_uri, progress=lambda _: None)


@pytest.fixture(scope="module")
def pabee(ray_session: None, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _study(tmp_path_factory, mlflow_uri, NAME, "pabee", "evaluation.criteria=[patience,max_softmax]",
                  "phases.P2.loss_weighting=l2w", "phases.P3.loss_weighting=l2w")


def test_pabee_runs_every_regime_to_a_curve_and_a_budget_table(pabee: Any, mlflow_uri: str) -> None:
    from exitflow.pipeline.artifacts import ArtifactStore

    assert sorted(pabee.trained) == ["seed0/P1", "seed0/disjoint/P3", "seed0/joint/P2", "seed0/mixed/P2"]
    client = MlflowClient(mlflow_uri)
    store = ArtifactStore(client)
    for regime in REGIMES:
        ev = pabee.results[f"seed0/{regime}/evaluate"]
        exits = store.load_table(ev.run_id, "exits").to_pylist()
        curve = [r for r in store.load_table(ev.run_id, "curve").to_pylist() if r["criterion"] == "patience"]
        assert curve, regime
        flops = [r["flops"] for r in curve]
        # patience 0 leaves every sample at the first IC; the top threshold sends every one to the final exit
        assert min(flops) == pytest.approx(exits[0]["flops"]) and max(flops) == pytest.approx(exits[-1]["flops"])
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in curve)
        assert curve[-1]["accuracy"] == pytest.approx(exits[-1]["accuracy"])  # the top threshold: all at the final exit
    budgets = store.load_table(pabee.results["report"].run_id, "budgets").to_pylist()
    assert {(r["criterion"], r["regime"], r["budget"]) for r in budgets} == {
        (c, g, b) for c in ("patience", "max_softmax") for g in REGIMES for b in ("0.25", "0.5", "0.75", "1.0", "max")}
    assert "exit criterion: patience" in pabee.table and "exit criterion: max_softmax" in pabee.table  # a table each
    p2 = client.get_run(pabee.results["seed0/joint/P2"].run_id)
    assert p2.data.params["net.method"] == "pabee"
    for node in ("seed0/joint/P2", "seed0/disjoint/P3", "seed0/mixed/P2"):  # L2W's meta steps ran, P1 had none
        meta = client.get_metric_history(pabee.results[node].run_id, "l2w_meta_loss")
        assert len(meta) == 1 and meta[0].value > 0, node
    assert client.get_metric_history(pabee.results["seed0/P1"].run_id, "l2w_meta_loss") == []


@pytest.fixture(scope="module")
def ztw(ray_session: None, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _study(tmp_path_factory, mlflow_uri, "methods-ztw", "ztw")


def test_ztw_runs_every_regime_with_its_fitted_ensemble_to_a_curve_and_a_budget_table(ztw: Any, mlflow_uri: str) -> None:
    from exitflow.pipeline.artifacts import ArtifactStore

    assert sorted(ztw.trained) == ["seed0/P1", "seed0/disjoint/P3", "seed0/joint/P2", "seed0/mixed/P2"]
    client = MlflowClient(mlflow_uri)
    store = ArtifactStore(client)
    for state in _fitted_by_the_ic_phases(ztw, store, "ztw", "ensemble.bias").values():  # beta starts at 0
        assert any(k.startswith("ics.1.cascade.") for k in state)
    _max_softmax_curves_and_budgets(ztw, store)
    assert client.get_run(ztw.results["seed0/mixed/P2"].run_id).data.params["net.method"] == "ztw"


@pytest.fixture(scope="module")
def gpf(ray_session: None, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _study(tmp_path_factory, mlflow_uri, "methods-gpf", "gpf")


def test_gpf_runs_every_regime_with_its_aggregator_to_a_curve_and_a_budget_table(gpf: Any, mlflow_uri: str) -> None:
    """The aggregator trains with the ICs (P2, P3), not in P1; the disjoint regime's P3 leaves P1's
    backbone as it was; every regime's curve spans its exits' costs (which include the aggregation)."""
    import torch

    from exitflow.pipeline.artifacts import ArtifactStore

    assert sorted(gpf.trained) == ["seed0/P1", "seed0/disjoint/P3", "seed0/joint/P2", "seed0/mixed/P2"]
    client = MlflowClient(mlflow_uri)
    store = ArtifactStore(client)
    states = _fitted_by_the_ic_phases(gpf, store, "gpf", "aggregator.project_bias")  # the projections' biases start at 0
    p1, p3 = states["seed0/P1"], states["seed0/disjoint/P3"]
    assert all(torch.equal(p1[k], p3[k]) for k in p1 if k.startswith("backbone."))
    _max_softmax_curves_and_budgets(gpf, store)
    assert client.get_run(gpf.results["seed0/mixed/P2"].run_id).data.params["net.method"] == "gpf"


@pytest.fixture(scope="module")
def jei_dnn(ray_session: None, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _study(tmp_path_factory, mlflow_uri, "methods-jei-dnn", "jei_dnn", "evaluation.criteria=[max_softmax]")


def test_jei_dnn_runs_every_regime_with_its_gates_to_a_lambda_curve_budget_and_ece_tables(jei_dnn: Any, mlflow_uri: str) -> None:
    """The gates are fitted by every phase that trains the ICs (not P1), each evaluation writes the
    gates' curve (one point per lambda) beside max softmax's, and the report gives it a budget table
    and ECE at every budget, as for a criterion."""
    from exitflow.pipeline.artifacts import ArtifactStore
    from exitflow.stages.core.nets.jei_dnn import LAMBDAS

    assert sorted(jei_dnn.trained) == ["seed0/P1", "seed0/disjoint/P3", "seed0/joint/P2", "seed0/mixed/P2"]
    client = MlflowClient(mlflow_uri)
    store = ArtifactStore(client)
    _fitted_by_the_ic_phases(jei_dnn, store, "jei_dnn", "gates.bias")  # the gates start at 0
    for regime in REGIMES:
        ev = jei_dnn.results[f"seed0/{regime}/evaluate"]
        exits = store.load_table(ev.run_id, "exits").to_pylist()
        curve = [r for r in store.load_table(ev.run_id, "curve").to_pylist() if r["criterion"] == "gates"]
        assert [r["threshold"] for r in curve] == pytest.approx(list(LAMBDAS)), regime
        assert all(exits[0]["flops"] <= r["flops"] <= exits[-1]["flops"] for r in curve)
        assert all(0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["ece"] <= 1.0 for r in curve)
    budgets = store.load_table(jei_dnn.results["report"].run_id, "budgets").to_pylist()
    assert {(r["criterion"], r["regime"], r["budget"]) for r in budgets} == {
        (c, g, b) for c in ("max_softmax", "gates") for g in REGIMES for b in ("0.25", "0.5", "0.75", "1.0", "max")}
    calibration = store.load_table(jei_dnn.results["report"].run_id, "calibration").to_pylist()
    assert {(r["regime"], r["budget"]) for r in calibration if r["criterion"] == "gates"} == {
        (g, b) for g in REGIMES for b in ("0.25", "0.5", "0.75", "1.0", "max")}
    assert "exit criterion: gates" in jei_dnn.table


def _max_softmax_curves_and_budgets(study: Any, store: Any) -> None:
    """Every regime's max-softmax curve spans its exits' costs and ends at the final exit's accuracy;
    the report has a budget row per regime and budget."""
    for regime in REGIMES:
        ev = study.results[f"seed0/{regime}/evaluate"]
        exits = store.load_table(ev.run_id, "exits").to_pylist()
        curve = [r for r in store.load_table(ev.run_id, "curve").to_pylist() if r["criterion"] == "max_softmax"]
        flops = [r["flops"] for r in curve]
        assert min(flops) == pytest.approx(exits[0]["flops"]) and max(flops) == pytest.approx(exits[-1]["flops"])
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in curve)
        assert curve[-1]["accuracy"] == pytest.approx(exits[-1]["accuracy"])
    budgets = store.load_table(study.results["report"].run_id, "budgets").to_pylist()
    assert {(r["regime"], r["budget"]) for r in budgets if r["criterion"] == "max_softmax"} == {
        (g, b) for g in REGIMES for b in ("0.25", "0.5", "0.75", "1.0", "max")}


def _fitted_by_the_ic_phases(study: Any, store: Any, method: str, key: str) -> dict[str, Any]:
    """Every phase's checkpoint of `method`: the method's own module (its tensor `key`, zero at the
    start) fitted by the phases that train the ICs, not by P1. Returns the states by node."""
    states = {}
    for node in ("seed0/P1", "seed0/joint/P2", "seed0/disjoint/P3", "seed0/mixed/P2"):
        states[node], spec = store.load_checkpoint(study.results[node].run_id)
        assert spec["net"]["method"] == method
        assert bool(states[node][key].abs().sum() > 0) == (node != "seed0/P1"), node
    return states
