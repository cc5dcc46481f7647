"""Execute one DAG node: cache lookup, the stage's MLflow run, the stage itself, its artifacts.

Runs inside a Ray task (no CPU held) on any node of the cluster: everything it needs
arrives as plain values, and its inputs are read from the tracking store by run id.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline import tracking
from pipeline.artifacts import ArtifactError, ArtifactStore
from pipeline.graph import Node
from pipeline.locks import key_lock
from pipeline.resolve import data_spec, loop_config, net_spec
from pipeline.spec import StudySpec
from stages import faults

log = logging.getLogger(__name__)

INVALID_PREFIX = "invalid:"  # a run whose artifacts failed verification keeps its key under this prefix
DIVERGED_TAG = "exitflow.diverged"  # on a phase that diverged (FAILED) or a search with diverged trials


class PhaseDiverged(RuntimeError):
    """A fixed-lr phase's loss became non-finite: the phase fails, and is never cached."""


@dataclass(frozen=True)
class RunContext:
    """What every node task needs from the driver (picklable, absolute paths only)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    storage_path: str
    spec: dict[str, Any]  # StudySpec.model_dump(mode="json")
    fault_plan: faults.Plan = ()  # from $EXITFLOW_FAULT, for fault-injection tests

    def study(self) -> StudySpec:
        return StudySpec.model_validate(self.spec)


@dataclass
class NodeResult:
    node_id: str
    key: str
    run_id: str
    cached: bool
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointSource:
    """Loads an input model's state from the tracking store (called on the Train worker)."""

    tracking_uri: str
    run_id: str

    def __call__(self) -> dict[str, Any]:
        state, _ = ArtifactStore(tracking.client(self.tracking_uri)).load_checkpoint(self.run_id)
        return state


@dataclass(frozen=True)
class TrialRuns:
    """Creates each Tune trial's nested MLflow run under its tune stage (picklable)."""

    tracking_uri: str
    experiment_id: str
    stage_run_id: str
    base_tags: tuple[tuple[str, str], ...]

    def _find(self, c: Any, trial_name: str) -> Any | None:
        found = c.search_runs([self.experiment_id], filter_string=f"tags.`exitflow.trial` = '{trial_name}'", max_results=1)
        return found[0] if found else None

    def __call__(self, trial_name: str, lr: float) -> tracking.MetricsSink:
        c = tracking.client(self.tracking_uri)
        found = self._find(c, trial_name)
        if found is not None:  # a resumed trial keeps logging to its run, now under this stage run
            run_id = found.info.run_id
            c.set_tag(run_id, tracking.PARENT_TAG, self.stage_run_id)
            tracking.set_owner(c, run_id)
            c.update_run(run_id, status="RUNNING")
        else:
            tags = {**dict(self.base_tags), **tracking.owner_tags(), "exitflow.stage": "trial", "exitflow.trial": trial_name}
            # A trial is not its stage: it must never be found as the stage's cached (or stale) run.
            tags["exitflow.search_key"] = tags.pop("exitflow.key")
            run_id = tracking.start_run(c, self.experiment_id, f"trial lr={lr:.3g}", tags, self.stage_run_id)
            c.log_param(run_id, "lr", lr)
        return tracking.MetricsSink(self.tracking_uri, run_id)

    def adopt(self, search_name: str, search: Any) -> None:
        """After a search: every trial's run sits under this stage run with its outcome, none left RUNNING.

        Trials that finished in an earlier, interrupted attempt join this stage run; trials the
        scheduler stopped (their process was killed before they could close their run) end here.
        """
        from stages.tune import trial_run_name

        c = tracking.client(self.tracking_uri)
        for t in search.trials:
            run = self._find(c, trial_run_name(search_name, t.trial))
            if run is None:
                continue
            c.set_tag(run.info.run_id, tracking.PARENT_TAG, self.stage_run_id)
            c.set_tag(run.info.run_id, "exitflow.stopped_by", t.stopped_by or "max_epochs")
            c.set_tag(run.info.run_id, "exitflow.chosen", str(t.trial == search.best.trial).lower())
            tracking.log_metrics(c, run.info.run_id, {"best_val": t.best_val, "epochs": t.epochs})
            # The search is the authority: a stopped trial's dead process may have been taken
            # for a crash (FAILED) by another exitflow run's recovery in the meantime.
            if run.info.status != "FINISHED":
                tracking.end_run(c, run.info.run_id, "FINISHED")

    def abandon(self, search_name: str) -> None:
        """After a failed search: the trial runs still open are KILLED (a re-run resumes those trials)."""
        c = tracking.client(self.tracking_uri)
        query = f"tags.`exitflow.trial` LIKE '{search_name}-%' and attributes.status = 'RUNNING'"
        for r in c.search_runs([self.experiment_id], filter_string=query):
            c.set_tag(r.info.run_id, "exitflow.note", "the search failed while this trial was open; a re-run resumes it")
            tracking.end_run(c, r.info.run_id, "KILLED")


def execute_node(ctx: RunContext, node: Node, inputs: list[NodeResult]) -> NodeResult:
    """Reuse a finished, verified run with the node's key, or run the stage."""
    start = time.monotonic()
    c = tracking.client(ctx.tracking_uri)
    store = ArtifactStore(c, ctx.fault_plan)
    with key_lock(ctx.storage_path, node.key):
        # Another run of the same study may have finished this node while we waited.
        hit = cached_result(c, store, ctx.experiment_id, node)
        if hit is not None:
            return hit
        stale = tracking.find_stale(c, ctx.experiment_id, node.key)
        for run_id in stale:  # holding the lock, no live process owns these: they are zombies
            c.set_tag(run_id, "exitflow.recovered", "marked FAILED by a later run")
            tracking.end_run(c, run_id, "FAILED")
        tags = {**node.tags(), **tracking.owner_tags()}
        if stale:
            tags["exitflow.resumes"] = stale[0]
        run_id = tracking.start_run(c, ctx.experiment_id, node.id, tags, ctx.parent_run_id)
        try:
            summary = _dispatch(ctx, c, store, node, run_id, inputs)
        except BaseException:
            tracking.end_run(c, run_id, "FAILED")
            raise
        tracking.end_run(c, run_id, "FINISHED")
    return NodeResult(node.id, node.key, run_id, False, time.monotonic() - start, summary)


def cached_result(c: Any, store: ArtifactStore, experiment_id: str, node: Node) -> NodeResult | None:
    """The node's finished run, if its artifacts verify; a corrupted one is set aside (re-run)."""
    start = time.monotonic()
    run_id = tracking.find_finished(c, experiment_id, node.key)
    if run_id is None:
        return None
    try:
        store.verify_all(run_id)
    except ArtifactError as e:
        log.warning("%s: cached run %s refused (%s); re-running the stage", node.id, run_id, e)
        c.set_tag(run_id, "exitflow.key", INVALID_PREFIX + node.key)
        c.set_tag(run_id, "exitflow.invalid", str(e)[:500])
        return None
    return NodeResult(node.id, node.key, run_id, True, time.monotonic() - start, _summary(c, run_id))


def _summary(c: Any, run_id: str) -> dict[str, Any]:
    run = c.get_run(run_id)
    return json.loads(run.data.tags.get("exitflow.summary", "{}"))


def _finish_summary(c: Any, run_id: str, summary: dict[str, Any]) -> dict[str, Any]:
    c.set_tag(run_id, "exitflow.summary", json.dumps(summary, default=float))
    return summary


def _dispatch(ctx: RunContext, c: Any, store: ArtifactStore, node: Node, run_id: str, inputs: list[NodeResult]) -> dict[str, Any]:
    if node.kind in ("train", "tune"):
        return _run_phase(ctx, c, store, node, run_id, inputs)
    if node.kind == "evaluate":
        return _run_evaluate(ctx, c, store, node, run_id, inputs[0])
    if node.kind == "report":
        return _run_report(ctx, c, store, node, run_id, inputs)
    raise ValueError(f"unknown stage kind {node.kind!r}")


# ----------------------------------------------------------------------------- phases


def _run_phase(ctx: RunContext, c: Any, store: ArtifactStore, node: Node, run_id: str, inputs: list[NodeResult]) -> dict[str, Any]:
    from stages.data import dataset_info
    from stages.train import PhaseJob, run_phase, scaling_config
    from stages.tune import SearchPlan, run_search

    study = ctx.study()
    cfg = node.config
    phase = node.phase or cfg["phase"]
    res = study.resources
    pc = getattr(study.phases, phase)
    data = data_spec(cfg["data"])
    ns = net_spec(cfg["net"], dataset_info(data))
    selection = cfg.get("selection", "final")  # in the node's config, hence in its key
    lcfg = loop_config(cfg["train"], phase, selection)
    threads = res.torch_threads or max(1, int(res.cpus_per_worker))
    job = PhaseJob(
        phase=phase,
        seed=int(cfg["seed"]),
        data=data.to_dict(),
        net=ns.to_dict(),
        train=lcfg.to_dict(),
        selection=selection,
        init_from=CheckpointSource(ctx.tracking_uri, inputs[0].run_id) if inputs else None,
        metrics_sink=tracking.MetricsSink(ctx.tracking_uri, run_id),
        torch_threads=threads,
        fault_plan=ctx.fault_plan,
        label=node.id,
    )
    tracking.log_params(c, run_id, _flat_params({"phase": phase, "seed": cfg["seed"], "net": ns.to_dict(), "data": data.to_dict(), "train": cfg["train"]}))
    scaling = scaling_config(res.num_workers, res.use_gpu, res.cpus_per_worker, res.gpus_per_worker)
    name = f"{node.key}-{phase}"
    lineage = dict(inputs[0].summary.get("lrs", {})) if inputs else {}
    # Learning rates that diverged upstream and here (searches only: a diverged phase fails)
    diverged = dict(inputs[0].summary.get("diverged", {})) if inputs else {}
    summary: dict[str, Any] = {"phase": phase}
    if node.kind == "train":
        outcome = run_phase(job, scaling, name, ctx.storage_path, res.max_failures)
        lr = lcfg.lr
        if outcome.diverged:
            c.set_tag(run_id, DIVERGED_TAG, outcome.diverged)
            raise PhaseDiverged(f"{node.id} diverged: {outcome.diverged} (lr={lr:g}); "
                                f"lower phases.{phase}.lr or set phases.{phase}.grad_clip")
    else:
        values = pc.lr_values()
        plan = SearchPlan(
            grid=tuple(values) if values is not None else None,
            loguniform=tuple(pc.lr.loguniform) if values is None else None,  # type: ignore[union-attr]
            num_samples=1 if values is not None else pc.lr.num_samples,  # type: ignore[union-attr]
            scheduler=study.search.scheduler,
            grace_period=study.search.grace_period,
            reduction_factor=study.search.reduction_factor,
            max_concurrent_trials=study.search.max_concurrent_trials,
        )
        trial_runs = TrialRuns(ctx.tracking_uri, ctx.experiment_id, run_id, tuple(node.tags().items()))
        try:
            search = run_search(job, plan, scaling, name, ctx.storage_path, res.max_failures, trial_runs)
        except BaseException:
            trial_runs.abandon(name)
            raise
        faults.hit(ctx.fault_plan, "search.end", phase=phase, node=node.id)
        trial_runs.adopt(name, search)
        outcome, lr = search.outcome, search.best.lr
        _log_trials(store, run_id, search, phase)
        summary["trials"] = len(search.trials)
        summary["trials_stopped_early"] = sum(t.stopped_early for t in search.trials)
        summary["trial_epochs"] = sum(t.epochs for t in search.trials)
        summary["best_trial"] = search.best.trial
        summary["best_trial_checkpoint"] = search.best.checkpoint_path
        bad = [f"lr={t.lr:g}: {t.diverged}" for t in sorted(search.trials, key=lambda t: t.lr) if t.diverged]
        if bad:
            diverged[phase] = bad
            c.set_tag(run_id, DIVERGED_TAG, "; ".join(bad)[:5000])
    lineage[phase] = lr
    c.log_param(run_id, "chosen_lr", lr)
    tracking.log_metrics(c, run_id, {f"best_{k}": float(v) for k, v in outcome.best_val.items()} | {"epochs_run": outcome.epochs_run, "best_epoch": outcome.best_epoch})
    store.save_checkpoint(run_id, outcome.best_state, {
        "net": ns.to_dict(), "data": data.to_dict(), "phase": phase, "seed": cfg["seed"], "lr": lr,
        "best_epoch": outcome.best_epoch, "epochs_run": outcome.epochs_run, "best_val": outcome.best_val,
    })
    if outcome.history:
        store.save_table(run_id, "history", pa.Table.from_pylist(_history_rows(outcome.history)))
    summary.update(lr=lr, lrs=lineage, diverged=diverged, epochs=outcome.epochs_run, best_epoch=outcome.best_epoch,
                   stopped_early=outcome.stopped_early, resumed_at=outcome.resumed_at,
                   best_val=outcome.best_val["val_score"])
    return _finish_summary(c, run_id, summary)


def _history_rows(history: list[dict[str, float]]) -> list[dict[str, float]]:
    keys = sorted({k for m in history for k in m})
    return [{k: float(m.get(k, float("nan"))) for k in keys} for m in history]


def _log_trials(store: ArtifactStore, run_id: str, search: Any, phase: str) -> None:
    from stages.report_plots import plot_lr_search

    rows = [
        {"trial": t.trial, "lr": t.lr, "best_val": t.best_val, "epochs": t.epochs, "stopped_early": t.stopped_early,
         "stopped_by": t.stopped_by, "diverged": t.diverged, "chosen": t.trial == search.best.trial}
        for t in sorted(search.trials, key=lambda t: t.lr)
    ]
    store.save_table(run_id, "trials", pa.Table.from_pylist(rows))
    with tempfile.TemporaryDirectory() as d:
        path = plot_lr_search([r["lr"] for r in rows], [r["best_val"] for r in rows], search.best.lr, Path(d) / "lr_search.png", f"{phase}: validation accuracy vs lr")
        store.save_file(run_id, path)


def _flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_params(v, name + "."))
        else:
            out[name] = str(v)[:500]
    return out


# ----------------------------------------------------------------------------- evaluate / report


def _run_evaluate(ctx: RunContext, c: Any, store: ArtifactStore, node: Node, run_id: str, model: NodeResult) -> dict[str, Any]:
    import torch

    from stages import evaluate
    from stages.nets import NetSpec

    state, spec = store.load_checkpoint(model.run_id)
    ev = node.config["evaluation"]
    # The task holds a GPU when the study has them (see runner._task_resources); the curve maths
    # runs on CPU either way, from the cached logits.
    device = "cuda" if ctx.study().resources.use_gpu and torch.cuda.is_available() else "cpu"
    out = evaluate.run(
        NetSpec.from_dict(spec["net"]), state, data_spec(node.config["data"]), int(node.config["seed"]),
        list(ev["criteria"]), int(ev["thresholds"]), int(ev["batch_size"]), ev["threshold_spacing"], device,
    )
    faults.hit(ctx.fault_plan, "evaluate", node=node.id)
    meta = {"backbone_flops": str(out.backbone_flops), "model_run_id": model.run_id}
    store.save_table(run_id, "exits", out.exits, meta)
    store.save_table(run_id, "curve", out.curve, meta)
    accs = out.exits.column("accuracy").to_pylist()
    tracking.log_metrics(c, run_id, {f"test_acc_exit_{k}": a for k, a in enumerate(accs)} | {"test_acc_final": accs[-1], "backbone_flops": out.backbone_flops})
    return _finish_summary(c, run_id, {"lrs": model.summary.get("lrs", {}), "diverged": model.summary.get("diverged", {}),
                                       "test_acc_final": accs[-1], "backbone_flops": out.backbone_flops})


def _run_report(ctx: RunContext, c: Any, store: ArtifactStore, node: Node, run_id: str, inputs: list[NodeResult]) -> dict[str, Any]:
    from stages import report

    study = ctx.study()
    curves: dict[tuple[str, int], pa.Table] = {}
    exits: dict[tuple[str, int], pa.Table] = {}
    lrs: dict[str, dict[str, list[float]]] = {}
    notes: list[str] = []  # diverged learning rates, one line per phase and seed
    backbone = None
    for res in inputs:
        regime, seed = res.node_id.split("/")[1], int(res.node_id.split("/")[0].removeprefix("seed"))
        curves[(regime, seed)] = store.load_table(res.run_id, "curve")
        table = store.load_table(res.run_id, "exits")
        exits[(regime, seed)] = table
        backbone = float(table.schema.metadata[b"backbone_flops"])
        for phase, lr in res.summary.get("lrs", {}).items():
            lrs.setdefault(regime, {}).setdefault(phase, []).append(lr)
        for phase, bad in sorted(res.summary.get("diverged", {}).items()):
            node_id = f"seed{seed}/P1" if phase == "P1" else f"seed{seed}/{regime}/{phase}"  # P1 is shared
            line = f"{node_id} search: diverged, ranked last: {', '.join(bad)}"
            if line not in notes:
                notes.append(line)
    assert backbone is not None
    faults.hit(ctx.fault_plan, "report", node=node.id)
    chosen = {r: {p: _one_or_list(v) for p, v in sorted(ph.items())} for r, ph in lrs.items()}
    with tempfile.TemporaryDirectory() as d:
        out = report.run(curves, exits, backbone, study.evaluation.budgets, study.evaluation.criteria, Path(d), study.name, chosen,
                         notes)
        store.save_table(run_id, "budgets", out.budgets)
        for p in out.plots:
            store.save_file(run_id, p)
        text_path = Path(d) / "budgets.txt"
        text_path.write_text(out.text + "\n")
        store.save_file(run_id, text_path)
    for row in out.budgets.to_pylist():
        if row["criterion"] == study.evaluation.criteria[0] and row["accuracy_mean"] == row["accuracy_mean"]:
            c.log_metric(run_id, f"acc_{row['regime']}_budget_{row['budget']}", row["accuracy_mean"])
    return _finish_summary(c, run_id, {"chosen_lrs": chosen})


def _one_or_list(values: list[float]) -> float | list[float]:
    uniq = sorted(set(values))
    return uniq[0] if len(uniq) == 1 else uniq
