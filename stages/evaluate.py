"""The evaluate stage: a trained model on the test split, every exit and every threshold.

The compute is `stages.core.score_model.score_model` (one pass over the test set, then the curves from the
cached logits); this module plans one node per regime's final model (and seed) and declares what
the stage reads, writes and holds.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    code = ("exitflow.stages.evaluate", "exitflow.stages.core.score_model")
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
            metrics={f"test_acc_exit_{k}": a for k, a in enumerate(accs)}
            | {f"test_ece_exit_{k}": e for k, e in enumerate(out.exits.column("ece").to_pylist())}
            | {"test_acc_final": accs[-1], "backbone_flops": out.backbone_flops},
            summary={"test_acc_final": accs[-1], "backbone_flops": out.backbone_flops},
        )
