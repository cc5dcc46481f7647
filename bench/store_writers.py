"""Benchmark: one SQLite tracking store written through one MLflow server, or through two at once.

Every `exitflow` command serves a local sqlite store with an MLflow server of its own, so two
commands on one store are two servers writing one SQLite file, each with its own connections. This
writes a study's pattern of calls (a run created, params, batches of metrics, tags, a search, the
run ended) from `--threads` threads in all, spread over `--servers` servers on one fresh store,
for `--seconds`, and counts what failed and how long each call took: whether SQLite's busy timeout
(MLflow sets 20 s per session) and MLflow's client retries are enough, or whether commands on one
store would need to share one server.

usage: python bench/store_writers.py [--servers 1 2] [--threads 8] [--seconds 30]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
T = TypeVar("T")


def _writer(url: str, experiment: str, stop: float, latencies: list[float], errors: Counter[str], lock: threading.Lock) -> None:
    """Runs like a stage's, one after another, until `stop`: every call timed, every failure counted."""
    from mlflow.entities import Metric, Param

    from exitflow.pipeline.tracking import client

    c = client(url)

    def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        t = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - counted, not raised: the benchmark goes on
            with lock:
                errors[f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"] += 1
            return None
        finally:
            with lock:
                latencies.append(time.monotonic() - t)

    exp = c.get_experiment_by_name(experiment).experiment_id
    while time.monotonic() < stop:
        run = call(c.create_run, exp, tags={"exitflow.key": f"k{threading.get_ident()}-{time.monotonic_ns()}"})
        if run is None:
            continue
        rid = run.info.run_id
        call(c.log_batch, rid, params=[Param(f"p{i}", str(i)) for i in range(20)])
        for step in range(10):  # ten epochs of a phase
            ts = int(time.time() * 1000)
            call(c.log_batch, rid, metrics=[Metric(f"val_acc_exit_{k}", 0.5, ts, step) for k in range(6)])
        call(c.set_tag, rid, "exitflow.summary", "{}")
        call(c.search_runs, [exp], filter_string="attributes.status = 'FINISHED'", max_results=50)
        call(c.set_terminated, rid, "FINISHED")


def measure(servers: int, threads: int, seconds: float) -> dict[str, object]:
    """Calls, failures and latencies of `threads` writers over `servers` servers on one fresh store."""
    from exitflow.pipeline.tracking import client, ensure_experiment
    from exitflow.pipeline.tracking_server import serve_store

    with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as stack:
        uri = f"sqlite:///{Path(d) / 'mlflow.db'}"
        urls = [stack.enter_context(serve_store(uri)) for _ in range(servers)]
        ensure_experiment(client(urls[0]), "bench")
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        lock = threading.Lock()
        stop = time.monotonic() + seconds
        pool = [threading.Thread(target=_writer, args=(urls[i % servers], "bench", stop, latencies, errors, lock))
                for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        runs = client(urls[0]).search_runs([client(urls[0]).get_experiment_by_name("bench").experiment_id],
                                           max_results=5000)
    latencies.sort()
    return {"servers": servers, "calls": len(latencies), "failed": sum(errors.values()),
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "max_ms": 1000 * latencies[-1], "runs": len(runs), "unfinished": sum(r.info.status != "FINISHED" for r in runs),
            "errors": dict(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    print("| servers | calls | failed | p50 ms | p99 ms | max ms | runs | unfinished |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in args.servers:
        r = measure(n, args.threads, args.seconds)
        print(f"| {r['servers']} | {r['calls']} | {r['failed']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['max_ms']:.0f} "
              f"| {r['runs']} | {r['unfinished']} |", flush=True)
        for e, k in r["errors"].items():  # type: ignore[union-attr]
            print(f"    {k} x {e}")


if __name__ == "__main__":
    main()
