"""Fuzzing the spec: whatever the document or `--set` string, the only failure is a SpecError that says so.

A spec that does load must build a graph, and round-trip through its YAML form unchanged.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.graph import build_graph
from pipeline.spec import SpecError, StudySpec, format_validation_error, load_spec, spec_to_yaml

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Field names per section, so that generated documents reach the validators (not only "unknown key").
SECTIONS: dict[str, list[str]] = {
    "data": ["name", "root", "val_fraction", "augment", "download", "train_subset", "test_subset", "num_workers"],
    "net": ["backbone", "method", "exits", "exit_every", "exit_start", "head", "head_norm", "small_input", "width", "depth"],
    "phase": ["optimizer", "lr", "momentum", "nesterov", "weight_decay", "batch_size", "max_epochs", "patience",
              "schedule", "warmup_epochs", "grad_clip", "loss_weighting", "label_smoothing", "bf16", "channels_last"],
    "search": ["selection", "scheduler", "grace_period", "reduction_factor", "max_concurrent_trials"],
    "evaluation": ["criteria", "thresholds", "budgets", "batch_size"],
    "resources": ["num_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker", "max_failures", "torch_threads"],
    "tracking": ["uri", "experiment", "storage_path"],
}
TOP = ["name", "data", "net", "regimes", "seeds", "phases", "search", "evaluation", "resources", "tracking"]
WORDS = ["digits", "parquet", "cifar10", "imagefolder", "resnet20", "vit_tiny", "sdn", "linear", "adam", "sgd", "adamw",
         "cosine", "none", "asha", "mean", "auc", "max", "max_softmax", "entropy", "joint", "disjoint", "mixed",
         "resnet", "vit", "efficientnet", "preset", "loguniform", "num_samples", "P1", "P2", "P3", "1e-3", "/tmp/x", ""]

numbers = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, -1, 0.0, 0.5, 1.0, 1.5, 1e-3, -1e-3, 1e308, 2**32, 2**32 - 1]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12), st.sampled_from(WORDS))
# Any YAML-able value, nested a few levels, with keys that are sometimes real field names.
any_keys = st.one_of(st.text(max_size=8), st.sampled_from(TOP + [f for fs in SECTIONS.values() for f in fs]))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(any_keys, inner, max_size=4)),
    max_leaves=12,
)
lr_values = st.one_of(
    values,
    numbers,
    st.lists(numbers, max_size=4),
    st.fixed_dictionaries({"preset": st.one_of(st.sampled_from(["resnet", "vit", "efficientnet", "alexnet"]), values)}),
    st.fixed_dictionaries(
        {"loguniform": st.one_of(st.lists(numbers, max_size=3), values)},
        optional={"num_samples": st.one_of(numbers, values), "preset": values},
    ),
)


def _section(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """A mapping of some of the section's real fields (plausible or not) plus the odd stray key."""
    fields = SECTIONS[name]
    field_values = {f: (lr_values if f == "lr" else st.one_of(scalars, values)) for f in fields}
    known = st.fixed_dictionaries({}, optional=field_values)
    return st.builds(lambda a, b: {**a, **b}, known, st.dictionaries(st.text(max_size=6), values, max_size=1))


sections = {
    "name": st.one_of(st.sampled_from(["study", "a.b-c_1", "-bad", ""]), scalars),
    "data": st.one_of(_section("data"), values),
    "net": st.one_of(_section("net"), values),
    "regimes": st.one_of(st.lists(st.sampled_from(["joint", "disjoint", "mixed", "both"]), max_size=4), values),
    "seeds": st.one_of(st.lists(numbers, max_size=4), st.lists(st.integers(0, 5), max_size=3), values),
    "phases": st.one_of(
        st.fixed_dictionaries({}, optional={p: st.one_of(_section("phase"), values) for p in ("P1", "P2", "P3", "P4")}),
        values,
    ),
    "search": st.one_of(_section("search"), values),
    "evaluation": st.one_of(_section("evaluation"), values),
    "resources": st.one_of(_section("resources"), values),
    "tracking": st.one_of(_section("tracking"), values),
}
# Mostly valid documents, so that the accepted path (graph, round trip) is exercised too.
pos_float = st.floats(min_value=1e-6, max_value=10.0)
plausible_phase = st.fixed_dictionaries({}, optional={
    "lr": st.one_of(pos_float, st.lists(pos_float, min_size=1, max_size=3, unique=True),
                    st.sampled_from([{"preset": "vit"}, {"preset": "resnet"}, {"loguniform": [1e-4, 1e-2], "num_samples": 3}])),
    "optimizer": st.sampled_from(["sgd", "adam", "adamw"]),
    "batch_size": st.integers(1, 512),
    "max_epochs": st.integers(1, 200),
    "patience": st.integers(0, 20),
    "momentum": st.floats(0.0, 1.0),
    "grad_clip": st.one_of(st.none(), pos_float),
})
plausible = st.fixed_dictionaries({}, optional={
    "name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True),
    "regimes": st.lists(st.sampled_from(["joint", "disjoint", "mixed"]), min_size=1, max_size=3, unique=True),
    "seeds": st.lists(st.integers(0, 2**32), min_size=1, max_size=3, unique=True),
    "phases": st.fixed_dictionaries({}, optional={p: plausible_phase for p in ("P1", "P2", "P3")}),
    "net": st.fixed_dictionaries({}, optional={"backbone": st.sampled_from(["resnet20", "vit_tiny"]), "width": st.integers(0, 64),
                                               "exits": st.lists(st.integers(0, 10), max_size=3)}),
    "evaluation": st.fixed_dictionaries({}, optional={
        "budgets": st.lists(st.one_of(st.just("max"), st.floats(0.0, 1.2)), min_size=1, max_size=4),
        "thresholds": st.integers(1, 200)}),
    "search": st.fixed_dictionaries({}, optional={"scheduler": st.sampled_from(["none", "asha"]),
                                                  "max_concurrent_trials": st.integers(0, 8)}),
    "resources": st.fixed_dictionaries({}, optional={"num_workers": st.integers(0, 4), "cpus_per_worker": st.floats(0.0, 8.0)}),
})
documents = st.one_of(
    plausible,
    st.fixed_dictionaries({}, optional=sections),
    st.builds(lambda a, b: {**a, **b}, st.fixed_dictionaries({}, optional=sections), st.dictionaries(any_keys, values, max_size=2)),
    values,
)


def _numbers(tree: Any) -> list[float]:
    """Every int/float leaf of a dumped spec."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _numbers(v)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def _check_spec(spec: StudySpec) -> None:
    """A spec that validated is usable: finite numbers, seeds numpy accepts, a graph, a YAML round trip."""
    assert all(math.isfinite(x) for x in _numbers(spec.model_dump())), spec
    assert all(type(s) is int and 0 <= s < 2**32 for s in spec.seeds), spec.seeds
    graph = build_graph(spec)
    assert graph.order()[-1] == "report"
    assert StudySpec.model_validate(yaml.safe_load(spec_to_yaml(spec))) == spec
    for phase in (spec.phases.P1, spec.phases.P2, spec.phases.P3):
        grid = phase.lr_values()
        assert grid is None or (grid and all(x > 0 and math.isfinite(x) for x in grid))


@FUZZ
@given(documents)
def test_model_validate_fails_only_with_a_validation_error(doc: Any) -> None:
    try:
        spec = StudySpec.model_validate(doc)
    except ValidationError as e:
        msg = format_validation_error(e)
        assert msg.startswith("invalid spec:\n  ")
        return
    _check_spec(spec)


def _load_file(raw: bytes) -> None:
    """`load_spec` on a file holding `raw`: a valid spec, or a SpecError about the spec or the file."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "spec.yaml"
        path.write_bytes(raw)
        try:
            spec = load_spec(path)
        except SpecError as e:
            msg = str(e)
            assert msg.startswith("invalid spec") or msg.startswith(str(path)), msg
            return
    _check_spec(spec)


@FUZZ
@given(documents)
def test_load_spec_fails_only_with_a_spec_error(doc: Any) -> None:
    _load_file(yaml.safe_dump(doc, allow_unicode=True).encode("utf-8"))


# Nesting around and past PyYAML's recursion limit (~500 here); each deep parse costs ~0.1-0.5 s.
DEPTHS = st.sampled_from([5, 250, 600, 1100])
deep = DEPTHS.map(lambda n: "seeds: " + "[" * n + "]" * n)
raw_files = st.one_of(
    st.text(max_size=80).map(lambda t: t.encode("utf-8", errors="surrogatepass")),
    st.binary(max_size=80),
    st.sampled_from([b"seeds: &x [*x]\n", b"a: &a {b: *a}\n", b"\xff\xfe\x00\x00", b"!!python/object:os.system {}"]),
    deep.map(str.encode),
)


@FUZZ
@given(raw_files)
def test_load_spec_on_arbitrary_bytes(raw: bytes) -> None:
    _load_file(raw)


set_keys = st.one_of(
    st.sampled_from(TOP),
    st.sampled_from([f"{s}.{f}" for s in ("data", "net", "search", "evaluation", "resources", "tracking") for f in SECTIONS[s]]),
    st.sampled_from([f"phases.{p}.{f}" for p in ("P1", "P2", "P3") for f in SECTIONS["phase"]]),
    st.text(alphabet="abcdP123._ =", max_size=12),
)
set_values = st.one_of(
    st.text(max_size=20),
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()),
    st.sampled_from(["[0,1]", "[]", "{preset: vit}", "{loguniform: [1e-4, 1e-2], num_samples: 3}", "-1", ".nan", "yes", "[", "{", ":"]),
    DEPTHS.map(lambda n: "[" * n + "]" * n),
)
set_strings = st.one_of(st.builds(lambda k, v: f"{k}={v}", set_keys, set_values), st.text(max_size=20))


@FUZZ
@given(st.lists(set_strings, max_size=4))
def test_set_strings_fail_only_with_a_spec_error(sets: list[str]) -> None:
    try:
        spec = load_spec(None, sets)
    except SpecError as e:
        msg = str(e)
        assert msg.startswith("invalid spec") or msg.startswith("--set"), msg
        return
    _check_spec(spec)


NUMERIC_FIELDS = [
    "data.val_fraction", "data.train_subset", "data.num_workers", "net.width", "net.depth", "net.exit_every",
    "phases.P1.lr", "phases.P2.batch_size", "phases.P3.patience", "phases.P1.momentum", "phases.P2.max_epochs",
    "search.max_concurrent_trials", "search.reduction_factor", "evaluation.thresholds", "resources.cpus_per_worker",
    "resources.num_workers", "resources.torch_threads",
]


@FUZZ
@given(st.sampled_from(NUMERIC_FIELDS), st.booleans(), st.sampled_from(["{}", "[{}]", "[{}, 0.01]"]))
def test_a_boolean_is_never_a_number(field: str, value: bool, shape: str) -> None:
    # `patience: yes` must not silently mean 1 (pydantic's lax mode reads true as 1).
    raw = shape.format(str(value).lower()) if field.endswith(".lr") else str(value).lower()
    try:
        load_spec(None, [f"{field}={raw}"])
    except SpecError as e:
        assert f"  {field}" in str(e)
        assert "boolean" in str(e)
    else:
        raise AssertionError(f"{field}={raw} was accepted")


@FUZZ
@given(st.lists(st.one_of(st.booleans(), st.integers(-5, 2**33)), min_size=1, max_size=3))
def test_seeds_are_non_negative_32_bit_ints(seeds: list[int]) -> None:
    try:
        spec = load_spec(None, [f"seeds={yaml.safe_dump(seeds, default_flow_style=True).strip()}"])
    except SpecError as e:
        assert "seeds" in str(e)
        assert any(isinstance(s, bool) or not 0 <= s < 2**32 for s in seeds) or len(set(seeds)) < len(seeds)
    else:
        assert list(spec.seeds) == seeds
        assert all(not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds)
