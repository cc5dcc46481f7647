"""Benchmark: a learning-rate search with and without ASHA, on the digits default.

Both searches see the same phase (P1 of examples/digits.yaml: resnet20, Adam, cosine, early
stopping) and the same 4-value grid; the figure of merit is how many epochs each trains in
total and whether both choose the same learning rate. Wall time is printed as a ratio within
this one run only (shared machines are noisy).

usage: python bench/tune_asha.py [--grid 3e-3,1e-3,1e-4,1e-5] [--epochs 15] [--grace 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray

from exitflow.pipeline.resolve import sized_net
from exitflow.pipeline.ray_session import local_env
from exitflow.pipeline.spec import load_spec
from exitflow.stages.core.data import dataset_info
from exitflow.stages.phase_kind import PhaseJob
from exitflow.stages.phase_plan import SearchPlan, phase_config
from exitflow.stages.ray_train import scaling_config
from exitflow.stages.ray_tune import SearchOutcome, run_search

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.yaml"


def p1_job(epochs: int) -> PhaseJob:
    """P1 of the digits example, with `epochs` as its cap."""
    study = load_spec(EXAMPLE, [f"phases.P1.max_epochs={epochs}"])
    config = phase_config(study, "P1", seed=0)  # the P1 node's own config (selection: final)
    return PhaseJob(config=config, net=sized_net(config.net, dataset_info(config.data)), torch_threads=1, label="bench/P1")


def search(job: PhaseJob, grid: tuple[float, ...], scheduler: str, grace: int, storage: str) -> tuple[SearchOutcome, float]:
    plan = SearchPlan(grid=grid, scheduler=scheduler, grace_period=grace, reduction_factor=2)
    start = time.perf_counter()
    out = run_search(job, plan, scaling_config(1, False, 1.0, 0.0), f"bench-{scheduler}", storage, 0)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="3e-3,1e-3,1e-4,1e-5", help="comma-separated learning rates")
    parser.add_argument("--epochs", type=int, default=15, help="max epochs per trial")
    parser.add_argument("--grace", type=int, default=2, help="ASHA grace period (epochs)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    grid = tuple(float(x) for x in args.grid.split(","))

    env = local_env()
    os.environ.update(env)  # this process runs the searches (Tune's driver side) too
    ray.init(num_cpus=4, include_dashboard=True, runtime_env={"env_vars": env}, logging_level="WARNING")
    job = p1_job(args.epochs)
    results = {}
    with tempfile.TemporaryDirectory() as storage:
        for scheduler in ("none", "asha"):
            out, seconds = search(job, grid, scheduler, args.grace, storage)
            results[scheduler] = {
                "chosen_lr": out.best.lr,
                "best_val": out.best.best_val,
                "total_epochs": sum(t.epochs for t in out.trials),
                "seconds": seconds,
                "trials": [{"lr": t.lr, "epochs": t.epochs, "best_val": t.best_val, "stopped_by": t.stopped_by}
                           for t in sorted(out.trials, key=lambda t: t.lr)],
            }
    ray.shutdown()

    full, asha = results["none"], results["asha"]
    print(f"grid {list(grid)}, max_epochs {args.epochs}, ASHA grace {args.grace}, reduction factor 2")
    for name, r in (("full grid", full), ("ASHA", asha)):
        trials = ", ".join(f"{t['lr']:g}: {t['epochs']} ep {t['best_val']:.3f}{' (' + t['stopped_by'] + ')' if t['stopped_by'] else ''}"
                           for t in r["trials"])
        print(f"{name:>9}: {r['total_epochs']:3d} epochs, chose lr {r['chosen_lr']:g} (val {r['best_val']:.4f})  [{trials}]")
    print(f"ASHA / full grid: epochs {asha['total_epochs'] / full['total_epochs']:.2f}, "
          f"wall time {asha['seconds'] / full['seconds']:.2f}; same lr: {asha['chosen_lr'] == full['chosen_lr']}, "
          f"same best validation score: {asha['best_val'] == full['best_val']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
