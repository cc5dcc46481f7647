"""Comparison axes (`compare:`): one study over every combination of the axes' values, each node
built once for the variants whose keys agree; the report gets a table and a figure per axis."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from exitflow.pipeline.graph import build_graph
from exitflow.pipeline.spec import SpecError, load_spec

LW = "phases.P2.loss_weighting"
EVERY = "net.exit_every"


def _graph(*sets: str):  # noqa: ANN202
    return build_graph(load_spec(None, list(sets)))


def trained_phases(axes: dict[str, list], regimes: list[str], seeds: int, changes: dict[str, set[str]]) -> int:
    """The formula in the docs: each phase node is trained once per combination of the values of the
    axes that change it or a phase before it (`changes[axis]`: the phases an axis changes itself)."""
    phases = {"P1": [], "joint": ["P2"], "disjoint": ["P1", "P3"], "mixed": ["P1", "P2"]}
    wanted = {"P1"} if {"disjoint", "mixed"} & set(regimes) else set()
    wanted |= {f"{r}/{phases[r][-1]}" for r in regimes}
    total = 0
    for node in wanted:
        lineage = ["P1"] if node == "P1" else phases[node.split("/")[0]]
        total += math.prod(len(v) for a, v in axes.items() if changes[a] & set(lineage))
    return total * seeds


def test_two_axes_share_every_node_they_can() -> None:
    axes = {LW: ["uniform", "kaya", "han"], EVERY: [1, 2]}
    g = _graph(f"compare={{{LW}: [uniform, kaya, han], {EVERY}: [1, 2]}}", "seeds=[0,1]")
    phases = [n for n in g.nodes.values() if n.kind in ("train", "tune")]
    # P2's weighting changes the P2 phases alone; the exits change every phase (the net is keyed)
    assert len(phases) == trained_phases(axes, ["joint", "disjoint", "mixed"], 2, {LW: {"P2"}, EVERY: {"P1", "P2", "P3"}}) == 32
    assert len(phases) < 6 * 4 * 2  # six variants of four phases each, two seeds, unshared
    assert len({n.key for n in g.nodes.values()}) == len(g.nodes)  # one node per key
    p1 = g.nodes[f"{EVERY}=2/seed0/P1"]  # one P1 per exit placement serves all three weightings
    users = [n for n in g.nodes.values() if p1.id in n.inputs]
    assert Counter(n.regime for n in users if n.kind == "train") == {"mixed": 3, "disjoint": 1}
    assert f"{LW}=kaya,{EVERY}=2/seed1/joint/P2" in g.nodes and g.nodes[f"{LW}=kaya,{EVERY}=2/seed1/joint/P2"].variant
    report = g.nodes["report"]
    assert len(report.config.rows) == 3 * 6 * 2  # every regime of every variant and seed has its model
    # every evaluated model, and the phase nodes behind them, whose lineage records it reads
    assert set(report.inputs) == {n.id for n in g.nodes.values() if n.kind in ("evaluate", "train", "tune")}
    assert {e for e, _ in report.config.lineages} == {n.id for n in g.nodes.values() if n.kind == "evaluate"}
    assert [a for a, _ in report.config.axes] == [LW, EVERY]


def test_adding_a_value_keeps_every_key_and_adds_only_the_new_nodes() -> None:
    two = _graph(f"compare={{{LW}: [uniform, kaya]}}")
    three = _graph(f"compare={{{LW}: [uniform, kaya, han]}}")
    before, after = {n.key for n in two.nodes.values()}, {n.key for n in three.nodes.values()}
    new = [n for n in three.nodes.values() if n.key not in before]
    assert before - after == {two.nodes["report"].key}
    assert sorted(n.id for n in new) == sorted(["report", *(f"{LW}=han/seed0/{r}/{k}" for r in ("joint", "mixed") for k in ("P2", "evaluate"))])


def test_an_axis_with_one_value_is_the_plain_study_with_that_value() -> None:
    plain, axis = _graph(f"{LW}=kaya"), _graph(f"compare={{{LW}: [kaya]}}")
    assert {k: n.key for k, n in plain.nodes.items() if k != "report"} == {k: n.key for k, n in axis.nodes.items() if k != "report"}


@pytest.mark.parametrize("sets, message", [
    (["compare={seeds: [[0], [1]]}"], "'seeds' cannot be compared: seeds are averaged over"),
    (["compare={resources.num_workers: [1, 2]}"], "'resources.num_workers' cannot be compared: how a study runs"),
    (["compare={phases.P2.lr: [0.01, -1]}"], "compare: phases.P2.lr=-1 makes an invalid study: phases.P2.lr: learning rates must be"),
    (["compare={net.nonsense: [1, 2]}"], "compare: net.nonsense=1 makes an invalid study: net.nonsense: unknown key"),
    (["compare={net.width: []}"], "'net.width': give a non-empty list of values"),
    (["compare={net.width: [8, 8]}"], "'net.width': duplicate values"),
    # each value is valid with the spec, the pair is not: every combination is checked
    (["data.root=/data/x", "compare={data.name: [digits, parquet], data.root: [/data/x, null]}"],
     "compare: data.name=parquet,data.root=null makes an invalid study: data: data.root is required for data.name='parquet'"),
])
def test_a_bad_axis_is_refused_before_anything_runs(sets: list[str], message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_spec(None, sets)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_two_axis_study_trains_each_shared_node_once_and_reports_each_axis(
    ray_session: None, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from mlflow.tracking import MlflowClient

    from helpers import tiny_spec
    from exitflow.pipeline.artifacts import ArtifactStore
    from exitflow.pipeline.runner import run_study

    storage = tmp_path_factory.mktemp("compare")
    axes = ["compare={phases.P3.loss_weighting: [uniform, kaya], phases.P3.lr: [3.0e-3, 1.0e-3]}"]
    study = ["name=compare", "regimes=[disjoint]", "seeds=[7]"]
    # Each phase takes 3 of the suite's 4 CPUs (a run setting, in no key): admission starts one
    # phase at a time, the others wait in the driver, not on Ray.
    lines: list[str] = []
    first = run_study(tiny_spec(storage, *study, *axes, "resources.cpus_per_worker=3", epochs=1), mlflow_uri,
                      progress=lines.append)
    # one P1 for the four P3 variants (both axes change P3 alone): 1 + 2 x 2 phases
    assert len(first.trained) == trained_phases({"a": [1, 2], "b": [1, 2]}, ["disjoint"], 1, {"a": {"P3"}, "b": {"P3"}}) == 5
    assert "seed7/P1" in first.trained
    waits = [line for line in lines if line.startswith("waiting ")]
    assert any(w.endswith("/seed7/disjoint/P3: needs 3 CPU; the study's running nodes hold 3 CPU of 4 CPU") for w in waits), lines
    c = MlflowClient(mlflow_uri)
    exp = c.get_experiment_by_name("compare").experiment_id
    spans = sorted((r.info.start_time, r.info.end_time) for r in c.search_runs([exp], "tags.`exitflow.stage` = 'train'"))
    assert len(spans) == 5 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two phases open at once
    for axis in ("phases.P3.loss_weighting", "phases.P3.lr"):
        assert f"comparison axis {axis}" in first.table
    assert "disjoint phases.P3.loss_weighting=kaya" in first.table  # a row per regime and value
    report = first.results["report"].run_id
    files = {f.path for f in MlflowClient(mlflow_uri).list_artifacts(report)}
    assert {"tradeoff.png", "tradeoff_phases.P3.loss_weighting.png", "tradeoff_phases.P3.lr.png"} <= files
    budgets = ArtifactStore(MlflowClient(mlflow_uri)).load_table(report, "budgets").to_pylist()
    assert Counter(r["table"] for r in budgets) == {"all": 2 * 4 * 5, "phases.P3.loss_weighting": 2 * 2 * 5,
                                                     "phases.P3.lr": 2 * 2 * 5}  # criteria x rows x budgets
    # a third learning rate trains its two variants, nothing else
    more = run_study(tiny_spec(storage, *study, "compare={phases.P3.loss_weighting: [uniform, kaya], "
                               "phases.P3.lr: [3.0e-3, 1.0e-3, 3.0e-4]}", epochs=1), mlflow_uri)
    assert sorted(more.trained) == sorted(f"phases.P3.loss_weighting={w},phases.P3.lr=0.0003/seed7/disjoint/P3"
                                          for w in ("uniform", "kaya"))
