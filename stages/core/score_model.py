"""One trained net scored on the test split: one pass over the test set, then every exit and every
threshold from the cached logits (the maths: `stages.core.evaluation`). The evaluate kind
(`stages/evaluate.py`) stores the tables this returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch

from exitflow.stages.core.data import DataSpec, load_splits, make_loader
from exitflow.stages.core.evaluation import (Spacing, calibration_error, collect_logits, curve_at_exits, fixed_exit_accuracy, threshold_curve,
                                    top_probability)
from exitflow.stages.core.flops import backbone_flops, exit_flops
from exitflow.stages.core.nets import NetSpec, create_net


@dataclass
class ModelScores:
    exits: pa.Table  # exit, block, flops, accuracy, ece (each exit forced; final head included)
    curve: pa.Table  # criterion, threshold, flops, accuracy, ece, ece_equal_mass (the method's own curve under its name)
    backbone_flops: int  # the plain backbone, the budgets' reference
    examples: torch.Tensor  # the first EXAMPLES test inputs [k, C, H, W], as the net reads them (a served model's example)
    classes: tuple[str, ...]  # class names in label order


EXAMPLES = 1  # a served model's input example: one image (a 224 x 224 one is megabytes of JSON)


def score_model(
    net_spec: NetSpec,
    state: dict[str, torch.Tensor],
    data: DataSpec,
    seed: int,
    criteria: list[str],
    num_thresholds: int = 100,
    batch_size: int = 256,
    spacing: Spacing = "uniform",
    device: str = "cpu",
) -> ModelScores:
    """Evaluate one trained multi-exit net on the test split."""
    net = create_net(net_spec)
    net.load_state_dict(state)
    net.to(device)
    flops = exit_flops(net)
    base = backbone_flops(net)
    splits = load_splits(data, seed)
    test = splits.test
    logits, labels = collect_logits(net, make_loader(test, batch_size, shuffle=False, seed=seed), device)
    fixed = fixed_exit_accuracy(logits, labels).tolist()
    correct = (logits.argmax(dim=-1) == labels.unsqueeze(0)).numpy()
    ece = calibration_error(top_probability(logits), correct).tolist()
    exits = pa.table(
        {
            "exit": pa.array(range(len(flops)), pa.int32()),
            "block": pa.array(list(net.exit_blocks), pa.int32()),
            "flops": pa.array(flops, pa.int64()),
            "accuracy": pa.array(fixed, pa.float64()),
            "ece": pa.array(ece, pa.float64()),
        }
    )
    curves = [(criterion, threshold_curve(logits, labels, flops, criterion, num_thresholds, spacing)) for criterion in criteria]
    for own in net.method.curves():  # the method's own (JEI-DNN's gates, one point per lambda)
        points, taken = own.compute(net, logits)
        curves.append((own.name, {"threshold": points, **curve_at_exits(logits, labels, flops, taken, own.equal_mass_ece)}))
    parts = [
        pa.table(
            {
                "criterion": pa.array([name] * len(c["threshold"]), pa.string()),
                "threshold": pa.array(c["threshold"], pa.float64()),
                "flops": pa.array(c["flops"], pa.float64()),
                "accuracy": pa.array(c["accuracy"], pa.float64()),
                "ece": pa.array(c["ece"], pa.float64()),
                # null where the curve's source bins ECE as the house does (every curve but JEI-DNN's gates)
                "ece_equal_mass": pa.array(c.get("ece_equal_mass", [None] * len(c["threshold"])), pa.float64()),
            }
        )
        for name, c in curves
    ]
    examples = torch.stack([test[i][0] for i in range(min(EXAMPLES, len(test)))]).float()
    return ModelScores(exits=exits, curve=pa.concat_tables(parts), backbone_flops=int(base), examples=examples,
                       classes=tuple(splits.info.classes))
