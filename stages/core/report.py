"""The report stage: join every regime and seed into the budget table and the trade-off plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from exitflow.stages.core.budgets import Budget, Readout, budget_label, budget_table, mean_std, read_budget
from exitflow.stages.core.report_plots import format_budget_table, format_readout, ordered, plot_tradeoff


@dataclass
class ReportOutput:
    budgets: pa.Table  # criterion, regime, budget, accuracy_mean, accuracy_std, n_seeds
    calibration: pa.Table  # criterion, regime, exit, budget, ece_mean, ece_std, n_seeds (see `calibration_rows`)
    plots: list[Path]  # tradeoff.png (first criterion), tradeoff_<criterion>.png for the others
    text: str  # the readable budget tables, one per criterion, and the notes


def run(
    curves: Mapping[tuple[str, int], pa.Table],
    exits: Mapping[tuple[str, int], pa.Table],
    backbone_flops: float,
    budgets: Sequence[Budget],
    criteria: Sequence[str],
    out_dir: Path,
    title: str,
    chosen_lrs: Mapping[str, Mapping[str, float]] | None = None,
    notes: Sequence[str] = (),
    readout: Readout = Readout(),
    plot_prefix: str = "tradeoff",
) -> ReportOutput:
    """`curves`/`exits` are keyed by (regime, seed), as the evaluate stage wrote them; `readout` says
    how the curves were swept and how budgets are read off them (stages.core.budgets), which each
    table states under it; `notes` (diverged learning rates, say) are printed under the tables."""
    regimes = list(dict.fromkeys(r for r, _ in curves))
    fixed = {r: [_columns(exits[k], "flops", "accuracy") for k in exits if k[0] == r] for r in regimes}
    tables, plots, texts, calibration = [], [], [], []
    for regime in regimes:  # each exit forced: calibration whatever the criterion
        ece = [_columns(exits[k], "ece")[0] for k in exits if k[0] == regime]
        for e in range(min(len(v) for v in ece)):
            calibration.append(_calibration_row("", regime, e, "", [v[e] for v in ece]))
    for i, criterion in enumerate(criteria):
        # A method's own curve (JEI-DNN's gates) exists only for the variants of that method
        found = {k: t for k in curves if (t := _where(curves[k], criterion)).num_rows}
        shown = [r for r in regimes if any(k[0] == r for k in found)]
        by_regime = {r: [_columns(found[k], "flops", "accuracy") for k in found if k[0] == r] for r in shown}
        rows = budget_table(by_regime, backbone_flops, budgets, readout.rule, readout.averaging)
        for r in shown:
            seed_curves = [_columns(found[k], "flops", "accuracy", "ece") + (_equal_mass(found[k]),) for k in found if k[0] == r]
            for budget in budgets:  # the ECE of the point each seed reports at the budget
                reading = read_budget([(f, a) for f, a, _, _ in seed_curves], backbone_flops, budget, readout.rule,
                                      readout.averaging)
                at = [(np.nan, np.nan) if p is None else (ece[p], mass[p]) for p, (_, _, ece, mass) in zip(reading.points, seed_curves)]
                calibration.append(_calibration_row(criterion, r, None, budget_label(budget), [e for e, _ in at],
                                                    [m for _, m in at]))
        tables.append(pa.Table.from_pylist([{"criterion": criterion, **row} for row in rows]))
        name = f"{plot_prefix}.png" if i == 0 else f"{plot_prefix}_{criterion}.png"
        plots.append(plot_tradeoff(by_regime, fixed, backbone_flops, out_dir / name, f"{title} ({criterion})"))
        texts.append(format_budget_table(rows, chosen_lrs, criterion, readout.rule) + "\n"
                     + format_readout(readout, [budget_label(b) for b in budgets]))
    text = "\n\n".join(texts) + "".join(f"\nnote: {n}" for n in notes)
    return ReportOutput(budgets=pa.concat_tables(tables), calibration=pa.Table.from_pylist(calibration, CALIBRATION_SCHEMA),
                        plots=plots, text=text)


CALIBRATION_SCHEMA = pa.schema([("criterion", pa.string()), ("regime", pa.string()), ("exit", pa.int32()),
                                ("budget", pa.string()), ("ece_mean", pa.float64()), ("ece_std", pa.float64()),
                                ("n_seeds", pa.int32()), ("ece_equal_mass_mean", pa.float64()),
                                ("ece_equal_mass_std", pa.float64())])


def _calibration_row(criterion: str, regime: str, exit_: int | None, budget: str, per_seed: Sequence[float],
                     equal_mass: Sequence[float] = ()) -> dict[str, object]:
    """One row of calibration.parquet: a fixed exit's ECE (criterion "", budget ""), or the ECE of
    the early-exit predictions at the curve point a budget reports (exit null), over seeds; where the
    curve's source bins by equal mass (JEI-DNN's gates), that ECE too (null elsewhere)."""
    mean, std = mean_std(per_seed)
    mass = [m for m in equal_mass if not np.isnan(m)]
    mass_mean, mass_std = mean_std(equal_mass) if mass else (None, None)
    return {"criterion": criterion, "regime": regime, "exit": exit_, "budget": budget, "ece_mean": mean, "ece_std": std,
            "n_seeds": len(per_seed), "ece_equal_mass_mean": mass_mean, "ece_equal_mass_std": mass_std}


def _equal_mass(table: pa.Table) -> np.ndarray:
    """A curve's `ece_equal_mass` (NaN where null, or absent: a curve evaluated before the column)."""
    if "ece_equal_mass" not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return np.asarray([np.nan if v is None else v for v in table.column("ece_equal_mass").to_pylist()], dtype=np.float64)


def _where(table: pa.Table, criterion: str) -> pa.Table:
    mask = np.asarray(table.column("criterion").to_pylist()) == criterion
    return table.filter(pa.array(mask))


def _columns(table: pa.Table, *names: str) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(table.column(n).to_pylist(), dtype=np.float64) for n in names)


COST_COLUMNS = ("regime", "seed", "node", "phase", "epochs", "train_seconds", "wall_seconds", "device", "device_hours",
                "shared", "resumed", "ran_on")


def training_costs(lineages: Mapping[tuple[str, int], Mapping[str, Mapping[str, object]]]) -> tuple[pa.Table, str]:
    """The training cost of every regime: the rows of `costs.parquet` and the text table.

    `lineages[(regime, seed)]` maps each phase node behind that regime's model to its cost, as the
    phase recorded it (stages.phase_kind.phase_cost): epochs (a search: every trial's), train_seconds
    (the epochs' own time, searches included), wall_seconds (the stage's run, Ray's start-up
    included; a resumed phase: since its resume), device and device_hours. A regime's cost is
    everything behind its model, so a shared P1 counts in each regime that uses it; the study
    total counts every node once. Regimes are averaged over seeds.
    """
    users: dict[tuple[int, str], set[str]] = {}
    for (regime, seed), lineage in lineages.items():
        for node in lineage:
            users.setdefault((seed, node), set()).add(regime)
    rows = [{"regime": regime, "seed": seed, "node": node, "phase": str(c["phase"]), "epochs": int(c["epochs"]),
             "train_seconds": float(c["train_seconds"]), "wall_seconds": float(c["wall_seconds"]), "device": str(c["device"]),
             "device_hours": float(c["device_hours"]), "shared": len(users[(seed, node)]) > 1, "resumed": bool(c["resumed"]),
             "ran_on": str(c.get("ran_on", ""))}  # absent from costs recorded before the field
            for (regime, seed), lineage in lineages.items() for node, c in lineage.items()]
    table = pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in COST_COLUMNS})
    return table, format_costs(rows)


def format_costs(rows: Sequence[Mapping[str, object]]) -> str:
    if not rows:
        return ""
    devices = sorted({str(r["device"]) for r in rows})
    unit = f"{devices[0]}-hours" if len(devices) == 1 else "device-hours"
    seeds = sorted({int(r["seed"]) for r in rows})  # type: ignore[call-overload]

    def totals(subset: Sequence[Mapping[str, object]], per_seed: int) -> list[str]:
        n = max(per_seed, 1)
        epochs = sum(int(r["epochs"]) for r in subset) / n  # type: ignore[call-overload]
        mean_epochs = f"{epochs:g}" if epochs == int(epochs) else f"{epochs:.1f}"  # a mean over seeds: 21.3, not 21.3333
        return [mean_epochs, *(f"{sum(float(r[k]) for r in subset) / n:.1f}" for k in ("train_seconds", "wall_seconds")),  # type: ignore[arg-type]
                f"{sum(float(r['device_hours']) for r in subset) / n:.4f}"]  # type: ignore[arg-type]

    header = ["regime", "seeds", "phases", "epochs", "train (s)", "wall (s)", unit]
    lines = []
    for regime in ordered([str(r["regime"]) for r in rows]):
        mine = [r for r in rows if r["regime"] == regime]
        n = len({r["seed"] for r in mine})
        phases = " + ".join(dict.fromkeys(str(r["phase"]) + (" (shared)" if r["shared"] else "") for r in mine))
        lines.append([regime, str(n), phases, *totals(mine, n)])
    unique = list({(r["seed"], r["node"]): r for r in rows}.values())
    lines.append(["study", str(len(seeds)), f"{len(unique) // max(len(seeds), 1)} phases/seed", *totals(unique, len(seeds))])
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def render(cols: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))).rstrip()

    title = "training cost per regime (every phase behind its model, searches included; mean per seed)"
    note = ("train: the epochs' own time; wall: the phases' stage runs, start-up included; the study row counts a "
            "shared phase once")
    if any(r["resumed"] for r in rows):
        note += "; a resumed phase's wall time counts from its resume"
    places = sorted({str(r["ran_on"]) for r in rows if r.get("ran_on")})
    if places:
        note += "\nran on: " + "; ".join(places)
    rule = "-" * len(render(header))
    return "\n".join([title, render(header), rule, *map(render, lines[:-1]), rule, render(lines[-1]), note])
