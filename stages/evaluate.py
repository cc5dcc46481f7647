"""The evaluate stage: a trained model on the test split, every exit and every threshold.

The compute is `stages.core.score_model.score_model` (one pass over the test set, then the curves from the
cached logits); this module plans one node per regime's final model (and seed) and declares what
the stage reads, writes and holds. Each evaluated model is also logged as an MLflow model (a pyfunc
that runs true early exit at a FLOPs budget, its thresholds read off this node's own curve:
`stages/mlflow_model.py`), named after the node and linked to its run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exitflow.pipeline.dag import Graph, Node
from exitflow.pipeline.resolve import data_spec
from exitflow.pipeline.spec import StudySpec
from exitflow.pipeline.stage import (CHECKPOINT, Resources, RunSettings, Stage, StageContext, StageInput, StageResult, Table,
                            TableKind, register_stage)
from exitflow.stages.core import faults
from exitflow.stages.core.data import DataSpec
from exitflow.stages.phase_plan import final_models

EXITS = TableKind("exits", "exits.parquet", ("exit", "flops", "accuracy", "ece"), ui=True)
CURVE = TableKind("curve", "curve.parquet", ("criterion", "threshold", "flops", "accuracy", "ece"))


@dataclass(frozen=True)
class EvaluateConfig:
    """An evaluate node's config: the test split of `data` (split by `seed`), the criteria and thresholds."""

    seed: int
    data: DataSpec
    criteria: tuple[str, ...]
    thresholds: int
    threshold_spacing: str  # uniform (the paper's) | quantile
    batch_size: int


@register_stage
class Evaluate(Stage):
    kind = "evaluate"
    reads = (CHECKPOINT,)
    writes = (EXITS, CURVE)
    code = ("exitflow.stages.evaluate", "exitflow.stages.core.score_model", "exitflow.stages.mlflow_model")
    unkeyed = (("data", "download"), ("data", "root"))  # fetching changes no result; data.identity keys the content
    plan_order = 20  # after the phases, whose models it evaluates
    data_context = "evaluation"

    def plan(self, spec: StudySpec, graph: Graph) -> list[Node]:
        """One node per regime's final model and seed: the test split through every exit and threshold."""
        ev = spec.evaluation
        return [Node(id=f"seed{m.seed}/{m.regime}/{self.kind}", kind=self.kind,
                     config=EvaluateConfig(seed=m.seed, data=data_spec(spec), criteria=tuple(ev.criteria),
                                           thresholds=ev.thresholds, threshold_spacing=ev.threshold_spacing,
                                           batch_size=ev.batch_size),
                     inputs=(m.id,), phase=m.phase, regime=m.regime, seed=m.seed)
                for m in final_models(graph)]

    def resources(self, node: Node, settings: RunSettings) -> Resources:
        """The net runs over the test set in the task itself: a worker's CPUs, and its GPU when the study has them."""
        return settings.net_task()

    def describe(self, summary: dict[str, Any]) -> str:
        return f" test_acc_final={summary.get('test_acc_final', float('nan')):.4f}"

    def run(self, node: Node, inputs: list[StageInput], ctx: StageContext) -> StageResult:
        from exitflow.stages.core.score_model import score_model
        from exitflow.stages.core.nets import NetSpec

        [model] = inputs
        state, spec = model.checkpoint()
        cfg: EvaluateConfig = node.config
        # The curve maths runs on CPU either way, from the cached logits.
        device = ctx.settings.device()
        out = score_model(NetSpec.from_dict(spec["net"]), state, cfg.data, cfg.seed, list(cfg.criteria), cfg.thresholds,
                           cfg.batch_size, cfg.threshold_spacing, device)
        faults.hit(ctx.fault_plan, "evaluate", node=node.id)
        meta = {"backbone_flops": str(out.backbone_flops), "model_run_id": model.run_id}
        accs = out.exits.column("accuracy").to_pylist()
        return StageResult(
            artifacts=[Table(EXITS.name, out.exits, meta), Table(CURVE.name, out.curve, meta)],
            models=[early_exit_model(node, model, spec, state, out, cfg.criteria[0], ctx.workdir / "model")],
            metrics={f"test_acc_exit_{k}": a for k, a in enumerate(accs)}
            | {f"test_ece_exit_{k}": e for k, e in enumerate(out.exits.column("ece").to_pylist())}
            | {"test_acc_final": accs[-1], "backbone_flops": out.backbone_flops},
            summary={"test_acc_final": accs[-1], "backbone_flops": out.backbone_flops},
        )


def early_exit_model(node: Node, model: StageInput, spec: dict[str, Any], state: dict[str, Any], out: Any, criterion: str,
                     folder: Path) -> Any:
    """The evaluated model as an MLflow pyfunc (`stages.mlflow_model`), its default exit rule `criterion`
    at the default budget, tagged with this node and the phase node whose model it is."""
    from exitflow.stages.mlflow_model import FORMAT, LoggedEarlyExitModel, default_rule, model_name, write_model_files

    input_shape = tuple(int(d) for d in out.examples.shape[1:])
    files = write_model_files(folder, spec["net"], state, list(out.classes), input_shape, out.exits, out.curve,
                              out.backbone_flops, criterion)
    tags = {k: v for k, v in node.tags().items() if k not in ("exitflow.key", "exitflow.stage")}
    tags |= {"exitflow.model_node": model.node_id, "exitflow.model_run": model.run_id}
    exits = out.exits.to_pylist()
    config = default_rule(files)  # the rule it loads with: criterion, budget (set anew by `exitflow register --budget`)
    metadata = {"exitflow_format": FORMAT, "node": node.id, "model_node": model.node_id, "default_criterion": criterion,
                "default_budget": config["budget"], "budget_rule": "costliest point within budget x backbone FLOPs",
                "backbone_flops": int(out.backbone_flops), "exit_flops": [int(e["flops"]) for e in exits],
                "input": f"float32 N x {' x '.join(map(str, input_shape))}, after the data set's eval transform"}
    return LoggedEarlyExitModel(model_name(node.id), files, input_shape, out.examples.numpy(), tags, metadata, config)
