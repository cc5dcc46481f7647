"""A new analysis kind from outside the project: one file, one registration, nothing of pipeline/ edited.

`ExitSpread` (the gap between a model's best and worst fixed exit) is an analysis kind registered by
this test module alone, with its spec section (`analyses.exit_spread`) declared beside it: the spec
accepts the section once the kind is registered (and refuses it once it is not), the kind's own
`plan` adds one node per evaluated model when the section switches it on, and the DAG runs it like
any built-in stage: its table is typed (its declared schema) and hashed, the pipeline run links it
as an analysis, and a re-run reuses it. The same study switches on the built-in analyses
(`analyses.rank`, `analyses.landscape`, `analyses.mutual_information`, `analyses.connectivity`:
stages that join the graph the same way; and `analyses.gradient_dominance`, measured inside P2's
training). It trains joint and disjoint, so connectivity has a pair of regimes to connect.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, Literal

import pyarrow as pa
import pytest
from helpers import tiny_spec

from exitflow.pipeline.dag import Graph, Node
from exitflow.pipeline.spec import SpecError, StudySpec
from exitflow.pipeline.spec_types import AnalysisSection, with_settings
from exitflow.pipeline.stage import (ANALYSIS, Stage, StageContext, StageInput, StageResult, Table, TableKind, register_stage,
                            unregister_stage)

SPREAD = TableKind("exit_spread", "exit_spread.parquet", ("regime", "best_exit", "spread"))


class ExitSpreadAnalysis(AnalysisSection):
    """`analyses.exit_spread`: declared here, beside the kind that reads it; the spec finds it through the registry."""

    name = "exit_spread"
    statistic: Literal["max-min"] = "max-min"  # what the spread is: the exits' best accuracy less their worst


@with_settings(ExitSpreadAnalysis)
class SpreadConfig:
    """The node's config: the section's settings (`statistic`), declared once, in the section."""


class ExitSpread(Stage):
    """Per evaluated model: its best fixed exit and the accuracy gap between its best and worst exit."""

    kind = "analyze.exit_spread"
    role = ANALYSIS
    section = ExitSpreadAnalysis
    reads = ("exits",)
    writes = (SPREAD,)
    code = (__name__,)

    def plan(self, spec: StudySpec, graph: Graph) -> list[Node]:
        settings = self.spec_section(spec)
        if settings is None or not settings.enabled:
            return []
        config = SpreadConfig(**settings.settings())
        return [Node(id=f"seed{n.seed}/{n.regime}/analyze/exit_spread", kind=self.kind, config=config, inputs=(n.id,),
                     regime=n.regime, seed=n.seed) for n in graph.nodes.values() if n.kind == "evaluate"]

    def run(self, node: Node, inputs: list[StageInput], ctx: StageContext) -> StageResult:
        [evaluated] = inputs
        acc = evaluated.table("exits").column("accuracy").to_pylist()
        best = max(range(len(acc)), key=acc.__getitem__)
        spread = max(acc) - min(acc)
        table = pa.table({"regime": [node.regime], "best_exit": [best], "spread": [spread]})
        return StageResult(artifacts=[Table(SPREAD.name, table)], metrics={"spread": spread}, summary={"spread": spread})


@pytest.fixture(scope="module")
def registered() -> Iterator[None]:
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the Ray task gets the class itself
    register_stage(ExitSpread)
    yield
    unregister_stage(ExitSpread.kind)


@pytest.fixture(scope="module")
def spec(registered: None, tmp_path_factory: pytest.TempPathFactory) -> StudySpec:
    storage = tmp_path_factory.mktemp("ray")
    return tiny_spec(storage, "regimes=[joint, disjoint]", "tracking.experiment=toy-stage", "analyses.exit_spread.enabled=true",
                     "analyses.rank.enabled=true",
                     "analyses.rank.samples=100", "analyses.landscape.enabled=true", "analyses.landscape.samples=50",
                     "analyses.landscape.steps=3", "analyses.mutual_information.enabled=true",
                     "analyses.mutual_information.samples=60", "analyses.mutual_information.estimator=mc",
                     "analyses.mutual_information.draws=1",
                     "analyses.gradient_dominance.enabled=true", "analyses.gradient_dominance.every=5",
                     "analyses.connectivity.enabled=true", "analyses.connectivity.samples=50",
                     "analyses.connectivity.train_samples=50", "analyses.connectivity.points=3", epochs=1)


@pytest.fixture(scope="module")
def first(registered: None, spec: StudySpec, ray_session: None, mlflow_uri: str) -> Any:
    from exitflow.pipeline.runner import run_study

    return run_study(spec, mlflow_uri, progress=lambda _: None)


def test_the_registered_stage_joins_the_graph_through_its_plan(registered: None, spec: StudySpec) -> None:
    from exitflow.pipeline.graph import build_graph

    g = build_graph(spec)
    node = g.nodes["seed0/joint/analyze/exit_spread"]
    assert node.inputs == ("seed0/joint/evaluate",) and node.key and node.config == SpreadConfig("max-min")
    assert {n.id for n in g.nodes.values() if n.kind == ExitSpread.kind} == {"seed0/joint/analyze/exit_spread",
                                                                               "seed0/disjoint/analyze/exit_spread"}
    # its key follows its own config and code, and its input's key
    assert len({n.key for n in g.nodes.values()}) == len(g.nodes)
    off = spec.model_copy(update={"analyses": spec.analyses.model_copy(
        update={"exit_spread": spec.analyses.exit_spread.model_copy(update={"enabled": False})})})
    assert not any(n.kind == ExitSpread.kind for n in build_graph(off).nodes.values())  # its own plan reads its section


def test_its_spec_section_is_declared_beside_it(registered: None) -> None:
    from exitflow.pipeline.kinds import analysis_sections
    from exitflow.pipeline.spec import load_spec

    assert analysis_sections()["exit_spread"] is ExitSpreadAnalysis
    assert load_spec(None).analyses.exit_spread == ExitSpreadAnalysis()  # every declared section is there, its defaults
    with pytest.raises(SpecError, match=r"analyses\.exit_spread\.statistic: Input should be 'max-min'"):
        load_spec(None, ["analyses.exit_spread.statistic=mean"])


def test_an_unregistered_kinds_section_is_an_unknown_key() -> None:
    from exitflow.pipeline.spec import load_spec

    class GoneAnalysis(AnalysisSection):
        name = "gone"

    class Gone(ExitSpread):
        kind = "analyze.gone"
        section = GoneAnalysis

    register_stage(Gone)
    try:
        assert load_spec(None, ["analyses.gone.enabled=true"]).analyses.gone.enabled
    finally:
        unregister_stage(Gone.kind)
    with pytest.raises(SpecError, match=r"analyses\.gone: unknown key"):
        load_spec(None, ["analyses.gone.enabled=true"])


@pytest.mark.ray
def test_it_runs_through_the_dag_with_a_typed_hashed_artifact(first: Any, mlflow_store: Any) -> None:
    from mlflow.tracking import MlflowClient

    from exitflow.pipeline.artifacts import ArtifactStore

    res = first.results["seed0/joint/analyze/exit_spread"]
    assert not res.cached
    c = MlflowClient(mlflow_store.uri)
    run = c.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["exitflow.stage"] == "analyze"
    assert run.data.tags["exitflow.analysis"] == "exit_spread"
    assert "exitflow.sha256.exit_spread.parquet" in run.data.tags  # hashed like every artifact
    table = ArtifactStore(c).load_table(res.run_id, "exit_spread")  # read back against its declared schema
    exits = ArtifactStore(c).load_table(first.results["seed0/joint/evaluate"].run_id, "exits")
    acc = exits.column("accuracy").to_pylist()
    assert table.column("spread").to_pylist() == [pytest.approx(max(acc) - min(acc))]
    assert table.column("best_exit").to_pylist() == [acc.index(max(acc))]
    assert run.data.metrics["spread"] == pytest.approx(max(acc) - min(acc))


@pytest.mark.ray
def test_a_rerun_reuses_it(first: Any, spec: StudySpec, mlflow_uri: str) -> None:
    from exitflow.pipeline.runner import run_study

    again = run_study(spec, mlflow_uri, progress=lambda _: None)
    assert set(again.cache_hits) == set(again.results) and "seed0/joint/analyze/exit_spread" in again.cache_hits
    assert again.results["seed0/joint/analyze/exit_spread"].run_id == first.results["seed0/joint/analyze/exit_spread"].run_id


def test_an_undeclared_artifact_kind_is_refused() -> None:
    class Sneaky(ExitSpread):
        writes = ()

    with pytest.raises(TypeError, match="undeclared artifact kind 'exit_spread'"):
        Sneaky().check_outputs(StageResult(artifacts=[Table("exit_spread", pa.table({"x": [1]}))]))


def test_a_second_writer_of_a_table_kind_with_another_schema_is_refused() -> None:
    from exitflow.pipeline.stage import get_stage

    get_stage("evaluate")  # the built-in writer of 'exits'

    class Clash(Stage):
        kind = "clash"
        writes = (TableKind("exits", "other.parquet", ("x",)),)
        code = (__name__,)

    with pytest.raises(ValueError, match="table kind 'exits' is defined already"):
        register_stage(Clash)


@pytest.mark.ray
def test_the_rank_analysis_runs_as_an_analyze_stage(first: Any, mlflow_store: Any) -> None:
    from mlflow.tracking import MlflowClient

    from exitflow.pipeline.artifacts import ArtifactStore

    res = first.results["seed0/analyze/rank"]
    c = MlflowClient(mlflow_store.uri)
    run = c.get_run(res.run_id)
    assert run.data.tags["exitflow.stage"] == "analyze" and run.data.tags["exitflow.analysis"] == "rank"
    assert {"exitflow.sha256.rank.parquet", "exitflow.sha256.rank.png"} <= set(run.data.tags)
    table = ArtifactStore(c).load_table(res.run_id, "rank")
    assert set(table.column("model").to_pylist()) == {"joint", "P1 (= disjoint backbone)"}  # the study's regimes
    rows = table.to_pylist()
    assert len(rows) == 2 * res.summary["layers"] >= 38 and all(0 < r["rank"] <= min(r["rows"], r["columns"]) for r in rows)
    assert {r["rows"] for r in rows} == {100}


@pytest.mark.ray
def test_the_landscape_analysis_centres_on_the_model(first: Any, mlflow_store: Any) -> None:
    from mlflow.tracking import MlflowClient

    from exitflow.pipeline.artifacts import ArtifactStore

    res = first.results["seed0/joint/analyze/landscape"]
    c = MlflowClient(mlflow_store.uri)
    run = c.get_run(res.run_id)
    assert run.data.tags["exitflow.stage"] == "analyze" and run.data.tags["exitflow.analysis"] == "landscape"
    assert "exitflow.sha256.landscape.png" in run.data.tags
    rows = ArtifactStore(c).load_table(res.run_id, "landscape").to_pylist()
    assert {(r["a"], r["b"]) for r in rows} == {(a, b) for a in (-1.0, 0.0, 1.0) for b in (-1.0, 0.0, 1.0)}
    centre = {r["exit"]: r["loss"] for r in rows if r["a"] == r["b"] == 0.0}
    assert centre[-1] == pytest.approx(sum(v for k, v in centre.items() if k >= 0)) == res.summary["centre_loss"]


@pytest.mark.ray
def test_the_connectivity_analysis_connects_the_pair_of_regimes(first: Any, mlflow_store: Any) -> None:
    from mlflow.tracking import MlflowClient

    from exitflow.pipeline.artifacts import ArtifactStore

    res = first.results["seed0/analyze/connectivity"]
    c = MlflowClient(mlflow_store.uri)
    run = c.get_run(res.run_id)
    assert run.data.tags["exitflow.stage"] == "analyze" and run.data.tags["exitflow.analysis"] == "connectivity"
    assert {"exitflow.sha256.connectivity.parquet", "exitflow.sha256.connectivity_line.png"} <= set(run.data.tags)
    table = ArtifactStore(c).load_table(res.run_id, "connectivity")  # read back against its declared schema
    rows = table.to_pylist()
    assert {(r["kind"], r["models"]) for r in rows} == {("line", "disjoint-joint")}  # two regimes: one line, no plane
    exits = sorted({r["exit"] for r in rows})
    assert exits[0] == -1 and exits[1:] == list(range(len(exits) - 1)) and {r["a"] for r in rows} == {0.0, 0.5, 1.0}
    for t in (0.0, 0.5, 1.0):
        at = {r["exit"]: r["loss"] for r in rows if r["a"] == t}
        assert at[-1] == pytest.approx(sum(v for k, v in at.items() if k >= 0))
    barrier = res.summary["barrier_disjoint_joint"]
    assert barrier >= 0.0 and run.data.metrics["barrier_disjoint_joint"] == pytest.approx(barrier)


@pytest.mark.ray
def test_the_mutual_information_analysis_gives_every_block_an_estimate(first: Any, mlflow_store: Any) -> None:
    import math

    from mlflow.tracking import MlflowClient

    from exitflow.pipeline.artifacts import ArtifactStore

    res = first.results["seed0/analyze/mutual_information"]
    c = MlflowClient(mlflow_store.uri)
    assert c.get_run(res.run_id).data.tags["exitflow.analysis"] == "mutual_information"
    rows = ArtifactStore(c).load_table(res.run_id, "mutual_information").to_pylist()
    assert {r["model"] for r in rows} == {"joint", "P1 (= disjoint backbone)"}  # the study's regimes
    for model in ("joint", "P1 (= disjoint backbone)"):
        assert [r["index"] for r in rows if r["model"] == model] == list(range(1, res.summary["blocks"] + 1))
    assert all(0.0 <= r["mi"] <= math.log(60) + 1e-6 for r in rows)


@pytest.mark.ray
def test_the_pipeline_run_links_every_analysis_plot(first: Any, mlflow_uri: str) -> None:
    from exitflow.pipeline.runner import study_report

    _, where = study_report(first.parent_run_id, mlflow_uri)
    assert set(where["analyses"]) == {"seed0/analyze/rank", "seed0/joint/analyze/landscape", "seed0/disjoint/analyze/landscape",
                                      "seed0/analyze/mutual_information", "seed0/analyze/connectivity",
                                      "seed0/joint/analyze/exit_spread", "seed0/disjoint/analyze/exit_spread"}
    assert where["analyses"]["seed0/joint/analyze/exit_spread"] == []  # a table, no plot
    assert [p.rsplit("/", 1)[-1] for p in where["analyses"]["seed0/analyze/rank"]] == ["rank.png"]
    assert first.analyses == {n: first.results[n].run_id for n in where["analyses"]}


@pytest.mark.ray
def test_switching_an_analysis_off_or_changing_its_grid_reruns_only_it(first: Any, spec: StudySpec, mlflow_uri: str) -> None:
    from exitflow.pipeline.runner import run_study

    off = spec.model_copy(update={"analyses": spec.analyses.model_copy(
        update={"landscape": spec.analyses.landscape.model_copy(update={"enabled": False})})})
    result = run_study(off, mlflow_uri, progress=lambda _: None)
    assert "seed0/joint/analyze/landscape" not in result.results and set(result.cache_hits) == set(result.results)
    assert "seed0/analyze/connectivity" in result.cache_hits
    grid = spec.model_copy(update={"analyses": spec.analyses.model_copy(
        update={"landscape": spec.analyses.landscape.model_copy(update={"span": 0.5})})})
    result = run_study(grid, mlflow_uri, progress=lambda _: None)
    assert set(result.results) - set(result.cache_hits) == {"seed0/joint/analyze/landscape", "seed0/disjoint/analyze/landscape"}


@pytest.mark.ray
def test_gradient_dominance_is_measured_during_joint_p2(first: Any, mlflow_store: Any) -> None:
    from mlflow.tracking import MlflowClient

    from exitflow.pipeline.artifacts import ArtifactStore

    run_id = first.results["seed0/joint/P2"].run_id
    c = MlflowClient(mlflow_store.uri)
    rows = ArtifactStore(c).load_table(run_id, "gradient_dominance").to_pylist()
    exits = sorted({r["exit"] for r in rows})
    assert exits == list(range(len(exits))) and len(exits) >= 2 and {r["epoch"] for r in rows} == {0}
    assert all(-1.0 <= r["cosine"] <= 1.0 for r in rows)
    assert "exitflow.sha256.gradient_dominance.png" in c.get_run(run_id).data.tags
    assert c.get_run(run_id).data.metrics[f"grad_cos_{exits[-1]}"] == pytest.approx(rows[-1]["cosine"])
