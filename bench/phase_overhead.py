"""Benchmark: one training phase through exitflow against the same epochs of a bare PyTorch loop.

The phase is joint's P2 of a spec (by default `examples/digits.yaml`): every exit trained at
once from scratch, early stopping switched off (patience above the epoch count), so both sides
train exactly --epochs epochs (two counts, E1 < E2) of the same net on the same loaders with
the same optimizer, schedule and per-epoch validation.

- **Bare loop**: a hand-written PyTorch loop in this process (net, loaders, Adam/SGD, cosine
  schedule, sum of every exit's cross-entropy, a validation pass per epoch). Nothing else.
- **exitflow**: `exitflow run SPEC --set regimes=[joint]` in a fresh folder (its own Ray, its own
  store, nothing cached), as a user runs it. From the study's results (`pipeline.results`): the
  phase's epochs as timed inside the Train worker, and the train stage's wall time (its Ray Train
  start-up, per-epoch reports and checkpoints, the model's upload).

Ratios, per epoch, from the difference between the two epoch counts (so fixed costs cancel):
- in-loop: exitflow's epochs / the bare loop's (the core loop against a hand-written one);
- train stage: the stage's marginal wall time per epoch / the bare loop's (the goal: <= 1.10x);
and apart, the fixed costs: the stage's (Ray Train's worker group, the checkpoint upload) and the
whole command's (Ray's start, the MLflow server, evaluation, the report).

usage: python bench/phase_overhead.py [--spec examples/digits.yaml] [--epochs 2,6] [--device cpu]
       [--set KEY=VALUE ...] (spec overrides for both sides, e.g. --set data.root=... --set net.width=8)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exitflow.pipeline.graph import build_graph  # noqa: E402
from exitflow.pipeline.spec import load_spec  # noqa: E402
from exitflow.stages.core.data import dataset_info, load_splits, make_loader  # noqa: E402
from exitflow.stages.core.loop import seed_everything  # noqa: E402
from exitflow.stages.core.nets import create_net  # noqa: E402
from exitflow.pipeline.resolve import sized_net  # noqa: E402

NODE = "seed0/joint/P2"
RUN_ID = re.compile(r"pipeline run ([0-9a-f]{32})")


def phase_sets(epochs: int, device: str) -> list[str]:
    sets = ["regimes=[joint]", "seeds=[0]", f"phases.P2.max_epochs={epochs}", f"phases.P2.patience={epochs + 1}"]
    if device == "cuda":
        sets += ["resources.use_gpu=true", "resources.gpus_per_worker=1"]
    return sets


def phase_node(spec_path: str, sets: list[str]):
    spec = load_spec(spec_path, sets)
    return build_graph(spec).nodes[NODE], spec


def bare_loop(spec_path: str, sets: list[str], device: torch.device, threads: int) -> list[float]:
    """Seconds of each epoch (train + validation) of a plain PyTorch loop over the phase's net and data."""
    node, _ = phase_node(spec_path, sets)
    cfg, data = node.config.train, node.config.data
    torch.set_num_threads(threads)
    seed_everything(0)
    splits = load_splits(data, 0)
    train = make_loader(splits.train, cfg.batch_size, shuffle=True, seed=0, num_workers=data.num_workers,
                        drop_last=len(splits.train) > cfg.batch_size)
    val = make_loader(splits.val, cfg.batch_size, shuffle=False, seed=0, num_workers=data.num_workers)
    net = create_net(sized_net(node.config.net, dataset_info(data))).to(device)
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt_cls = {"sgd": lambda p: torch.optim.SGD(p, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
               "adam": lambda p: torch.optim.Adam(p, lr=cfg.lr, weight_decay=cfg.weight_decay),
               "adamw": lambda p: torch.optim.AdamW(p, lr=cfg.lr, weight_decay=cfg.weight_decay)}[cfg.optimizer]
    opt = opt_cls(net.parameters())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.max_epochs * len(train))
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cfg.bf16 and device.type == "cuda" else contextlib.nullcontext
    times = []
    for _ in range(cfg.max_epochs):
        start = time.perf_counter()
        net.train()
        for x, y in train:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp():
                loss = sum(F.cross_entropy(o, y) for o in net(x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        correct = torch.zeros(net.num_exits, device=device)
        with torch.inference_mode():
            for x, y in val:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with amp():
                    correct += (torch.stack(net(x)).argmax(-1) == y).sum(1)
        correct.tolist()  # syncs the device: the clock below is honest
        times.append(time.perf_counter() - start)
    return times


def exitflow_run(spec_path: str, sets: list[str]) -> dict[str, float]:
    """The whole command's wall time, and the phase's epochs and stage wall time, from a fresh folder."""
    with tempfile.TemporaryDirectory() as cwd:
        cmd = [sys.executable, "-m", "exitflow.pipeline.cli", "run", str(Path(spec_path).resolve()), *[a for s in sets for a in ("--set", s)]]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        command = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"exitflow run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        run_id = RUN_ID.findall(proc.stdout)[-1]
        from exitflow.pipeline.results import open_study

        here = os.getcwd()
        os.chdir(cwd)  # the default store is ./mlflow.db + ./mlartifacts of the folder the study ran in
        try:
            with open_study(run_id) as study:
                cost = study.costs().set_index("node").loc[NODE]
                history = study.histories()
        finally:
            os.chdir(here)
    epochs = history[history["node"] == NODE].sort_values("epoch")
    return {"command": command, "stage": float(cost["wall_seconds"]), "epochs": float(epochs["epoch_time"].sum()),
            "first_epoch": float(epochs["epoch_time"].iloc[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "examples" / "digits.yaml"))
    parser.add_argument("--epochs", default="2,6", help="two epoch counts E1,E2 (E1 < E2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--set", dest="sets", action="append", default=[], help="a spec override for both sides")
    args = parser.parse_args()
    e1, e2 = (int(e) for e in args.epochs.split(","))
    if not 0 < e1 < e2:
        raise SystemExit("--epochs: two counts E1 < E2")
    device = torch.device(args.device)
    _, spec = phase_node(args.spec, phase_sets(e1, args.device) + args.sets)
    threads = spec.resources.torch_threads or max(1, int(spec.resources.cpus_per_worker))
    print(f"{NODE} of {Path(args.spec).name} on {device.type} ({threads} torch thread(s)); epochs {e1} and {e2}", flush=True)

    bare, flow = {}, {}
    for e in (e1, e2):  # exitflow first: a cold start is what the user sees; the bare loop then runs warm
        sets = phase_sets(e, args.device) + args.sets
        flow[e] = exitflow_run(args.spec, sets)
        bare[e] = sum(bare_loop(args.spec, sets, device, threads))
        print(f"  {e} epochs: bare loop {bare[e]:.1f} s; exitflow epochs {flow[e]['epochs']:.1f} s, "
              f"train stage {flow[e]['stage']:.1f} s, whole command {flow[e]['command']:.1f} s", flush=True)

    per = lambda d: (d[e2] - d[e1]) / (e2 - e1)  # noqa: E731  per-epoch cost, fixed costs cancelled
    bare_epoch = per(bare)
    loop_epoch = per({e: flow[e]["epochs"] for e in flow})
    stage_epoch = per({e: flow[e]["stage"] for e in flow})
    stage_fixed = flow[e2]["stage"] - e2 * stage_epoch
    command_fixed = flow[e2]["command"] - flow[e2]["stage"]
    print()
    print("| figure | value |")
    print("| --- | --- |")
    print(f"| bare loop, per epoch | {bare_epoch:.3f} s |")
    print(f"| exitflow's epochs / bare loop, per epoch (in-loop) | {loop_epoch / bare_epoch:.2f}x |")
    print(f"| train stage / bare loop, per epoch (goal <= 1.10x) | {stage_epoch / bare_epoch:.2f}x |")
    print(f"| train stage's fixed cost (Ray Train start-up, checkpoint upload) | {stage_fixed:.1f} s = {stage_fixed / bare_epoch:.1f} bare epochs |")
    print(f"| the rest of the command (Ray, MLflow server, evaluation, report) | {command_fixed:.1f} s = {command_fixed / bare_epoch:.1f} bare epochs |")
    print(f"| whole command / bare loop at {e2} epochs | {flow[e2]['command'] / bare[e2]:.2f}x |")


if __name__ == "__main__":
    main()
