"""Key rules, field by field: every field of the study spec changes the keys of exactly the nodes that
depend on it (and a field with no rule fails the suite)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from exitflow.pipeline.dag import Graph
from exitflow.pipeline.graph import build_graph
from exitflow.pipeline.spec import StudySpec, load_spec


def _graph(*sets: str) -> Graph:
    return build_graph(load_spec(None, list(sets)))


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
