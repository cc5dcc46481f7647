"""Benchmark: where the CPU of a small study goes, process kind by process kind.

On digits a phase trains in about a second, yet a study's stages take tens of seconds: every
Ray Train fit starts processes (its controller, its workers, Train's helper actors), and each
imports Ray Train and PyTorch before it does anything. This runs `exitflow run` once (its own
local Ray on loopback, its own store, nothing cached) and samples /proc every 0.2 s, adding up
the CPU time of every process the command started, grouped by process title (`ray::TrainController`,
`ray::RayTrainWorker`, ...): what a fit costs besides its epochs, and what a change to that saves.

The default study is the fault matrix's (tests/test_fault_matrix.py): disjoint, a fixed-lr P1 and
a search over two P3 rates: three fits, one of them outside Tune.

usage: python bench/fit_processes.py [--spec examples/digits.yaml] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ["regimes=[disjoint]", "net.width=8", "evaluation.thresholds=20", "resources.torch_threads=1",
         "phases.P1.max_epochs=2", "phases.P1.patience=3",
         "phases.P3.lr=[1.0e-6,3.0e-3]", "phases.P3.max_epochs=2", "phases.P3.patience=1"]
TICK = os.sysconf("SC_CLK_TCK")


def _proc(pid: int) -> tuple[int, int, float, str] | None:
    """(parent pid, start tick, CPU seconds, title) of a live process, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / TICK, title


class Sampler(threading.Thread):
    """The CPU time and title of every descendant of `root`, sampled until stopped (the last sample
    of a process that exits stands for its total: at most one interval of CPU is missed)."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.interval, self.done = root, interval, threading.Event()
        self.seen: dict[tuple[int, int], tuple[str, float]] = {}
        self.family = {root}

    def run(self) -> None:
        while not self.done.is_set():
            procs = {pid: p for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if (p := _proc(pid))}
            grew = True
            while grew:  # descendants: children of the family, until no new one (a daemon's reparented child stays known)
                new = {pid for pid, p in procs.items() if p[0] in self.family and pid not in self.family}
                self.family |= new
                grew = bool(new)
            for pid in self.family & procs.keys():
                _, start, cpu, title = procs[pid]
                old = self.seen.get((pid, start))
                self.seen[(pid, start)] = (title or (old[0] if old else "?"), cpu)
            time.sleep(self.interval)


def _kind(title: str) -> str:
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]  # ray::execute.<fn> -> ray::execute
    words = title.split()
    name = Path(words[0]).name if words else "?"
    if name.startswith("python") and len(words) > 1:
        rest = words[1:]
        if rest[0] == "-m" and len(rest) > 1:
            return f"python -m {rest[1]}"
        if rest[0] in ("-c", "-B", "-u"):
            return f"python {' '.join(rest[:2])}"[:60]
        return f"python {Path(rest[0]).name}"
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(ROOT / "examples" / "digits.yaml"))
    ap.add_argument("--set", action="append", default=[], dest="sets")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, "-m", "exitflow.pipeline.cli", "run", args.spec]
        for s in [*STUDY, f"tracking.storage_path={work}/ray", f"tracking.uri=sqlite:///{work}/mlflow.db", *args.sets]:
            cmd += ["--set", s]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler = Sampler(proc.pid)
        sampler.start()
        out, err = proc.communicate()
        wall = time.monotonic() - start
        sampler.done.set()
        sampler.join()
    if proc.returncode != 0:
        sys.exit(f"exitflow run failed ({proc.returncode}):\n{err[-3000:]}")
    cpu, count = collections.Counter(), collections.Counter()
    for title, seconds in sampler.seen.values():
        cpu[_kind(title)] += seconds
        count[_kind(title)] += 1
    total = sum(cpu.values())
    trained = next((ln for ln in out.splitlines() if ln.startswith("pipeline run")), "")
    print(f"{trained}\nwall {wall:.1f} s; CPU of every process it started {total:.1f} s\n")
    print("| process kind | processes | CPU (s) | share |\n| --- | --- | --- | --- |")
    for kind, seconds in cpu.most_common():
        if seconds >= 0.5:
            print(f"| `{kind}` | {count[kind]} | {seconds:.1f} | {seconds / total:.0%} |")


if __name__ == "__main__":
    main()
