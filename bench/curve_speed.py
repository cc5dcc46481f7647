"""Benchmark: the threshold curve from cached logits, against the alternatives it replaces.

Evaluation runs one forward pass over the test set and computes every threshold from the
cached [exits, samples, classes] logits, vectorized. This measures, in one run on one machine:

- the forward pass that fills the cache (resnet20 on the digits test split);
- the vectorized curves (100 thresholds x 2 criteria) from that cache;
- the literal definition (per threshold, per sample, walk the exits in Python) on the same cache;
- what a per-threshold forward pass would cost (100 thresholds x 2 criteria x the forward pass).

Only ratios are printed as results (shared machines are noisy); absolute times are context.

usage: python bench/curve_speed.py [--thresholds 100] [--repeat 5]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from exitflow.stages.core.data import DataSpec, load_splits, make_loader
from exitflow.stages.core.evaluation import CRITERIA, collect_logits, threshold_curve
from exitflow.stages.core.flops import exit_flops
from exitflow.stages.core.nets import NetSpec, create_net


def literal_curve(logits: torch.Tensor, labels: torch.Tensor, flops: list[int], criterion: str, num: int) -> np.ndarray:
    """The README's definition ("The maths, exactly"), read literally: a Python loop over thresholds, samples and exits."""
    e, n, c = logits.shape
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    conf = probs.max(-1) if criterion == "max_softmax" else -(probs * np.log(probs)).sum(-1)
    thresholds = np.linspace(0.0, 1.0 if criterion == "max_softmax" else math.log(c), num)
    accuracy = []
    for t in thresholds:
        right = 0
        for i in range(n):
            k = next((j for j in range(e - 1) if (conf[j, i] > t if criterion == "max_softmax" else conf[j, i] < t)), e - 1)
            right += int(probs[k, i].argmax() == int(labels[i]))
        accuracy.append(right / n)
    return np.array(accuracy)


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """The fastest of `repeat` runs: the least disturbed by the machine's other work."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thresholds", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    net = create_net(NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exit_every=2, exit_start=2))
    flops = exit_flops(net)
    test = load_splits(DataSpec(name="digits"), seed=0).test
    loader = make_loader(test, 256, shuffle=False, seed=0)
    forward = best_of(args.repeat, lambda: collect_logits(net, loader, "cpu"))
    logits, labels = collect_logits(net, loader, "cpu")

    vectorized = best_of(args.repeat, lambda: [threshold_curve(logits, labels, flops, c, args.thresholds) for c in CRITERIA])
    literal = best_of(1, lambda: [literal_curve(logits, labels, flops, c, args.thresholds) for c in CRITERIA])
    for c in CRITERIA:  # the benchmark compares like with like
        assert np.array_equal(threshold_curve(logits, labels, flops, c, args.thresholds)["accuracy"],
                              literal_curve(logits, labels, flops, c, args.thresholds))
    per_threshold_forward = forward * args.thresholds * len(CRITERIA)

    e, n, c = logits.shape
    print(f"resnet20 on digits test: {n} samples, {e} exits, {c} classes; {args.thresholds} thresholds x {len(CRITERIA)} criteria")
    print(f"  one forward pass (fills the cache)   {forward * 1e3:9.1f} ms")
    print(f"  vectorized curves from the cache     {vectorized * 1e3:9.1f} ms")
    print(f"  literal per-sample loop, same cache  {literal * 1e3:9.1f} ms")
    print(f"ratios: literal / vectorized = {literal / vectorized:.0f}x; "
          f"per-threshold forward passes / (one pass + vectorized) = {per_threshold_forward / (forward + vectorized):.0f}x; "
          f"vectorized curves / one forward pass = {vectorized / forward:.2f}")


if __name__ == "__main__":
    main()
