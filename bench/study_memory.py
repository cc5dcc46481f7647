"""Benchmark: the machine's peak memory during a one-seed and a three-seed digits study.

A study with more phases than free slots used to hand them all to Ray at once: each waiting
phase held a Ray Train controller, its helper actors and idle workers. With admission
(`resources.admission`, the default) a phase that does not fit waits in the driver instead.
This runs `exitflow run examples/digits.yaml` (every phase --epochs long, all three regimes) in a
fresh folder (its own local Ray and store, nothing cached) for: one seed, three seeds, and three
seeds with admission off. It samples the machine's used memory (MemTotal - MemAvailable) every
0.2 s and reports each run's peak above the idle baseline, and the ratios.

usage: python bench/study_memory.py [--epochs 2] [--runs one,three,three-no-admission]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.yaml"
RUNS = {
    "one": ["seeds=[0]"],
    "three": ["seeds=[0,1,2]"],
    "three-no-admission": ["seeds=[0,1,2]", "resources.admission=false"],
}


def used_mib() -> float:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = lambda key: float(info[key].split()[0])  # noqa: E731
    return (kib("MemTotal") - kib("MemAvailable")) / 1024


def run(name: str, epochs: int) -> tuple[float, float, float]:
    """(baseline MiB, peak MiB above it, wall s) of one study in a fresh folder."""
    sets = [f"phases.{p}.{k}={v}" for p in ("P1", "P2", "P3") for k, v in (("max_epochs", epochs), ("patience", epochs + 1))]
    sets += ["regimes=[joint,disjoint,mixed]", *RUNS[name]]
    time.sleep(5)  # let the previous run's processes go
    baseline = min(used_mib() for _ in range(5) if time.sleep(0.2) is None)
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], used_mib())
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    with tempfile.TemporaryDirectory() as cwd:
        cmd = [sys.executable, "-m", "exitflow.pipeline.cli", "run", str(EXAMPLE), *[a for s in sets for a in ("--set", s)]]
        start = time.monotonic()
        sampler.start()
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        done.set()
        wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exitflow run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return baseline, peak[0] - baseline, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--runs", default=",".join(RUNS))
    args = parser.parse_args()
    results = {}
    print("| study | peak above idle (MiB) | wall (s) |")
    print("| --- | --- | --- |")
    for name in args.runs.split(","):
        _, peak, wall = run(name, args.epochs)
        results[name] = peak
        print(f"| {name} | {peak:.0f} | {wall:.0f} |", flush=True)
    if "one" in results:
        for name in results.keys() - {"one"}:
            print(f"{name} / one: {results[name] / results['one']:.2f}x peak memory")


if __name__ == "__main__":
    main()
