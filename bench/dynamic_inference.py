"""Benchmark: measured early-exit inference against the plain backbone, beside the FLOPs-predicted speed-up.

The evaluation's curves are simulated from cached logits and priced in FLOPs. This measures
what a deployed early-exit net gains in wall-clock time: `stages.core.inference` runs a batch
block by block and drops the samples whose exit rule fires. On one trained net it:

1. trains a multi-exit net jointly (P2) for a few epochs (digits by default; a Parquet folder
   made by `exitflow data` with --data-root), and caches its test logits;
2. picks operating points on the simulated max-softmax curve: "matched" is the cheapest
   threshold whose accuracy is within --tolerance points of the final exit's, and the costliest
   points within 50 % and 75 % of the backbone's FLOPs;
3. checks, at each point, that dynamic inference makes exactly the simulated predictions;
4. times, interleaved and best of --repeat, the plain backbone (no ICs: the net a user would
   deploy without early exits), the multi-exit net's full forward (every exit), and dynamic
   inference, at batch 1 and at --batch.

It prints the predicted speed-up (backbone FLOPs / mean FLOPs of the exits taken) beside the
measured one (backbone time / dynamic time). Only ratios are results; absolute times are context.

usage: python bench/dynamic_inference.py [--backbone resnet20] [--width 16] [--epochs 6]
       [--data-root FOLDER] [--device cpu] [--batch 256] [--repeat 5] [--tolerance 0.5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from exitflow.stages.core.data import DataSpec, dataset_info, load_splits, make_loader
from exitflow.stages.core.evaluation import collect_logits, fixed_exit_accuracy, threshold_curve
from exitflow.stages.core.flops import backbone_flops, exit_flops
from exitflow.stages.core.inference import early_exit_forward, early_exit_predict
from exitflow.stages.core.loop import PhaseConfig, fit_phase, seed_everything
from exitflow.stages.core.nets import NetChoice, create_net


def interleaved_best(repeat: int, fns: dict[str, Callable[[], object]], sync: Callable[[], None]) -> dict[str, float]:
    """Best of `repeat` runs of each function, the functions taking turns, so a burst of the
    machine's other work falls on all of them alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def operating_points(curve: dict[str, np.ndarray], final_accuracy: float, base: float, tolerance: float) -> dict[str, int]:
    """Indices into the curve: the cheapest point within `tolerance` points of the final exit's
    accuracy, and the costliest points within 50 % and 75 % of the backbone's FLOPs."""
    points = {}
    near = np.flatnonzero(curve["accuracy"] >= final_accuracy - tolerance / 100)
    points[f"matched (within {tolerance:g} pt)"] = int(near[np.argmin(curve["flops"][near])])
    for budget in (0.5, 0.75):
        fits = np.flatnonzero(curve["flops"] <= budget * base)
        if fits.size:
            points[f"budget {budget:g}"] = int(fits[np.argmax(curve["flops"][fits])])
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--data-root", default=None, help="a Parquet folder (exitflow data); default: digits")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch1-samples", type=int, default=300, help="samples timed one at a time")
    parser.add_argument("--tolerance", type=float, default=0.5, help="accuracy points below the final exit's")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    data = DataSpec(name="parquet", root=args.data_root, augment=False, train_subset=args.train_subset) if args.data_root \
        else DataSpec(name="digits", augment=False)
    info = dataset_info(data)
    seed_everything(0)
    spec = NetChoice(backbone=args.backbone, width=args.width).sized(info.num_classes, info.in_chans, info.img_size)
    net = create_net(spec)
    splits = load_splits(data, seed=0)
    cfg = PhaseConfig(optimizer="adam", lr=3e-3, batch_size=64, max_epochs=args.epochs, patience=args.epochs + 1,
                      schedule="cosine", selection="mean")
    start = time.perf_counter()
    fit_phase(net, "P2", cfg, make_loader(splits.train, 64, shuffle=True, seed=0),
              make_loader(splits.val, 512, shuffle=False, seed=0), device)
    trained_s = time.perf_counter() - start
    net.eval().to(device)

    test = make_loader(splits.test, args.batch, shuffle=False, seed=0)
    logits, labels = collect_logits(net, test, device)
    flops, base = exit_flops(net), backbone_flops(net)
    curve = threshold_curve(logits, labels, flops, "max_softmax", 100, "quantile")
    final = float(fixed_exit_accuracy(logits, labels)[-1])
    batches = [x.to(device) for x, _ in test]
    singles = [x[i: i + 1] for x in batches for i in range(x.shape[0])][: args.batch1_samples]

    e, n, _ = logits.shape
    print(f"{args.backbone} width {args.width} on {data.name} test ({n} samples, {e} exits, {device.type}, "
          f"{args.threads} thread(s)); trained {args.epochs} epochs in {trained_s:.0f} s; final exit {final * 100:.2f} %")
    print("| point | threshold | accuracy (%) | predicted speed-up (FLOPs) | measured, batch 1 | measured, batch "
          f"{args.batch} | full multi-exit forward / backbone, batch {args.batch} |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for name, i in operating_points(curve, final, base, args.tolerance).items():
            threshold = float(curve["threshold"][i])
            dynamic = early_exit_predict(net, test, threshold, "max_softmax", device)
            accuracy = float((dynamic.predictions == labels).double().mean())
            assert accuracy == curve["accuracy"][i], "dynamic inference must make the simulated predictions"
            predicted = base / float(np.asarray(flops, dtype=np.float64)[dynamic.exits.numpy()].mean())
            batched = interleaved_best(args.repeat, {
                "backbone": lambda: [net.backbone(x) for x in batches],
                "full": lambda: [net(x) for x in batches],
                "dynamic": lambda: [early_exit_forward(net, x, threshold) for x in batches],
            }, sync)
            single = interleaved_best(max(1, args.repeat // 2), {
                "backbone": lambda: [net.backbone(x) for x in singles],
                "dynamic": lambda: [early_exit_forward(net, x, threshold) for x in singles],
            }, sync)
            print(f"| {name} | {threshold:.4f} | {accuracy * 100:.2f} | {predicted:.2f}x | "
                  f"{single['backbone'] / single['dynamic']:.2f}x | {batched['backbone'] / batched['dynamic']:.2f}x | "
                  f"{batched['full'] / batched['backbone']:.2f} |")


if __name__ == "__main__":
    main()
