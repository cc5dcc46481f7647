"""The DAG: shared P1 nodes, edges, node kinds, tags and cache keys (what makes the cache train only new nodes)."""

from __future__ import annotations

import graphlib
from dataclasses import dataclass
import shutil
from pathlib import Path

import pytest

from exitflow.pipeline.dag import Graph, Node
from exitflow.pipeline.graph import build_graph
from exitflow.pipeline.keys import cache_key
from exitflow.pipeline.spec import StudySpec, load_spec

REPO = Path(__file__).resolve().parents[1]


def _graph(*sets: str) -> Graph:
    return build_graph(load_spec(None, list(sets)))


def _keys(g: Graph) -> dict[str, str]:
    return {nid: n.key for nid, n in g.nodes.items()}


# ----------------------------------------------------------------------------- shape


def test_default_study_shape() -> None:
    g = _graph()
    assert set(g.nodes) == {
        "seed0/P1",
        "seed0/joint/P2",
        "seed0/disjoint/P3",
        "seed0/mixed/P2",
        "seed0/joint/evaluate",
        "seed0/disjoint/evaluate",
        "seed0/mixed/evaluate",
        "report",
    }
    assert set(g.edges()) == {
        ("seed0/P1", "seed0/disjoint/P3"),
        ("seed0/P1", "seed0/mixed/P2"),
        ("seed0/joint/P2", "seed0/joint/evaluate"),
        ("seed0/disjoint/P3", "seed0/disjoint/evaluate"),
        ("seed0/mixed/P2", "seed0/mixed/evaluate"),
        ("seed0/joint/evaluate", "report"),
        ("seed0/disjoint/evaluate", "report"),
        ("seed0/mixed/evaluate", "report"),
        # the report reads the lineage record (lr, cost, diverged trials) of every phase behind a model
        ("seed0/P1", "report"),
        ("seed0/joint/P2", "report"),
        ("seed0/disjoint/P3", "report"),
        ("seed0/mixed/P2", "report"),
    }
    assert dict(g.nodes["report"].config.lineages) == {
        "seed0/joint/evaluate": ("seed0/joint/P2",),
        "seed0/disjoint/evaluate": ("seed0/P1", "seed0/disjoint/P3"),
        "seed0/mixed/evaluate": ("seed0/P1", "seed0/mixed/P2"),
    }


@pytest.mark.parametrize("seeds", [[0], [0, 1], [3, 1, 7, 2]])
def test_one_shared_p1_per_seed(seeds: list[int]) -> None:
    g = _graph(f"seeds={seeds}")
    p1 = [n for n in g.nodes.values() if n.phase == "P1"]
    assert sorted(n.seed for n in p1) == sorted(seeds)
    for n in p1:
        assert n.regime == "shared"
        assert n.inputs == ()
        s = f"seed{n.seed}"
        assert g.nodes[f"{s}/disjoint/P3"].inputs == (n.id,)
        assert g.nodes[f"{s}/mixed/P2"].inputs == (n.id,)
        assert g.nodes[f"{s}/joint/P2"].inputs == ()
        assert g.nodes[f"{s}/joint/P2"].phase == "P2"
        assert g.nodes[f"{s}/disjoint/P3"].phase == "P3"


def test_evaluate_per_regime_and_seed_and_one_report() -> None:
    g = _graph("seeds=[0,1,2]")
    evals = [n for n in g.nodes.values() if n.kind == "evaluate"]
    assert sorted((n.seed, n.regime) for n in evals) == sorted((s, r) for s in (0, 1, 2) for r in ("joint", "disjoint", "mixed"))
    final = {"joint": "P2", "disjoint": "P3", "mixed": "P2"}
    for n in evals:
        assert n.inputs == (f"seed{n.seed}/{n.regime}/{final[n.regime]}",)
    reports = [n for n in g.nodes.values() if n.kind == "report"]
    assert [n.id for n in reports] == ["report"]
    # every evaluated model, and the phase nodes behind them (their lineage records: lr, cost, diverged trials)
    assert set(reports[0].inputs) == {n.id for n in evals} | {n.id for n in g.nodes.values() if n.kind in ("train", "tune")}
    assert len(g.nodes) == 3 * (1 + 3 + 3) + 1


def test_p1_belongs_to_its_only_user() -> None:
    g = _graph("regimes=[mixed]")
    assert g.nodes["seed0/P1"].regime == "mixed"
    g = _graph("regimes=[disjoint, joint]")
    assert g.nodes["seed0/P1"].regime == "disjoint"


def test_joint_alone_has_no_p1() -> None:
    g = _graph("regimes=[joint]", "seeds=[0,1]")
    assert not [n for n in g.nodes.values() if n.phase == "P1"]
    assert set(g.nodes) == {"seed0/joint/P2", "seed1/joint/P2", "seed0/joint/evaluate", "seed1/joint/evaluate", "report"}


def test_order_is_topological_and_every_input_exists() -> None:
    g = _graph("seeds=[0,1]")
    order = g.order()
    assert sorted(order) == sorted(g.nodes)
    pos = {nid: i for i, nid in enumerate(order)}
    for src, dst in g.edges():
        assert src in g.nodes
        assert pos[src] < pos[dst]
    assert order[-1] == "report"


def test_a_cycle_is_refused() -> None:
    a = Node(id="a", kind="train", config={}, inputs=("b",))
    b = Node(id="b", kind="train", config={}, inputs=("a",))
    with pytest.raises(graphlib.CycleError):
        Graph(nodes={"a": a, "b": b}).order()


# ----------------------------------------------------------------------------- kinds and tags


def test_node_kinds_follow_the_lr_spec() -> None:
    g = _graph("phases.P1.lr=0.01", "phases.P2.lr=[1e-3, 1e-2]", "phases.P3.lr={preset: vit}")
    assert g.nodes["seed0/P1"].kind == "train"
    assert g.nodes["seed0/joint/P2"].kind == "tune"
    assert g.nodes["seed0/mixed/P2"].kind == "tune"
    assert g.nodes["seed0/disjoint/P3"].kind == "tune"
    assert g.nodes["seed0/P1"].config.search is None and g.nodes["seed0/P1"].config.train.lr == 0.01
    assert g.nodes["seed0/joint/P2"].config.search.grid == (1e-3, 1e-2)
    assert g.nodes["seed0/joint/P2"].config.train.lr is None  # each trial trains with its own
    g = _graph("phases.P1.lr={loguniform: [1e-4, 1e-2], num_samples: 3}", "phases.P2.lr=[0.01]")
    assert g.nodes["seed0/P1"].kind == "tune"
    assert g.nodes["seed0/joint/P2"].kind == "train"  # a one-value grid is a plain run
    assert {n.kind for n in g.nodes.values()} <= {"train", "tune", "evaluate", "report"}


def test_tags() -> None:
    g = _graph("seeds=[5]")
    p1 = g.nodes["seed5/P1"].tags()
    assert p1["exitflow.stage"] == "train"
    assert p1["exitflow.key"] == g.nodes["seed5/P1"].key
    assert p1["exitflow.phase"] == "P1"
    assert p1["exitflow.regime"] == "shared"
    assert p1["exitflow.seed"] == "5"
    ev = g.nodes["seed5/disjoint/evaluate"].tags()
    assert (ev["exitflow.stage"], ev["exitflow.regime"], ev["exitflow.seed"]) == ("evaluate", "disjoint", "5")
    tune = _graph("phases.P2.lr=[1e-3,1e-2]").nodes["seed0/mixed/P2"].tags()
    assert (tune["exitflow.stage"], tune["exitflow.phase"], tune["exitflow.regime"]) == ("tune", "P2", "mixed")
    report = g.nodes["report"].tags()
    assert report["exitflow.stage"] == "report"
    assert report["exitflow.key"] == g.nodes["report"].key
    assert "exitflow.seed" not in report and "exitflow.regime" not in report
    assert all(isinstance(v, str) for n in g.nodes.values() for v in n.tags().values())


def test_seed_zero_is_tagged() -> None:
    assert _graph().nodes["seed0/P1"].tags()["exitflow.seed"] == "0"


# ----------------------------------------------------------------------------- keys


def test_keys_are_deterministic_and_unique() -> None:
    a, b = _graph("seeds=[0,1]"), _graph("seeds=[0,1]")
    assert _keys(a) == _keys(b)
    keys = list(_keys(a).values())
    assert all(len(k) == 24 and int(k, 16) >= 0 for k in keys)
    assert len(set(keys)) == len(keys)


@dataclass(frozen=True)
class _Toy:
    a: int
    b: tuple[int, ...]


def test_cache_key_hashes_kind_config_and_inputs() -> None:
    base = cache_key("train", _Toy(1, (1, 2)), ["x"])
    assert base == cache_key("train", _Toy(a=1, b=(1, 2)), ["x"])
    assert base != cache_key("tune", _Toy(1, (1, 2)), ["x"])
    assert base != cache_key("train", _Toy(2, (1, 2)), ["x"])
    assert base != cache_key("train", _Toy(1, (1, 2)), ["y"])
    assert base != cache_key("train", _Toy(1, (1, 2)), [])


def test_a_config_that_is_not_a_frozen_dataclass_is_refused() -> None:
    """A node's config is what its key hashes and its task receives: it cannot change in between."""
    @dataclass
    class Mutable:
        a: int

    for config in ({"a": 1}, Mutable(1)):
        with pytest.raises(TypeError, match="frozen dataclass"):
            cache_key("train", config, [])


def _changed(before: Graph, after: Graph) -> set[str]:
    return {nid for nid in before.nodes if before.nodes[nid].key != after.nodes[nid].key}


def test_p2_lr_changes_p2_its_evaluate_and_the_report_only() -> None:
    before, after = _graph(), _graph("phases.P2.lr=0.01")
    assert _changed(before, after) == {
        "seed0/joint/P2",
        "seed0/mixed/P2",
        "seed0/joint/evaluate",
        "seed0/mixed/evaluate",
        "report",
    }


def test_p1_change_propagates_to_everything_downstream() -> None:
    before, after = _graph(), _graph("phases.P1.max_epochs=3")
    assert _changed(before, after) == {
        "seed0/P1",
        "seed0/disjoint/P3",
        "seed0/mixed/P2",
        "seed0/disjoint/evaluate",
        "seed0/mixed/evaluate",
        "report",
    }


def test_p3_change_touches_disjoint_only() -> None:
    before, after = _graph(), _graph("phases.P3.batch_size=16")
    assert _changed(before, after) == {"seed0/disjoint/P3", "seed0/disjoint/evaluate", "report"}


@pytest.mark.parametrize(
    "change",
    ["data.augment=false", "net.width=8", "data.train_subset=100"],
)
def test_data_and_net_change_every_phase(change: str) -> None:
    before, after = _graph(), _graph(change)
    assert _changed(before, after) == set(before.nodes)


def test_evaluation_change_keeps_the_phases() -> None:
    before, after = _graph(), _graph("evaluation.thresholds=20")
    assert _changed(before, after) == {"seed0/joint/evaluate", "seed0/disjoint/evaluate", "seed0/mixed/evaluate", "report"}


def test_budgets_change_only_the_report() -> None:
    before, after = _graph(), _graph("evaluation.budgets=[0.5, max]")
    assert _changed(before, after) == {"report"}


def test_search_settings_key_only_searched_phases() -> None:
    sets = ["phases.P2.lr=[1e-3, 1e-2]"]
    before, after = _graph(*sets), _graph(*sets, "search.scheduler=asha")
    assert _changed(before, after) == {"seed0/joint/P2", "seed0/mixed/P2", "seed0/joint/evaluate", "seed0/mixed/evaluate", "report"}


@pytest.mark.parametrize(
    "change",
    [
        "search.max_concurrent_trials=8",
        "resources.num_workers=2",
        "resources.cpus_per_worker=3",
        "resources.use_gpu=true",
        "resources.max_failures=5",
        "resources.torch_threads=2",
        "tracking.uri=http://elsewhere:5000",
        "tracking.experiment=other",
        "tracking.storage_path=/tmp/somewhere",
        "name=renamed",
    ],
)
def test_how_and_where_do_not_change_keys(change: str) -> None:
    # Searched phases too: max_concurrent_trials is how fast, not what.
    sets = ["phases.P2.lr=[1e-3, 1e-2]", "phases.P3.lr={preset: resnet}"]
    assert _keys(_graph(*sets)) == _keys(_graph(*sets, change))


def test_adding_a_seed_keeps_every_existing_key() -> None:
    before, after = _graph("seeds=[0]"), _graph("seeds=[0,1]")
    kept = {nid: k for nid, k in _keys(before).items() if nid != "report"}
    assert {nid: after.nodes[nid].key for nid in kept} == kept
    new = set(after.nodes) - set(before.nodes)
    assert {n for n in new if after.nodes[n].kind in ("train", "tune")} == {"seed1/P1", "seed1/joint/P2", "seed1/disjoint/P3", "seed1/mixed/P2"}


def test_adding_a_regime_keeps_every_existing_key() -> None:
    before, after = _graph("regimes=[joint]"), _graph("regimes=[joint, mixed]")
    for nid in ("seed0/joint/P2", "seed0/joint/evaluate"):
        assert after.nodes[nid].key == before.nodes[nid].key
    assert set(after.nodes) - set(before.nodes) == {"seed0/P1", "seed0/mixed/P2", "seed0/mixed/evaluate"}


def test_adding_disjoint_to_mixed_keeps_the_p1_key() -> None:
    # P1's regime tag goes mixed -> shared, but the backbone trained is the same: reuse it.
    before, after = _graph("regimes=[mixed]"), _graph("regimes=[mixed, disjoint]")
    for nid in ("seed0/P1", "seed0/mixed/P2", "seed0/mixed/evaluate"):
        assert after.nodes[nid].key == before.nodes[nid].key


def test_seed_order_does_not_change_phase_keys() -> None:
    a, b = _graph("seeds=[0,1]"), _graph("seeds=[1,0]")
    assert {k: v for k, v in _keys(a).items() if k != "report"} == {k: v for k, v in _keys(b).items() if k != "report"}


def test_same_phase_config_in_two_seeds_gets_two_keys() -> None:
    g = _graph("seeds=[0,1]")
    assert g.nodes["seed0/P1"].key != g.nodes["seed1/P1"].key


def test_joint_and_mixed_p2_differ_by_their_input() -> None:
    g = _graph()
    joint, mixed = g.nodes["seed0/joint/P2"], g.nodes["seed0/mixed/P2"]
    assert joint.config == mixed.config
    assert joint.key != mixed.key


def test_graph_from_model_validate_matches_load_spec() -> None:
    assert _keys(build_graph(StudySpec())) == _keys(_graph())


def test_selection_keys_every_phase_it_picks_searched_or_not() -> None:
    """search.selection picks the epoch every P2 and P3 keeps, fixed lr or searched: a change re-runs them."""
    before, after = _graph(), _graph("search.selection=final")
    assert _changed(before, after) == set(before.nodes) - {"seed0/P1"}


def _code_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for package in ("pipeline", "stages"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.mark.parametrize(
    ("module", "edit", "changed"),
    [
        ("stages/core/loop.py", "\nLOOP_EDITED = True\n", {"train", "tune"}),
        # the report plans the methods' own curves (stages.core.nets.methods), whose modules need no net's
        # heads: a heads edit re-keys the report only through its inputs (evaluate)
        ("stages/core/nets/heads.py", "\nHEADS_EDITED = True\n", {"train", "tune", "evaluate"}),
        ("stages/core/evaluation.py", "\nEVAL_EDITED = True\n", {"evaluate"}),
        # the report reads budgets; tune via the plots' labels; evaluate stores each budget's threshold with its model
        ("stages/core/budgets.py", "\nBUDGETS_EDITED = True\n", {"tune", "report", "evaluate"}),
        ("stages/core/report_plots.py", "\nPLOTS_EDITED = True\n", {"tune", "report"}),  # tune draws lr_search.png
        ("stages/core/report.py", "\nREPORT_EDITED = True\n", {"report"}),
        ("stages/core/loop.py", "\n# a comment changes nothing\n", set()),
        ("stages/core/faults.py", "\nHOOKS_EDITED = True\n", set()),  # fault hooks never change a result
        ("pipeline/tracking.py", "\nTRACKING_EDITED = True\n", set()),
    ],
)
def test_editing_code_changes_the_fingerprint_of_exactly_the_stages_it_computes(
    tmp_path: Path, module: str, edit: str, changed: set[str]
) -> None:
    from exitflow.pipeline.fingerprint import fingerprint
    from exitflow.pipeline.stage import get_stage

    kinds = ("train", "tune", "evaluate", "report")
    root = _code_tree(tmp_path)
    before = {kind: fingerprint(get_stage(kind).code, root) for kind in kinds}
    with open(root / module, "a") as f:
        f.write(edit)
    edited = root.parent / "edited"
    shutil.copytree(root, edited)  # a fresh path: fingerprints are cached per root
    after = {kind: fingerprint(get_stage(kind).code, edited) for kind in kinds}
    assert {kind for kind in kinds if before[kind] != after[kind]} == changed


def test_a_report_code_edit_rekeys_only_the_report(monkeypatch: pytest.MonkeyPatch) -> None:
    from exitflow.pipeline import keys

    before = _graph()
    real = keys.fingerprint
    report = keys.get_stage("report").code
    monkeypatch.setattr(keys, "fingerprint", lambda code: real(code) + ("-edited" if code == report else ""))
    assert _changed(before, _graph()) == {"report"}


@pytest.mark.parametrize("trainer", ["auto", "ray_train"])
@pytest.mark.parametrize("use_gpu", [False, True])
def test_evaluate_tasks_and_in_process_phases_hold_a_workers_cpus_and_its_gpu_others_only_orchestrate(
        use_gpu: bool, trainer: str) -> None:
    from exitflow.pipeline.runner import run_settings
    from exitflow.pipeline.scheduler import task_resources
    from exitflow.pipeline.stage import NODE_RETRIES, get_stage

    spec = load_spec(None, [f"resources.use_gpu={str(use_gpu).lower()}", "resources.cpus_per_worker=3",
                            f"resources.trainer={trainer}", "resources.max_failures=2", "phases.P2.lr=[1e-3,3e-3]"])
    settings = run_settings(spec)
    g = build_graph(spec)

    def held(nid: str) -> dict[str, float]:
        return task_resources(get_stage(g.nodes[nid].kind), g.nodes[nid], settings)

    worker = {"num_cpus": 3.0} | ({"num_gpus": 1.0} if use_gpu else {})
    assert held("seed0/joint/evaluate") == worker
    # in process (auto, one worker), a fixed-lr phase's task is its worker: it holds the worker's
    # resources, and may die as often as its task and its worker together
    p1 = g.nodes["seed0/P1"]
    assert held("seed0/P1") == (worker if trainer == "auto" else {"num_cpus": 0})
    assert get_stage(p1.kind).retries(p1, settings) == NODE_RETRIES + (2 if trainer == "auto" else 0)
    for nid in ("seed0/joint/P2", "report"):  # a search's trials reserve their own; the report orchestrates
        assert held(nid) == {"num_cpus": 0}
        assert get_stage(g.nodes[nid].kind).retries(g.nodes[nid], settings) == NODE_RETRIES
