"""Running a study's nodes on Ray: each node a Ray task, started once its inputs are done and the
cluster has room for it (`pipeline.admission`); a node downstream of a failure is skipped."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from exitflow.pipeline.admission import Admission
from exitflow.pipeline.dag import Graph, Node
from exitflow.pipeline.display import Display
from exitflow.pipeline.execute import NodeResult, RunContext, execute_node
from exitflow.pipeline.relay import relayed_progress
from exitflow.pipeline.stage import RunSettings, Stage, get_stage


def _node_task(ctx: RunContext, node: Node, stage: Stage, *inputs: NodeResult) -> NodeResult:
    relayed_progress()
    return execute_node(ctx, node, list(inputs), stage)


def task_name(node_id: str) -> str:
    return f"exitflow:{node_id}"


def node_task(node_id: str) -> Any:
    """The Ray task that runs one node, named after it: Ray's own notices name a task by its
    function ("Task exitflow:seed0/P1 failed. There are 1 retries remaining"), not by its name."""

    def task(ctx: RunContext, node: Node, stage: Stage, *inputs: NodeResult) -> NodeResult:
        return _node_task(ctx, node, stage, *inputs)

    task.__name__ = task.__qualname__ = task_name(node_id)
    return ray.remote(num_cpus=0)(task)


ADMISSION_POLL_S = 5.0  # how often a node waiting for room re-reads the cluster's capacity


def run_tasks(graph: Graph, to_run: list[str], ctx: RunContext, inputs: dict[str, Any], results: dict[str, NodeResult],
              show: Display, flush: Callable[[], None]) -> tuple[dict[str, str], dict[str, str]]:
    """Start each node once its inputs are done; a node downstream of a failure is skipped, not run.
    `flush` prints the lines the nodes posted so far: a node's own lines come before its verdict.
    Returns the failures (node -> why) and the skipped nodes (node -> the failed node upstream of it)."""
    waiting = list(to_run)  # topological order
    pending: dict[Any, str] = {}
    admission = Admission(enabled=ctx.settings.admission)
    told: set[str] = set()  # nodes whose wait for room was announced
    failures: dict[str, str] = {}  # node -> why it failed
    skipped: dict[str, str] = {}  # node -> the failed node upstream of it
    show.note(f"running {len(to_run)} of {len(graph.nodes)} nodes: {', '.join(to_run)}")
    while waiting or pending:
        for nid in list(waiting):
            node = graph.nodes[nid]
            blocked = [i for i in node.inputs if i in failures or i in skipped]
            if blocked:
                skipped[nid] = blocked[0] if blocked[0] in failures else skipped[blocked[0]]
                waiting.remove(nid)
            elif all(isinstance(inputs.get(i), NodeResult) for i in node.inputs):
                stage = get_stage(node.kind)  # travels with the task: a stage registered outside the project too
                need = stage.footprint(node, ctx.settings)
                if not admission.fits(need):
                    why = admission.why_waiting(need)
                    show.node(nid, "queued", "" if nid in told else f"waiting {nid}: {why}", why=why)
                    told.add(nid)
                    continue
                admission.admit(nid, need)
                ref = node_task(nid).options(name=task_name(nid), max_retries=stage.retries(node, ctx.settings),
                                   **task_resources(stage, node, ctx.settings)).remote(
                    ctx, node, stage, *[inputs[i] for i in node.inputs])
                pending[ref] = nid
                waiting.remove(nid)
                show.node(nid, "running")
        if not pending:
            break
        # A node waiting for room also waits for the cluster to grow: look again now and then.
        room_wanted = any(n in told for n in waiting)
        done, _ = ray.wait(list(pending), num_returns=1, timeout=ADMISSION_POLL_S if room_wanted else None)
        flush()
        if not done:
            continue
        nid = pending.pop(done[0])
        admission.release(nid)
        try:
            res: NodeResult = ray.get(done[0])
        except Exception as e:  # noqa: BLE001 - reported per node, raised together below
            failures[nid] = brief_error(e, ctx.storage_path)
            show.node(nid, "failed", f"FAILED  {nid}: {failures[nid]}", why=failures[nid])
            continue
        inputs[nid] = results[nid] = res
        show.node(nid, "done", describe_result(graph.nodes[nid], res))
    for nid, root in skipped.items():
        show.node(nid, "skipped", why=f"input {root} failed")
    for root in dict.fromkeys(skipped.values()):
        show.note(f"skipped {', '.join(n for n, r in skipped.items() if r == root)}: input {root} failed")
    return failures, skipped


def task_resources(stage: Stage, node: Node, settings: RunSettings) -> dict[str, float]:
    """What a node's Ray task reserves, as its stage kind declares (a task that only orchestrates holds
    nothing: Ray Train and Tune reserve their workers' own; a task that runs a net holds a worker's)."""
    res = stage.resources(node, settings)
    return {"num_cpus": res.num_cpus} | ({"num_gpus": res.num_gpus} if res.num_gpus else {})


def brief_error(e: BaseException, storage_path: str) -> str:
    """`Type: last line` of a node's error, with Ray's wrapper removed and storage paths made relative."""
    cause = getattr(e, "cause", None) or e
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    text = f"{type(cause).__name__}: {lines[-1].strip() if lines else ''}"
    for prefix in (storage_path.rstrip("/") + "/", str(Path.cwd()) + "/"):
        text = text.replace(prefix, "")
    return text


def describe_result(node: Node, res: NodeResult) -> str:
    """A finished (or cached) node's progress line."""
    how = "cached " if res.cached else "done   "
    return f"{how}{node.id:<22} {node.kind:<8} {res.seconds:6.1f}s{get_stage(node.kind).describe(res.summary)}"

