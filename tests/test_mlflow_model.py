"""Every evaluated model is an MLflow model that runs true early exit: loaded with `mlflow.pyfunc`, served by
`mlflow models serve`, registered with `exitflow register`, and at a budget it takes, sample by sample,
the exits and classes exitflow's own evaluation counts at that budget.

One tiny digits study (joint, one seed, two epochs) runs once for the module on the suite's Ray and
MLflow server; one model server answers every request.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from helpers import free_port, tiny_spec

pytestmark = [pytest.mark.timeout(900)]

NAME = "mlflow-models"
# quantile thresholds spread the curve along the FLOPs axis: the two budgets read distinct points
SETS = [f"name={NAME}", "regimes=[joint]", "seeds=[0]", "evaluation.threshold_spacing=quantile",
        "evaluation.seed_averaging=budget"]
NODE, PHASE = "seed0/joint/evaluate", "seed0/joint/P2"
BUDGETS = (0.5, 1.0)
CRITERION = "max_softmax"  # the study's first criterion: every model's default


@pytest.fixture(scope="module")
def study(ray_session: None, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from exitflow.pipeline.runner import run_study

    spec = tiny_spec(str(tmp_path_factory.mktemp("ray")), *SETS)
    return spec, run_study(spec, mlflow_uri)


@pytest.fixture(scope="module")
def client(mlflow_uri: str) -> MlflowClient:
    return MlflowClient(mlflow_uri)


@pytest.fixture(scope="module")
def fluent_uri(mlflow_uri: str) -> Iterator[str]:
    """`models:/` URIs resolve against the tracking URI MLflow's fluent API holds: the suite's server."""
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_uri)
    yield mlflow_uri
    mlflow.set_tracking_uri(before)


@pytest.fixture(scope="module")
def evaluated(study: Any, mlflow_uri: str) -> dict[str, Any]:
    """What exitflow's own evaluation of NODE says, and the test inputs it read: the reference."""
    import torch

    from exitflow.pipeline.resolve import data_spec
    from exitflow.pipeline.results import open_study
    from exitflow.stages.core.data import load_splits, make_loader
    from exitflow.stages.core.evaluation import collect_logits

    spec, result = study
    with open_study(result.parent_run_id, mlflow_uri) as s:
        net = s.model(PHASE)
        curves, exits = s.curves(), s.exits()
        eval_run = s.nodes[NODE]["run_id"]
    test = load_splits(data_spec(spec), seed=0).test
    logits, labels = collect_logits(net, make_loader(test, 256, shuffle=False, seed=0), "cpu")
    curve = curves[(curves.node == NODE) & (curves.criterion == CRITERION)]
    return {"logits": logits, "labels": labels, "x": torch.stack([test[i][0] for i in range(len(test))]).numpy(),
            "curve": curve, "exit_flops": exits[exits.node == NODE].sort_values("exit").flops.to_numpy(),
            "eval_run": eval_run}


def expected_at(evaluated: dict[str, Any], backbone_flops: float, budget: float) -> dict[str, Any]:
    """The evaluation's reading of `budget` (the report's rule) and each test sample's exit and class there."""
    from exitflow.stages.core.budgets import budget_point
    from exitflow.stages.core.evaluation import exit_criterion, exit_indices

    curve = evaluated["curve"]
    point = budget_point(curve.flops.to_numpy(), curve.accuracy.to_numpy(), backbone_flops, budget)
    assert point is not None, f"budget {budget} is met by no point of the curve"
    threshold = float(curve.threshold.to_numpy()[point])
    logits = evaluated["logits"]
    exits = exit_indices(exit_criterion(logits, CRITERION), np.array([threshold]), CRITERION)[0]
    classes = logits[exits, np.arange(logits.shape[1])].argmax(dim=-1).numpy()
    return {"threshold": threshold, "exits": exits, "classes": classes, "flops": float(curve.flops.to_numpy()[point]),
            "accuracy": float(curve.accuracy.to_numpy()[point])}


@pytest.fixture(scope="module")
def logged(study: Any, client: MlflowClient, evaluated: dict[str, Any]) -> Any:
    [model] = client.search_logged_models(experiment_ids=[client.get_experiment_by_name(NAME).experiment_id],
                                          filter_string=f"source_run_id = '{evaluated['eval_run']}'")
    return model


@pytest.mark.ray
def test_every_evaluated_model_is_a_logged_model_named_after_its_node(study: Any, client: MlflowClient, logged: Any) -> None:
    _, result = study
    exp = client.get_experiment_by_name(NAME).experiment_id
    models = {m.name: m for m in client.search_logged_models(experiment_ids=[exp])}
    evaluate_nodes = {n for n, r in result.results.items() if n.endswith("/evaluate")}
    assert evaluate_nodes == {NODE} and set(models) == {"seed0-joint-evaluate"}  # one per evaluated model
    assert logged.name == "seed0-joint-evaluate" and str(logged.status) == "READY"
    assert logged.tags["exitflow.node"] == NODE and logged.tags["exitflow.model_node"] == PHASE
    run = client.get_run(logged.source_run_id)
    assert run.data.tags["exitflow.stage"] == "evaluate"
    assert json.loads(run.data.tags["exitflow.models"]) == [logged.model_id]
    assert logged.model_id in {o.model_id for o in run.outputs.model_outputs}  # linked to the evaluate run
    files = {f.path for f in client.list_logged_model_artifacts(logged.model_id)}
    assert {"MLmodel", "input_example.json", "serving_input_example.json", "pyfunc_model.py"} <= files
    nested = {f.path for f in client.list_logged_model_artifacts(logged.model_id, "artifacts")}
    assert nested == {"artifacts/model.safetensors", "artifacts/spec.json", "artifacts/exits.json", "artifacts/thresholds.json"}
    assert not any(p.endswith((".pkl", ".pt", ".pth", ".cloudpickle")) for p in files | nested)  # nothing unpickled on load


@pytest.mark.ray
def test_the_loaded_model_takes_the_evaluations_exits_at_two_budgets(fluent_uri: str, logged: Any, evaluated: dict[str, Any],
                                                                      client: MlflowClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # MLflow refusing every pickle: it needs none
    model = mlflow.pyfunc.load_model(f"models:/{logged.model_id}")
    sig = model.metadata.signature
    assert list(sig.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 8, 8]
    assert {p.name for p in sig.params.params} == {"budget", "criterion", "threshold"}
    assert model.metadata.metadata["default_budget"] == 0.5 and model.metadata.metadata["default_criterion"] == CRITERION
    backbone = client.get_run(evaluated["eval_run"]).data.metrics["backbone_flops"]
    seen = []
    for budget in BUDGETS:
        want = expected_at(evaluated, backbone, budget)
        got = model.predict(evaluated["x"], params={"budget": budget})
        assert got.threshold.unique().tolist() == [want["threshold"]]
        np.testing.assert_array_equal(got.exit.to_numpy(), want["exits"])
        np.testing.assert_array_equal(got["class"].to_numpy(), want["classes"])
        # each sample priced by its exit; over the test split, the curve point's cost and accuracy
        np.testing.assert_array_equal(got.flops.to_numpy(), evaluated["exit_flops"][want["exits"]])
        assert got.flops.mean() == pytest.approx(want["flops"], rel=1e-9)
        assert got.flops_fraction.mean() <= budget + 1e-12
        assert (got["class"].to_numpy() == evaluated["labels"].numpy()).mean() == pytest.approx(want["accuracy"], abs=1e-12)
        seen.append(want["threshold"])
    assert seen[0] != seen[1]  # two budgets, two rules
    default = model.predict(evaluated["x"][:50])  # loaded at its default budget: 0.5
    np.testing.assert_array_equal(default.exit.to_numpy(), expected_at(evaluated, backbone, 0.5)["exits"][:50])
    # a rule chosen when loading
    at_one = mlflow.pyfunc.load_model(f"models:/{logged.model_id}", model_config={"budget": 1.0})
    np.testing.assert_array_equal(at_one.predict(evaluated["x"][:50]).exit.to_numpy(),
                                  expected_at(evaluated, backbone, 1.0)["exits"][:50])
    with pytest.raises(Exception, match="no point of the max_softmax curve costs at most 0.01"):
        model.predict(evaluated["x"][:2], params={"budget": 0.01})


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.ray
def test_mlflow_models_serve_answers_with_the_evaluations_exits(mlflow_uri: str, logged: Any, evaluated: dict[str, Any],
                                                                client: MlflowClient, tmp_path: Path) -> None:
    port = free_port()
    # as from an activated environment: MLflow runs the scoring server as `uvicorn`, from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{logged.model_id}",
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        backbone = client.get_run(evaluated["eval_run"]).data.metrics["backbone_flops"]
        x = evaluated["x"]
        for budget in BUDGETS:
            status, body = _post(f"{url}/invocations", {"inputs": x.tolist(), "params": {"budget": budget}})
            assert status == 200, body
            rows = body["predictions"]
            want = expected_at(evaluated, backbone, budget)
            assert [r["exit"] for r in rows] == want["exits"].tolist()
            assert [r["class"] for r in rows] == want["classes"].tolist()
            assert [r["label"] for r in rows] == [str(c) for c in want["classes"]]  # digits' class names
            assert {r["threshold"] for r in rows} == {want["threshold"]}
        status, body = _post(f"{url}/invocations", {"inputs": x[:2].tolist(), "params": {"budget": 0.01}})
        assert status == 400 and "no point of the max_softmax curve" in body.get("message", ""), body
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.ray
def test_register_puts_the_model_in_the_registry_at_its_budget(study: Any, mlflow_uri: str, fluent_uri: str,
                                                               evaluated: dict[str, Any], logged: Any,
                                                               client: MlflowClient) -> None:
    import mlflow

    from exitflow.pipeline.cli import app

    _, result = study
    out = CliRunner().invoke(app, ["register", result.parent_run_id, PHASE, "--budget", "1.0", "--name", "digits-joint",
                                   "--tracking-uri", mlflow_uri])
    assert out.exit_code == 0, out.output
    [version] = client.search_model_versions("name = 'digits-joint'")
    backbone = client.get_run(evaluated["eval_run"]).data.metrics["backbone_flops"]
    want = expected_at(evaluated, backbone, 1.0)
    assert version.tags["exitflow.budget"] == "1.0" and version.tags["exitflow.criterion"] == CRITERION
    assert float(version.tags["exitflow.threshold"]) == want["threshold"] and version.tags["exitflow.node"] == NODE
    assert "budget 1.0" in version.description and version.run_id == evaluated["eval_run"]
    assert version.model_id != logged.model_id  # a copy loading at the chosen budget; the node's own is unchanged
    registered = mlflow.pyfunc.load_model(f"models:/digits-joint/{version.version}")
    np.testing.assert_array_equal(registered.predict(evaluated["x"]).exit.to_numpy(), want["exits"])  # its default: 1.0

    # refused, naming the reason, and nothing written: a budget no point meets, a node without a model
    for args, reason in ((["--budget", "0.01"], "budget 0.01: no point"), (["--budget", "lots"], "budget 'lots'")):
        bad = CliRunner().invoke(app, ["register", result.parent_run_id, NODE, *args, "--name", "never",
                                       "--tracking-uri", mlflow_uri])
        assert bad.exit_code == 2 and reason in bad.output, bad.output
    bad = CliRunner().invoke(app, ["register", result.parent_run_id, "seed0/nope", "--name", "never", "--tracking-uri", mlflow_uri])
    assert bad.exit_code == 2 and "has no logged model" in bad.output and NODE in bad.output, bad.output
    assert client.search_registered_models("name = 'never'") == []
    exp = client.get_experiment_by_name(NAME).experiment_id
    assert len(client.search_logged_models(experiment_ids=[exp])) == 2  # the node's model and one registered copy


def test_a_budget_reads_the_curve_as_the_report_does_and_a_bad_one_is_refused() -> None:
    from exitflow.stages.core.budgets import budget_point
    from exitflow.stages.core.exit_policy import CurvePoints, parse_budget, threshold_at_budget

    # thresholds in order; FLOPs rise with them, with a tie at 60 (the later point of a tie is read)
    curve = CurvePoints(threshold=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), flops=(30.0, 45.0, 60.0, 60.0, 90.0, 120.0),
                        accuracy=(0.5, 0.7, 0.8, 0.81, 0.9, 0.88))
    for budget, point in ((0.5, 1), (0.6, 3), (0.9, 4), (1.0, 4), (2.0, 5), ("max", 5)):
        read = threshold_at_budget("max_softmax", curve, 100.0, budget)
        assert read.point == point == budget_point(curve.flops, curve.accuracy, 100.0, budget)
        assert (read.threshold, read.flops_fraction, read.accuracy) == (
            curve.threshold[point], curve.flops[point] / 100.0, curve.accuracy[point])
    assert threshold_at_budget("max_softmax", curve, 100.0, 0.25).threshold is None  # no point is that cheap
    assert parse_budget(" MAX ") == "max" and parse_budget("0.5") == 0.5
    for bad in ("lots", 0, -0.5, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="a positive fraction of the backbone's FLOPs"):
            parse_budget(bad)


def test_register_on_a_store_that_does_not_exist_exits_2_and_makes_none(tmp_path: Path) -> None:
    from exitflow.pipeline.cli import app

    db = tmp_path / "mlflow.db"
    out = CliRunner().invoke(app, ["register", "0123456789abcdef0123456789abcdef", NODE, "--name", "never",
                                   "--tracking-uri", f"sqlite:///{db}"])
    assert out.exit_code == 2 and "no store there" in out.output, out.output
    assert list(tmp_path.iterdir()) == []  # registering never makes a store
