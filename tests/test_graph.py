"""The DAG: shared P1 nodes, edges, node kinds, tags and cache keys (what makes the cache train only new nodes)."""

from __future__ import annotations

import graphlib
from dataclasses import dataclass
import shutil
import tempfile
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
        ("stages/core/budgets.py", "\nBUDGETS_EDITED = True\n", {"tune", "report"}),  # via the plots' labels
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


# ------------------------------------------------------------------ key rules, field by field
# Base study: three regimes, P2 searched (so the search settings matter somewhere).
# A data root (digits ignores it) lets data.name name a dataset that needs one.
# The analyses are on: rank reads P1's, mixed's and joint's models; a landscape each final model.
RULE_BASE = ["data.root=/data/here", "phases.P2.lr=[1e-3, 1e-2]", "analyses.rank.enabled=true", "analyses.landscape.enabled=true",
             "analyses.mutual_information.enabled=true", "analyses.gradient_dominance.enabled=true",
             "analyses.connectivity.enabled=true", "evaluation.seed_averaging=budget"]  # so that quantile spacing is valid
_MI = {"seed0/analyze/mutual_information"}  # reads the same models as rank
# A field only some settings read is tried on top of RULE_BASE and these (the MI estimators' own settings).
RULE_BASE_FOR: dict[str, list[str]] = {"analyses.mutual_information.noise": ["analyses.mutual_information.estimator=relative_noise"],
                                       "analyses.mutual_information.draws": ["analyses.mutual_information.estimator=mc"]}
_RANK = {"seed0/analyze/rank", *_MI}
_LAND = {f"seed0/{r}/analyze/landscape" for r in ("joint", "disjoint", "mixed")}
_CONN = {"seed0/analyze/connectivity"}  # reads every regime's final model
_ALL = {"seed0/P1", "seed0/joint/P2", "seed0/disjoint/P3", "seed0/mixed/P2", "seed0/joint/evaluate",
        "seed0/disjoint/evaluate", "seed0/mixed/evaluate", "report", *_RANK, *_LAND, *_CONN}
_P1 = _ALL - {"seed0/joint/P2", "seed0/joint/evaluate", "seed0/joint/analyze/landscape"}
_P2 = {"seed0/joint/P2", "seed0/mixed/P2", "seed0/joint/evaluate", "seed0/mixed/evaluate", "report", *_RANK,
       "seed0/joint/analyze/landscape", "seed0/mixed/analyze/landscape", *_CONN}
_P3 = {"seed0/disjoint/P3", "seed0/disjoint/evaluate", "report", "seed0/disjoint/analyze/landscape", *_CONN}
_EVAL = {"seed0/joint/evaluate", "seed0/disjoint/evaluate", "seed0/mixed/evaluate", "report"}
_REPORT = {"report"}
_NONE: set[str] = set()
_PHASE_FIELDS = {  # every phase field, its changed value (each phase's own nodes follow below)
    "optimizer": "sgd", "lr": "0.01", "momentum": "0.5", "nesterov": "true", "weight_decay": "0.1",
    "batch_size": "32", "max_epochs": "3", "patience": "2", "schedule": "step", "warmup_epochs": "1",
    "grad_clip": "1.0", "loss_weighting": "kaya", "label_smoothing": "0.1", "bf16": "true", "channels_last": "true",
    "loss_reduction": "sum",
    "step_epochs": "5", "step_gamma": "0.5", "kaya_epochs": "3",  # read by the loop whatever the schedule: keyed
    # L2W's settings: in the phase's config whatever its loss_weighting, so keyed like kaya_epochs
    "l2w_epsilon": "0.2", "l2w_target_p": "0.5", "l2w_hidden": "64", "l2w_meta_lr": "0.001",
    "l2w_meta_weight_decay": "0.0", "l2w_meta_interval": "2",
}
_INIT_FILE = Path(tempfile.mkdtemp()) / "start.pt"  # net.init's key is the file's content hash
_INIT_FILE.write_bytes(b"a start's bytes: the key hashes them, preflight (not run here) would check them")
# Every leaf field of the spec: (a changed value, the nodes whose key must change). A spec field
# without an entry here fails test_every_spec_field_has_a_key_rule.
KEY_RULES: dict[str, tuple[str, set[str]]] = {
    "name": ("renamed", _NONE),
    # a comparison axis adds variants (new ids); of the nodes every variant shares, only the report changes
    "compare": ("{phases.P3.loss_weighting: [uniform, kaya]}", _REPORT),
    "data.name": ("cifar10", _ALL),
    # where the files are is not what they hold: the keys hold data.identity, the content's digest (digits:
    # scikit-learn's file, whatever the root); a moved folder keys the same (tests/test_data_identity.py)
    "data.root": ("/data/elsewhere", _NONE),
    "data.val_fraction": ("0.2", _ALL),
    "data.augment": ("false", _ALL),
    # the paper's extra augmentations: the train split's, so every phase (and all that reads a model)
    "data.augmentations.rotation": ("15", _ALL),
    "data.augmentations.contrast": ("0.4", _ALL),
    "data.augmentations.random_erasing": ("0.25", _ALL),
    "data.augmentations.mixup": ("0.8", _ALL),
    "data.augmentations.cutmix": ("1.0", _ALL),
    "data.resize": ("16", _ALL),  # every split's images, so every net's input
    "data.download": ("true", _NONE),  # fetching what is missing changes no result
    "data.train_subset": ("500", _ALL),
    "data.test_subset": ("200", _EVAL | _RANK | _LAND | _CONN),  # phases never read the test split; the analyses' batches do
    "data.num_workers": ("2", _ALL),  # loader workers draw augmentation from their own seeds
    "net.backbone": ("resnet32", _ALL),
    "net.method": ("pabee", _ALL),
    "net.init": (str(_INIT_FILE), _ALL),  # P1 and joint's P2 start from it; every other node follows them
    "net.exits": ("[2, 4]", _ALL),
    "net.exit_every": ("3", _ALL),
    "net.exit_start": ("1", _ALL),
    "net.head": ("linear", _ALL),
    "net.head_norm": ("true", _ALL),
    "net.head_hidden": ("[16]", _ALL),  # (refused by preflight unless net.head is mlp; keyed all the same)
    "net.small_input": ("true", _ALL),
    "net.width": ("8", _ALL),
    "net.depth": ("3", _ALL),
    "regimes": ("[joint, disjoint]", _REPORT | _RANK | _CONN),  # on the nodes both graphs have; rank and connectivity lose mixed's model
    "seeds": ("[0, 1]", _REPORT),
    **{f"phases.P1.{k}": (v, _P1) for k, v in _PHASE_FIELDS.items()},
    **{f"phases.P2.{k}": (v, _P2) for k, v in _PHASE_FIELDS.items()},
    **{f"phases.P3.{k}": (v, _P3) for k, v in _PHASE_FIELDS.items()},
    "search.selection": ("final", _ALL - {"seed0/P1"}),  # the epoch every P2/P3 keeps, searched or not
    "search.scheduler": ("asha", _P2),  # searched phases only
    "search.grace_period": ("3", _NONE),  # ASHA's settings, without ASHA
    "search.reduction_factor": ("3", _NONE),
    "search.max_concurrent_trials": ("8", _NONE),
    "evaluation.criteria": ("[entropy]", _EVAL),
    "evaluation.thresholds": ("20", _EVAL),
    "evaluation.threshold_spacing": ("quantile", _EVAL),  # the report states the spacing under its tables
    "evaluation.budgets": ("[0.5, max]", _REPORT),
    "evaluation.budget_rule": ("best", _REPORT),
    "evaluation.seed_averaging": ("curve", _REPORT),
    "evaluation.batch_size": ("64", _EVAL),
    "analyses.rank.enabled": ("false", _NONE),  # the rank node goes; no other node changes
    "analyses.rank.split": ("val", _RANK - _MI),
    "analyses.rank.samples": ("100", _RANK - _MI),
    "analyses.rank.features": ("500", _RANK - _MI),
    "analyses.rank.rtol": ("1e-6", _RANK - _MI),
    "analyses.gradient_dominance.enabled": ("false", _P2),  # measured while P2 trains: P2 re-trains
    "analyses.gradient_dominance.every": ("5", _P2),
    "analyses.mutual_information.enabled": ("false", _NONE),
    "analyses.mutual_information.split": ("val", _MI),
    "analyses.mutual_information.samples": ("100", _MI),
    "analyses.mutual_information.estimator": ("mc", _MI),
    "analyses.mutual_information.noise_std": ("0.5", _MI),
    # read by other estimators than the default (jensen), which refuses them: tried with one that reads them
    "analyses.mutual_information.noise": ("0.5", _MI),
    "analyses.mutual_information.draws": ("2", _MI),
    "analyses.landscape.enabled": ("false", _NONE),
    "analyses.landscape.split": ("val", _LAND),
    "analyses.landscape.samples": ("100", _LAND),
    "analyses.landscape.steps": ("5", _LAND),
    "analyses.landscape.span": ("0.5", _LAND),
    "analyses.connectivity.enabled": ("false", _NONE),
    "analyses.connectivity.split": ("val", _CONN),
    "analyses.connectivity.samples": ("100", _CONN),
    "analyses.connectivity.train_samples": ("100", _CONN),
    "analyses.connectivity.bn_repair": ("false", _CONN),
    "analyses.connectivity.points": ("5", _CONN),
    "analyses.connectivity.plane_steps": ("5", _CONN),
    "analyses.connectivity.iterations": ("10", _CONN),
    # naming each regime's seed replaces the per-seed node by one across seeds (a new id, so no common
    # node changes; the node's own inputs and key: test_analysis_connectivity.py)
    "analyses.connectivity.seeds": ("{disjoint: 0, mixed: 0}", _NONE),
    **{f"resources.{k}": (v, _NONE) for k, v in {"num_workers": "2", "use_gpu": "true", "cpus_per_worker": "2",
                                                "gpus_per_worker": "0.5", "max_failures": "3", "torch_threads": "2",
                                                "admission": "false", "trainer": "ray_train"}.items()},
    "tracking.uri": ("http://elsewhere:5000", _NONE),
    "tracking.experiment": ("other", _NONE),
    "tracking.storage_path": ("/tmp/elsewhere", _NONE),
}


def _spec_leaves(model: type, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    from exitflow.pipeline.kinds import analysis_sections
    from exitflow.pipeline.spec_sections import AnalysesConfig

    out = []
    # `analyses:` holds the sections the stage kinds declare (pipeline.kinds), not fields of its own
    fields = analysis_sections() if model is AnalysesConfig else {n: f.annotation for n, f in model.model_fields.items()}  # type: ignore[attr-defined]
    for name, ann in fields.items():
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _spec_leaves(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_every_spec_field_has_a_key_rule() -> None:
    assert sorted(KEY_RULES) == sorted(_spec_leaves(StudySpec))


@pytest.mark.parametrize("field", sorted(KEY_RULES))
def test_a_field_changes_the_keys_of_exactly_the_nodes_that_depend_on_it(field: str) -> None:
    value, expected = KEY_RULES[field]
    base = [*RULE_BASE, *RULE_BASE_FOR.get(field, [])]
    before, after = _graph(*base), _graph(*base, f"{field}={value}")
    common = set(before.nodes) & set(after.nodes)
    assert {n for n in common if before.nodes[n].key != after.nodes[n].key} == expected
