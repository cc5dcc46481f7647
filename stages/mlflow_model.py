"""An evaluated early-exit model as an MLflow model: a pyfunc that runs true early exit at a FLOPs budget.

The evaluate kind logs one per model it evaluates (`EarlyExitModel`, `logged_model`). The model holds
files only, none of them pickled: the weights (`model.safetensors`), the spec that rebuilds the net
(`spec.json`, with the weights' sha256, the class names and the input shape), each exit's FLOPs and
accuracy (`exits.json`) and the evaluation's own threshold curves with the threshold each criterion
takes at the study's standard budgets (`thresholds.json`). Its class is named by a code file
(`stages/pyfunc_model.py`, MLflow's "models from code"), never by a pickle.

Input: a float32 batch N x C x H x W as the study's test loader yields it (the data set's eval
transform applied: its resize and crop, ToTensor and its per-channel normalisation). Output: a row
per sample with the class (and its name), the exit it left at (0-based, the final head last), that
exit's FLOPs and their fraction of the plain backbone's, and the threshold used.

The exit rule is chosen when the model is loaded (`model_config`: `budget`, `criterion`, `threshold`,
`device`, `batch_size`) or per request (`params`: `budget`, `criterion`, `threshold`). A budget b is
read off the stored curve as the report reads it (`stages.core.exit_policy`: the costliest point
within b x the backbone's FLOPs; "max": the costliest point of the curve), so on the test split the
model takes exactly the exits the evaluation counted at that budget.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa

from exitflow.stages.core.budgets import DEFAULT_BUDGETS
from exitflow.stages.core.exit_policy import (BUDGET_RULE, CurvePoints, budget_thresholds, parse_budget,
                                              priced_early_exit, threshold_at_budget)

FORMAT = "exitflow.early_exit/1"  # the layout below; a reader refuses any other
WEIGHTS, SPEC, EXITS, THRESHOLDS = "model.safetensors", "spec.json", "exits.json", "thresholds.json"
DEFAULT_BUDGET = 0.5  # the default exit rule of a logged model ("max" where no curve point fits it)
STORED_BUDGETS = DEFAULT_BUDGETS  # each criterion's threshold at these is stored (any other budget reads the curve)
CONFIG_KEYS = ("budget", "criterion", "threshold", "device", "batch_size")
# Per-request params; their defaults mean "as loaded": budget 0 and a negative threshold are no rule.
PARAMS = (("budget", "double", 0.0), ("criterion", "string", ""), ("threshold", "double", -1.0))
OUTPUT = (("class", "long"), ("label", "string"), ("exit", "long"), ("flops", "long"), ("flops_fraction", "double"),
          ("threshold", "double"))
CODE_FILE = Path(__file__).with_name("pyfunc_model.py")


@dataclass(frozen=True)
class Rule:
    """The exit rule a prediction runs with."""

    criterion: str
    threshold: float
    budget: str | None  # the budget it was read from, None for a threshold given as such
    flops_fraction: float | None = None  # the curve point's mean cost (of the backbone's) and test accuracy,
    accuracy: float | None = None  # for a rule read from a budget


def model_name(node_id: str) -> str:
    """A logged model's name after its node ("seed0/joint/evaluate" -> "seed0-joint-evaluate"): MLflow
    refuses / : . % and quotes in one."""
    return re.sub(r"[/:.%\"']", "-", node_id)


class EarlyExitModel(mlflow.pyfunc.PythonModel):
    """The pyfunc of an early-exit model (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        import torch
        from safetensors.torch import load_file

        from exitflow.stages.core.nets import NetSpec, create_net
        from exitflow.stages.core.state_hash import state_dict_hash

        files = context.artifacts
        spec = json.loads(Path(files["spec"]).read_text())
        if spec.get("format") != FORMAT:
            raise ValueError(f"{SPEC}: format {spec.get('format')!r}, this exitflow reads {FORMAT!r}")
        state = load_file(files["weights"])  # safetensors: tensors only, nothing in it can run
        if state_dict_hash(state) != spec["state_sha256"]:
            raise ValueError(f"{WEIGHTS}: its tensors do not match the sha256 recorded in {SPEC}")
        config = dict(context.model_config or {})
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"model_config: unknown key {unknown[0]!r}; known: {list(CONFIG_KEYS)}")
        device = str(config.get("device") or "cpu")
        net = create_net(NetSpec.from_dict(spec["net"]))
        net.load_state_dict(state)
        self.net = net.eval().to(torch.device(device))
        self.classes = list(spec["classes"])
        costs = json.loads(Path(files["exits"]).read_text())
        self.backbone_flops = int(costs["backbone_flops"])
        self.exit_flops = [int(e["flops"]) for e in costs["exits"]]
        table = json.loads(Path(files["thresholds"]).read_text())
        self.curves = {name: CurvePoints(tuple(c["threshold"]), tuple(c["flops"]), tuple(c["accuracy"]))
                       for name, c in table["curves"].items()}
        self.batch_size = int(config.get("batch_size") or 256)
        self.default_criterion = str(config.get("criterion") or table["default_criterion"])
        self.default_budget = config.get("budget", table["default_budget"])
        self._rules: dict[tuple[str, str], Rule] = {}
        threshold = config.get("threshold")
        # the loaded rule is checked here: a bad budget or criterion fails the load, not the first request
        self.default = (Rule(self._criterion(self.default_criterion), float(threshold), None) if threshold is not None
                        else self._at_budget(self.default_criterion, self.default_budget))

    def _criterion(self, name: str) -> str:
        if name not in self.curves:
            raise ValueError(f"criterion {name!r}: this model's curves are {sorted(self.curves)}")
        return name

    def _at_budget(self, criterion: str, budget: Any) -> Rule:
        key = (self._criterion(criterion), str(budget))
        if key not in self._rules:
            read = threshold_at_budget(criterion, self.curves[criterion], self.backbone_flops, budget)
            if read.threshold is None:
                cheapest = min(self.curves[criterion].flops) / self.backbone_flops
                raise ValueError(f"budget {read.budget}: no point of the {criterion} curve costs at most {read.budget} x the "
                                 f"backbone's FLOPs (its cheapest costs {cheapest:.3f} x)")
            self._rules[key] = Rule(criterion, read.threshold, read.budget, read.flops_fraction, read.accuracy)
        return self._rules[key]

    def rule(self, params: dict[str, Any] | None) -> Rule:
        """The request's rule: its threshold, else its budget, else the rule the model was loaded with
        (read for the request's criterion when it names another)."""
        p = params or {}
        criterion = str(p.get("criterion") or self.default.criterion)
        threshold, budget = p.get("threshold"), p.get("budget")
        if threshold is not None and float(threshold) >= 0:
            return Rule(self._criterion(criterion), float(threshold), None)
        if budget is not None and not (isinstance(budget, (int, float)) and budget == 0):
            return self._at_budget(criterion, parse_budget(budget))
        if criterion == self.default.criterion:
            return self.default
        return self._at_budget(criterion, self.default_budget)

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch
        from mlflow.exceptions import MlflowException

        try:
            rule = self.rule(params)
            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            out = priced_early_exit(self.net, x, rule.threshold, rule.criterion, self.exit_flops, self.backbone_flops,
                                    self.batch_size)
        except ValueError as e:  # a bad request (its rule, its input's shape): the server answers 400 with the reason
            raise MlflowException.invalid_parameter_value(str(e)) from None
        return pd.DataFrame({
            "class": out.predictions.astype(np.int64),
            "label": [self.classes[int(c)] for c in out.predictions],
            "exit": out.exits.astype(np.int64),
            "flops": out.flops.astype(np.int64),
            "flops_fraction": out.flops_fraction.astype(np.float64),
            "threshold": np.full(len(out.exits), rule.threshold, dtype=np.float64),
        })


# ----------------------------------------------------------------------------- writing one


def curves_of(curve: pa.Table) -> dict[str, CurvePoints]:
    """curve.parquet's rows as one CurvePoints per criterion, in the table's order."""
    rows = curve.select(["criterion", "threshold", "flops", "accuracy"]).to_pylist()
    names = list(dict.fromkeys(r["criterion"] for r in rows))
    return {n: CurvePoints(*(tuple(float(r[k]) for r in rows if r["criterion"] == n) for k in ("threshold", "flops", "accuracy")))
            for n in names}


def default_budget(curve: CurvePoints, backbone_flops: int) -> float | str:
    """DEFAULT_BUDGET where the curve has a point within it, else "max"."""
    return DEFAULT_BUDGET if threshold_at_budget("", curve, backbone_flops, DEFAULT_BUDGET).threshold is not None else "max"


def write_model_files(folder: Path, net: dict[str, Any], state: dict[str, Any], classes: list[str], input_shape: tuple[int, ...],
                      exits: pa.Table, curve: pa.Table, backbone_flops: int, criterion: str) -> dict[str, str]:
    """The model's files in `folder` (see the module docstring); returns MLflow's `artifacts` mapping."""
    from safetensors.torch import save_file

    from exitflow.stages.core.state_hash import state_dict_hash

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}  # safetensors refuses shared storage
    save_file(tensors, str(folder / WEIGHTS))
    spec = {"format": FORMAT, "net": net, "state_sha256": state_dict_hash(tensors), "classes": classes,
            "input": {"shape": [-1, *input_shape], "dtype": "float32"}}
    (folder / SPEC).write_text(json.dumps(spec, indent=2))
    rows = [{k: r[k] for k in ("exit", "block", "flops", "accuracy") if k in r} for r in exits.to_pylist()]
    (folder / EXITS).write_text(json.dumps({"backbone_flops": int(backbone_flops), "exits": rows}, indent=2))
    curves = curves_of(curve)
    table = {
        "rule": BUDGET_RULE, "default_criterion": criterion, "default_budget": default_budget(curves[criterion], backbone_flops),
        "budgets": [r.as_dict() for r in budget_thresholds(curves, backbone_flops, STORED_BUDGETS)],
        "curves": {n: {"threshold": list(c.threshold), "flops": list(c.flops), "accuracy": list(c.accuracy)} for n, c in curves.items()},
    }
    (folder / THRESHOLDS).write_text(json.dumps(table, indent=2))
    return {"weights": str(folder / WEIGHTS), "spec": str(folder / SPEC), "exits": str(folder / EXITS),
            "thresholds": str(folder / THRESHOLDS)}


def signature(input_shape: tuple[int, ...]) -> Any:
    """Input: a float32 batch [-1, C, H, W]; output: a row per sample; params: the per-request rule."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape))]),
                          outputs=Schema([ColSpec(t, n) for n, t in OUTPUT]),
                          params=ParamSchema([ParamSpec(n, t, d) for n, t, d in PARAMS]))


def requirements() -> list[str]:
    """What the model needs where it is served (stated, not inferred: inferring loads it in a subprocess)."""
    found = []
    for name in ("exitflow", "mlflow", "torch", "safetensors", "numpy", "pandas"):
        try:
            found.append(f"{name}=={version(name)}")  # as pip names it (torch's "+cu130" is no part of it)
        except PackageNotFoundError:  # exitflow run from a checkout never installed: state nothing wrong
            pass
    return found


def default_rule(artifacts: dict[str, str]) -> dict[str, Any]:
    """The model_config a model is logged with: its default criterion and budget, as stored."""
    table = json.loads(Path(artifacts["thresholds"]).read_text())
    return {"criterion": table["default_criterion"], "budget": table["default_budget"]}


@dataclass(frozen=True)
class LoggedEarlyExitModel:
    """An evaluate run's model, logged by the pipeline once the run's metrics are in (`StageResult.models`)."""

    name: str
    artifacts: dict[str, str]
    input_shape: tuple[int, ...]
    example: np.ndarray  # a few test inputs: the model's input example
    tags: dict[str, str]
    metadata: dict[str, Any]
    config: dict[str, Any]  # its model_config: the exit rule it loads with

    def __call__(self, client: Any, run_id: str) -> str:
        """Log it as a LoggedModel of the run's experiment, its source run `run_id`; returns its id."""
        from mlflow.entities import LoggedModelStatus
        from mlflow.models import Model

        experiment_id = client.get_run(run_id).info.experiment_id
        model = client.create_logged_model(experiment_id=experiment_id, name=self.name, source_run_id=run_id, tags=self.tags,
                                           model_type="early-exit classifier")
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(client.tracking_uri)  # log_model writes through the fluent client
        try:
            budget = self.config.get("budget")
            example = (self.example, {"budget": budget}) if isinstance(budget, float) else self.example  # params shown too
            # pyfunc.log_model's own path, with the run named (it would log to the fluent active run)
            Model.log(artifact_path=None, flavor=mlflow.pyfunc, python_model=str(CODE_FILE), artifacts=self.artifacts,
                      signature=signature(self.input_shape), input_example=example, metadata=self.metadata,
                      model_config=self.config, pip_requirements=requirements(), model_id=model.model_id, run_id=run_id)
        finally:
            mlflow.set_tracking_uri(previous)
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        return model.model_id
