"""The report stage: every regime and seed joined into the budget table and the trade-off plots.

The compute is `stages.core.report.run`; this module plans the study's one report (on the graph
that merges the comparison axes' variants: one row per variant's evaluated model), gathers its
inputs (each evaluate node's tables, and the lineage record of every phase node behind its model:
the learning rates chosen, what each phase cost, a search's diverged trials) and declares what the
stage writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from exitflow.pipeline.dag import Graph, Node
from exitflow.pipeline.spec import StudySpec, axis_label
from exitflow.pipeline.stage import (FILES, PHASE, REPORT, STUDY, File, Stage, StageContext, StageInput, StageResult, Table, TableKind,
                            get_stage, register_stage, role_of)
from exitflow.stages.core import faults
from exitflow.stages.core.budgets import Readout
from exitflow.stages.core.nets.methods import method_curves

EXITS, CURVE = "exits", "curve"  # read from each evaluate node (their writer, stages.evaluate, holds their schemas)
LINEAGE = "lineage"  # read from each phase node behind an evaluated model (its writer, stages.phase_kind, holds its schema)
BUDGETS = TableKind("budgets", "budgets.parquet", ("regime", "budget", "accuracy_mean", "accuracy_std", "n_seeds"), ui=True)
COSTS = TableKind("costs", "costs.parquet", ("regime", "seed", "node", "phase", "epochs", "train_seconds", "wall_seconds",
                                            "device", "device_hours", "shared"), ui=True)
CALIBRATION = TableKind("calibration", "calibration.parquet", ("criterion", "regime", "exit", "budget", "ece_mean", "ece_std",
                                                              "n_seeds"), ui=True)


@dataclass(frozen=True)
class ReportConfig:
    """The report node's config: which budgets and criteria its table and plots show, over which regimes and seeds."""

    budgets: tuple[float | str, ...]  # fractions of the backbone's FLOPs, or "max"
    criteria: tuple[str, ...]
    regimes: tuple[str, ...]
    seeds: tuple[int, ...]
    budget_rule: str = "costliest"  # how budgets are read off the curves: stages.core.budgets
    seed_averaging: str = "curve"
    thresholds: int = 100  # how the evaluate nodes swept the curves, stated under each table
    threshold_spacing: str = "uniform"
    # (evaluate node, regime, seed, the variant's `axis=value` per axis) for every variant's model;
    # () when the study compares nothing. One evaluate node may serve several variants (an axis that
    # does not change it). `axes`: (axis, its values as `axis=value`), the first value its baseline.
    rows: tuple[tuple[str, str, int, tuple[str, ...]], ...] = ()
    axes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # (evaluate node, the phase nodes behind its model, first phase first): whose lineage records it reads
    lineages: tuple[tuple[str, tuple[str, ...]], ...] = ()


@register_stage
class Report(Stage):
    kind = "report"
    reads = (EXITS, CURVE, LINEAGE)
    writes = (BUDGETS, COSTS, CALIBRATION, FILES)
    code = ("exitflow.stages.report", "exitflow.stages.core.report")
    role = REPORT
    scope = STUDY  # one report for every variant of the comparison axes
    printed = ("budgets.txt", "costs.txt")  # what `exitflow run` and `exitflow report` print, in this order

    def plan(self, spec: StudySpec, graph: Graph) -> list[Node]:
        """The report: a row per variant's evaluated model (a node that writes the tables it reads), the
        criteria's curves and the methods' own (JEI-DNN's gates), which every evaluate node of that method writes."""
        rows = tuple((merged, n.regime, n.seed, tuple(axis_label((pair,)) for pair in v.assignment))
                     for v in graph.variants for merged in v.nodes.values()
                     if _evaluated(n := graph.nodes[merged]))
        ev = spec.evaluation
        criteria = tuple(ev.criteria) + method_curves(v.spec.net.method for v in graph.variants)
        evaluated = tuple(dict.fromkeys(row[0] for row in rows))
        lineages = tuple((n, _phases_behind(graph, n)) for n in evaluated)
        config = ReportConfig(budgets=tuple(ev.budgets), budget_rule=ev.budget_rule, seed_averaging=ev.seed_averaging,
                              thresholds=ev.thresholds, threshold_spacing=ev.threshold_spacing, criteria=criteria,
                              regimes=tuple(spec.regimes), seeds=tuple(spec.seeds), rows=rows,
                              axes=tuple((axis, tuple(axis_label(((axis, value),)) for value in values))
                                         for axis, values in spec.compare.items()), lineages=lineages)
        phases = (p for _, behind in lineages for p in behind)
        return [Node(id=self.kind, kind=self.kind, config=config, inputs=tuple(dict.fromkeys((*evaluated, *phases))))]

    def run(self, node: Node, inputs: list[StageInput], ctx: StageContext) -> StageResult:
        from exitflow.stages.core import report

        cfg: ReportConfig = node.config
        by_id = {res.node_id: res for res in inputs}
        behind = dict(cfg.lineages)
        records = {p: by_id[p].table(LINEAGE).to_pylist()[0] for p in dict.fromkeys(p for ps in behind.values() for p in ps)}
        curves, exits, lrs, costs, notes, backbone = {}, {}, {}, {}, [], None
        for node_id, regime, seed, parts in cfg.rows:
            res = by_id[node_id]
            label = _label(regime, parts)
            curves[(label, seed)] = res.table(CURVE)
            exits[(label, seed)] = table = res.table(EXITS)
            backbone = float(table.schema.metadata[b"backbone_flops"])
            lineage = [records[p] for p in behind[node_id]]  # its model's phases, first phase first
            costs[(label, seed)] = {r["node"]: r for r in lineage}
            for r in lineage:
                lrs.setdefault(label, {}).setdefault(r["phase"], []).append(r["lr"])
            for phase, bad in sorted((r["phase"], r["diverged"]) for r in lineage if r["diverged"]):
                where = f"seed{seed}/P1" if phase == "P1" else f"seed{seed}/{regime}/{phase}"  # P1 is shared
                line = f"{where}{f' ({label})' if parts else ''} search: diverged, ranked last: {', '.join(bad)}"
                if line not in notes:
                    notes.append(line)
        assert backbone is not None, "a report needs at least one evaluated model"
        faults.hit(ctx.fault_plan, "report", node=node.id)
        chosen = {r: {p: _one_or_list(v) for p, v in sorted(ph.items())} for r, ph in lrs.items()}
        criteria = list(cfg.criteria)
        readout = Readout(cfg.thresholds, cfg.threshold_spacing, cfg.budget_rule, cfg.seed_averaging)  # type: ignore[arg-type]
        out = report.run(curves, exits, backbone, list(cfg.budgets), criteria, ctx.workdir, ctx.settings.study_name, chosen, notes,
                         readout)
        budgets, plots, texts = [_tagged(out.budgets, "all")], list(out.plots), [out.text]
        # One table and figure per axis, the other axes at their baseline; a single axis's would
        # repeat the combined table and figure.
        for i, (axis, _) in enumerate(cfg.axes if len(cfg.axes) > 1 else ()):
            others = [a for j, (a, _) in enumerate(cfg.axes) if j != i]
            sub = report.run(_axis_view(curves, cfg, i), _axis_view(exits, cfg, i), backbone, list(cfg.budgets), criteria, ctx.workdir,
                             f"{ctx.settings.study_name}: {axis}", None, (), readout, plot_prefix=f"tradeoff_{axis}")
            budgets.append(_tagged(sub.budgets, axis))
            plots += sub.plots
            texts.append(f"comparison axis {axis}" + (f" ({', '.join(others)} at their first value)" if others else "")
                         + ":\n" + sub.text)
        text = ctx.workdir / "budgets.txt"
        text.write_text("\n\n".join(texts) + "\n")
        cost_table, cost_text = report.training_costs(costs)
        (cost_file := ctx.workdir / "costs.txt").write_text(cost_text + "\n")
        metrics = {f"acc_{row['regime']}_budget_{row['budget']}": row["accuracy_mean"] for row in out.budgets.to_pylist()
                   if row["criterion"] == criteria[0] and row["accuracy_mean"] == row["accuracy_mean"] and not cfg.axes}
        out.budgets = pa.concat_tables(budgets)
        out.plots = plots
        return StageResult(artifacts=[Table(BUDGETS.name, out.budgets), Table(COSTS.name, cost_table),
                                      Table(CALIBRATION.name, out.calibration), *map(File, out.plots),
                                      File(text), File(cost_file)],
                           metrics=metrics, summary={"chosen_lrs": chosen})


def _phases_behind(graph: Graph, node_id: str) -> tuple[str, ...]:
    """The phase nodes behind an evaluated model (its input's lineage), first phase first."""
    found, todo = [], list(graph.nodes[node_id].inputs)
    while todo:
        n = graph.nodes[todo.pop(0)]
        if role_of(n.kind) == PHASE:
            found.append(n.id)
            todo.extend(n.inputs)
    return tuple(reversed(found))


def _evaluated(node: Node) -> bool:
    """Whether a node is an evaluated model the report reads: its kind writes both tables."""
    return {EXITS, CURVE} <= set(get_stage(node.kind).table_kinds())


def _label(regime: str, parts: tuple[str, ...]) -> str:
    """A row of the combined table: the regime, then the variant's axis values ("joint phases.P2.lr=0.01")."""
    return " ".join([regime, ",".join(parts)]) if parts else regime


def _axis_view(tables: dict[tuple[str, int], pa.Table], cfg: ReportConfig, i: int) -> dict[tuple[str, int], pa.Table]:
    """The tables of the variants that vary axis `i` alone (every other axis at its first value),
    labelled by regime and that axis's value."""
    baseline = [values[0] for _, values in cfg.axes]
    return {(f"{regime} {parts[i]}", seed): tables[(_label(regime, parts), seed)] for _, regime, seed, parts in cfg.rows
            if all(p == baseline[j] for j, p in enumerate(parts) if j != i)}


def _tagged(table: pa.Table, name: str) -> pa.Table:
    """A budget table with the table it belongs to: "all" (every variant), or a comparison axis."""
    return table.append_column("table", pa.array([name] * table.num_rows, pa.string()))


def _one_or_list(values: list[float]) -> float | list[float]:
    uniq = sorted(set(values))
    return uniq[0] if len(uniq) == 1 else uniq
