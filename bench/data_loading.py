"""Benchmark: what the data loader delivers (images/s) against what training consumes.

A phase's training loader decodes (Parquet image bytes, or digits' arrays), augments and
batches; the net then trains on each batch. If the loader delivers fewer images per second
than a training step consumes, the accelerator waits on the CPU and `data.num_workers` (or a
faster decode) is the fix. This measures both sides separately on the same spec:

- delivered: images/s of the train split's loader alone (the spec's transforms and batch size),
  for each --workers count (DataLoader processes; 0 decodes in the training process);
- consumed: images/s of P2's training step (forward, every exit's loss, backward, optimizer
  step; the spec's bf16/channels_last on CUDA) on batches already on the device, so no
  loading at all.

usage: python bench/data_loading.py [--spec examples/digits.yaml] [--workers 0,2] [--device cpu]
       [--batches 50] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exitflow.pipeline.graph import build_graph  # noqa: E402
from exitflow.pipeline.resolve import sized_net  # noqa: E402
from exitflow.pipeline.spec import load_spec  # noqa: E402
from exitflow.stages.core.data import dataset_info, load_splits, make_loader  # noqa: E402
from exitflow.stages.core.nets import create_net  # noqa: E402


def delivered(splits, batch_size: int, workers: int, batches: int) -> float:
    """Images/s of the training loader alone, after its first batch (worker start-up excluded)."""
    loader = make_loader(splits.train, batch_size, shuffle=True, seed=0, num_workers=workers, drop_last=True)
    seen, start = 0, None
    while True:
        for x, _ in loader:
            if start is None:
                start = time.perf_counter()
                continue
            seen += x.shape[0]
            if seen >= batches * batch_size:
                return seen / (time.perf_counter() - start)


def consumed(node, batch: torch.Tensor, labels: torch.Tensor, device: torch.device, steps: int) -> float:
    """Images/s of P2's training step on one batch already on the device (no loading)."""
    cfg = node.config.train
    net = create_net(sized_net(node.config.net, dataset_info(node.config.data))).to(device).train()
    x, y = batch.to(device), labels.to(device)
    if cfg.channels_last and device.type == "cuda":
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cfg.bf16 and device.type == "cuda" else contextlib.nullcontext
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        with amp():
            loss = sum(F.cross_entropy(o, y) for o in net(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up: kernel selection, allocator
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "examples" / "digits.yaml"))
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training step on CPU")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    spec = load_spec(args.spec, ["regimes=[joint]", "seeds=[0]", *args.sets])
    node = build_graph(spec).nodes["seed0/joint/P2"]
    cfg, data = node.config.train, node.config.data
    torch.set_num_threads(args.threads)
    splits = load_splits(data, 0)
    x, y = next(iter(make_loader(splits.train, cfg.batch_size, shuffle=True, seed=0)))
    need = consumed(node, x, y, torch.device(args.device), steps=max(10, args.batches // 2))
    info = dataset_info(data)
    print(f"{data.name} train split ({len(splits.train)} images, side {info.img_size}), batch {cfg.batch_size}; "
          f"{node.config.net.backbone} on {args.device}")
    print()
    print("| loader | images/s delivered | delivered / consumed |")
    print("| --- | --- | --- |")
    print(f"| (training step alone, no loading) | {need:,.0f} consumed | 1.00 |")
    for w in (int(w) for w in args.workers.split(",")):
        got = delivered(splits, cfg.batch_size, w, args.batches)
        print(f"| num_workers={w} | {got:,.0f} | {got / need:.2f} |", flush=True)


if __name__ == "__main__":
    main()
