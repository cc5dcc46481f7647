"""`exitflow register`: a study's logged early-exit model into the MLflow Model Registry, at a chosen budget.

The model a node logged (its run's `exitflow.models` tag) is copied as a new LoggedModel whose
`model_config` loads at the chosen budget (and criterion), so `mlflow.pyfunc.load_model("models:/NAME/V")`
runs that rule with no further argument; the registered version's tags and description say which
rule, what it costs and what it scored on the test split. The copy is loaded before anything is
written: a budget the model's curve cannot meet is refused with the reason, and the store is left as it was.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exitflow.pipeline.execute import MODELS_TAG
from exitflow.pipeline.results import open_study

CONFIG_FLAVOR = "python_function"  # the pyfunc flavor's section of MLmodel, which holds its model_config ("config")


class RegisterError(ValueError):
    """The run, node, budget or name cannot be registered (the message says why)."""


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    model_id: str  # the LoggedModel the version serves (the copy at the chosen rule)
    source_model_id: str  # the node's own logged model
    node: str
    tags: dict[str, str]
    description: str


def _models_of(client: Any, nodes: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """node -> the ids of the models its run logged (the nodes that logged none left out)."""
    found = {}
    for node, record in nodes.items():
        ids = json.loads(client.get_run(record["run_id"]).data.tags.get(MODELS_TAG, "[]"))
        if ids:
            found[node] = ids
    return found


def _pick(client: Any, run_id: str, node: str, models: dict[str, list[str]]) -> tuple[str, str]:
    """(node, model id): NODE names a node that logged a model, or the node whose model it is (a phase)."""
    if node in models:
        return node, models[node][0]
    for owner, ids in models.items():
        for mid in ids:
            if client.get_logged_model(mid).tags.get("exitflow.model_node") == node:
                return owner, mid
    raise RegisterError(f"pipeline run {run_id}: node {node!r} has no logged model; nodes with one: {sorted(models)} "
                        "(or the phase node each evaluated)")


def _rule_of(local: Path, config: dict[str, Any]) -> Any:
    """Load the model's copy with `config` as MLflow will (its own checks refuse a bad rule): its default rule."""
    import mlflow

    try:
        loaded = mlflow.pyfunc.load_model(str(local), model_config=config)
    except Exception as e:  # noqa: BLE001 - the model's own reason (a budget no curve point meets, a criterion it lacks)
        cause = e.__cause__ or e
        raise RegisterError(f"{type(cause).__name__}: {cause}") from None
    return loaded.unwrap_python_model().default


def register(run_id: str, node: str, name: str, budget: Any = None, criterion: str | None = None,
             tracking_uri: str | None = None) -> Registered:
    """Register the model of `node` in pipeline run `run_id` as a new version of `name`, loading at
    `budget` (a fraction of the backbone's FLOPs, or "max"; None: the model's own) and `criterion`."""
    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    if not name or not name.strip():
        raise RegisterError("--name: a registered model needs a name")
    with open_study(run_id, tracking_uri) as study:
        c = study.store.client
        owner, source_id = _pick(c, run_id, node, _models_of(c, study.nodes))
        source = c.get_logged_model(source_id)
        with tempfile.TemporaryDirectory() as d:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source.artifact_location, dst_path=d,
                                                             tracking_uri=c.tracking_uri))
            model = Model.load(str(local))
            config = dict(model.flavors[CONFIG_FLAVOR].get("config") or {})
            if budget is not None:
                config["budget"] = budget
                config.pop("threshold", None)  # a budget chosen now rules over a threshold fixed before
            if criterion:
                config["criterion"] = criterion
            rule = _rule_of(local, config)
            # the name next, checked by MLflow as it is made: a bad one leaves nothing behind
            try:
                c.create_registered_model(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise RegisterError(f"--name {name!r}: {e.message}") from None
            owner_run = study.nodes[owner]["run_id"]
            copy = c.create_logged_model(experiment_id=source.experiment_id, name=source.name, source_run_id=owner_run,
                                         tags={**source.tags, "exitflow.registered_from": source_id},
                                         model_type=source.model_type)
            model.flavors[CONFIG_FLAVOR]["config"] = config
            model.metadata = {**(model.metadata or {}), "default_budget": config.get("budget"),
                              "default_criterion": rule.criterion}
            model.model_id = model.model_uuid = copy.model_id
            model.artifact_path = copy.artifact_location
            model.save(str(local / "MLmodel"))
            c.log_model_artifacts(copy.model_id, str(local))
            c.finalize_logged_model(copy.model_id, LoggedModelStatus.READY)
        tags = {"exitflow.budget": str(rule.budget if rule.budget is not None else ""), "exitflow.criterion": rule.criterion,
                "exitflow.threshold": repr(rule.threshold), "exitflow.node": owner, "exitflow.pipeline_run": run_id,
                "exitflow.source_model": source_id}
        if rule.flops_fraction is not None:
            tags |= {"exitflow.flops_fraction": f"{rule.flops_fraction:.6g}", "exitflow.test_accuracy": f"{rule.accuracy:.6g}"}
        point = ("" if rule.flops_fraction is None else f", the costliest point of its test curve within the budget "
                 f"({rule.flops_fraction:.3f} x FLOPs, test accuracy {rule.accuracy:.4f})")
        description = (f"{owner} of pipeline run {run_id}, loading with early exit at budget {rule.budget} x the backbone's "
                       f"FLOPs: {rule.criterion} threshold {rule.threshold:.6g}{point}. Another budget: "
                       "params={'budget': B} per request, or model_config={'budget': B} when loading.")
        version = c.create_model_version(name, source=f"models:/{copy.model_id}", run_id=owner_run, tags=tags,
                                         description=description, model_id=copy.model_id)
    return Registered(name, str(version.version), copy.model_id, source_id, owner, tags, description)
