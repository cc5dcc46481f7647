"""Fuzzing the spec: whatever the document or `--set` string, the only failure is a SpecError that says so.

A spec that does load must build a graph, and round-trip through its YAML form unchanged. Through
`exitflow plan` itself (the end of the file), every input ends in exit 0 or a one-reason exit 2,
with nothing written where the tracking store would be.
"""

from __future__ import annotations

import functools
import io
import math
import os
import pathlib
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

from exitflow.pipeline.cli import app
from exitflow.pipeline.graph import build_graph
from exitflow.pipeline.spec import SpecError, StudySpec, format_validation_error, load_spec, spec_to_yaml

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


# ----------------------------------------------------------------------------- the command line
# The same inputs, and specs that reach pre-flight (data, net, net.init, comparison variants, caps),
# through `exitflow plan` itself: exit 0, or exit 2 with one reason (no traceback) and nothing written
# where the tracking store would be.

def cli_settings(examples: int) -> settings:
    """`examples` per test (times EXITFLOW_FUZZ_SCALE, default 1: e.g. 10 for a long local run). Sized
    for CI: the four command-line tests together take about 40 s of one CPU core (most inputs are
    refused in milliseconds; an accepted one builds its net, about 0.1 s)."""
    scale = float(os.environ.get("EXITFLOW_FUZZ_SCALE", "1"))
    return settings(max_examples=max(1, round(examples * scale)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _plan(raw: bytes, sets: list[str], files: dict[str, bytes] | None = None) -> None:
    """`exitflow plan` of a spec file holding `raw`, with `sets`, on a sqlite store in a fresh folder
    (beside the spec: `files`, name -> content)."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "spec.yaml").write_bytes(raw)
        for name, content in (files or {}).items():
            (folder / name).write_bytes(content)
        args = ["plan", str(folder / "spec.yaml"), "--tracking-uri", f"sqlite:///{folder}/mlflow.db", *(f"--set={s}" for s in sets)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code in (0, 2), (args, result.output, result.exception)
        if result.exit_code == 2:
            assert_one_reason(result.output)
        event(f"exit {result.exit_code}" + (f": {_refused_by(result.output)}" if result.exit_code else ""))
        written = sorted(p.name for p in folder.iterdir())
        assert written == sorted(["spec.yaml", *(files or {})]), result.output  # no store, no artifacts, no code ran


def _refused_by(output: str) -> str:
    """Which check refused (`--hypothesis-show-statistics` counts them): YAML, the spec, or pre-flight's part."""
    line = output.split("\n", 1)[0].removeprefix("exitflow: ")
    if "YAML" in line:
        return "YAML"
    if line.startswith(("invalid spec", "--set", "/")):  # "/": the spec file's own path (not a mapping...)
        return "spec"
    return "pre-flight " + line.split(":", 1)[0].split("=", 1)[0].split()[0]


def assert_one_reason(output: str) -> None:
    """A refusal is one line, `exitflow: ...`; a spec that fails validation says `invalid spec:` and
    then one indented line per bad field. Nothing else: no traceback, no warning, no torch advice."""
    lines = output.rstrip("\n").split("\n")
    assert lines[0].startswith("exitflow: ") and "Traceback" not in output, output
    assert "weights_only=False" not in output, output
    if lines[0].endswith("invalid spec:"):
        assert len(lines) > 1 and all(line.startswith("  ") and not line.startswith("   ") for line in lines[1:]), output
    else:
        assert len(lines) == 1, output


@pytest.mark.usefixtures("one_torch_thread")  # nets of a few KB: a second thread only contends on a busy machine
@cli_settings(250)
@given(documents)
def test_plan_on_generated_documents(doc: Any) -> None:
    _plan(yaml.safe_dump(doc, allow_unicode=True).encode("utf-8"), [])


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
hostile_files = st.one_of(
    raw_files,
    st.sampled_from([BOMB.encode(), b"seeds: [0]\nseeds: [1]\n", b"net: {width: 8, width: 9}\n", b"a: 2001-02-30\n",
                     b"b: &b {name: x}\nnet:\n  <<: *b\n", b"x: !!int y\n", b"seeds: [&s 0, *s]\n"]),
    st.lists(st.sampled_from(["seeds: [0]", "name: a", "name: b", "net: {}", "data: {}", "a: &x 1", "b: *x"]),
             max_size=4).map(lambda ls: "\n".join(ls).encode()),
)


@pytest.mark.usefixtures("one_torch_thread")
@cli_settings(250)
@given(hostile_files, st.lists(set_strings, max_size=2))
def test_plan_on_hostile_files_and_set_strings(raw: bytes, sets: list[str]) -> None:
    _plan(raw, sets)


@pytest.mark.usefixtures("one_torch_thread")
@cli_settings(300)
@given(st.lists(set_strings, max_size=4))
def test_plan_on_generated_set_strings(sets: list[str]) -> None:
    _plan(b"", sets)


# Specs that reach pre-flight: a valid study on digits (resnet20, a ViT or MSDNet; maybe compared over
# a few values), with at most one field set to a value drawn from those that pass, fail or sit just past
# a cap. Widths and depths stay small or go past their caps: a net under its cap but thousands wide is
# allowed, and slow to build. The spec's folder holds three `net.init` candidates: weights of the default
# net, random bytes, and a pickle that would create CODE_RAN if it were ever unpickled.
SIZES = st.sampled_from([0, 1, 2, 3, 6, 8, 100, 10_000, 10_001, 65_537, 2**31, 10**12, 1.0e35, -1, "1e3", True])
NET_SIZES = st.sampled_from([0, 1, 2, 3, 4, 6, 8, 1_025, 8_193, 2**31, 10**35])
PATHS = st.sampled_from(["", ".", "spec.yaml", "weights.pt", "./weights.pt", "random.pt", "code.pt", "nowhere", "./nowhere",
                         "~", "~/nowhere", "~no-such-user/x", "/nonexistent", "a\nb", "a\x00b", "runs:/123",
                         "runs:/" + "0" * 32, "torchvision:", "timm:nope", "s3://b/x"])
BAD_FIELDS = st.sampled_from(["net.backbone", "net.method", "net.width", "net.depth", "net.exits", "net.head", "net.head_hidden",
                              "net.init", "data.name", "data.root", "data.train_subset", "data.resize", "phases.P1.max_epochs",
                              "phases.P2.batch_size", "phases.P2.lr", "evaluation.thresholds", "evaluation.batch_size",
                              "seeds", "tracking.storage_path", "compare"])
COMPARES = st.sampled_from([
    {"net.backbone": ["resnet20", "nosuchnet"]}, {"net.init": ["weights.pt", "random.pt"]}, {"net.init": ["code.pt"]},
    {"data.root": ["nowhere", "~/nowhere"]}, {"data": [{"name": "digits"}, {"name": "parquet", "root": "spec.yaml"}]},
    {"net.width": [8, 8_193]}, {"net.exit_every": [1, 100]}, {"net.init": ["weights.pt", "./weights.pt"]},
    {"phases.P2.loss_weighting": ["uniform", "kaya"], "net.exit_every": [1, 2]}, {"seeds": [[0], [1]]},
])
BAD_VALUES = st.one_of(PATHS, SIZES, NET_SIZES, st.lists(NET_SIZES, max_size=3), COMPARES,
                       st.sampled_from(["nosuchnet", "resnet20", "parquet", "cifar10", "mlp", "pabee", [0.01, 0.1], -1.0]))
valid_studies = st.fixed_dictionaries({
    "net": st.fixed_dictionaries({"backbone": st.sampled_from(["resnet20", "vit_tiny", "msdnet_cifar"])},
                                 optional={"method": st.sampled_from(["sdn", "pabee", "ztw"])}),
    "regimes": st.sampled_from([["joint"], ["disjoint", "mixed"]]),
}, optional={"compare": st.sampled_from([{"phases.P2.loss_weighting": ["uniform", "kaya"]}, {"net.exit_every": [1, 2]},
                                         {"net.init": ["weights.pt", None]}])})


def _with(doc: dict[str, Any], fault: tuple[str, Any] | None) -> dict[str, Any]:
    """`doc` with the field at the dotted path `fault[0]` set to `fault[1]`."""
    if fault is None:
        return doc
    *sections, name = fault[0].split(".")
    node = doc
    for section in sections:
        node = node.setdefault(section, {})
    node[name] = fault[1]
    return doc


faults = st.one_of(
    st.tuples(st.sampled_from(["net.init", "tracking.storage_path"]), PATHS),
    st.tuples(st.just("data"), st.fixed_dictionaries({"name": st.sampled_from(["parquet", "imagefolder", "cifar10"]), "root": PATHS})),
    st.tuples(st.sampled_from(["net.width", "net.depth", "net.exit_every"]), NET_SIZES),
    st.tuples(st.sampled_from(["net.exits", "net.head_hidden"]), st.lists(NET_SIZES, max_size=3)),
    st.tuples(st.sampled_from(["phases.P1.max_epochs", "phases.P2.batch_size", "evaluation.thresholds", "data.train_subset"]), SIZES),
    st.tuples(st.just("compare"), COMPARES),
    st.tuples(BAD_FIELDS, BAD_VALUES),  # anything anywhere
)
preflight_documents = st.builds(_with, valid_studies, st.one_of(st.none(), faults))


@functools.cache
def start_files() -> dict[str, bytes]:
    """weights.pt (the default study's net), random.pt, and code.pt: torch.save of an object whose
    unpickling creates CODE_RAN."""
    from exitflow.stages.core.nets import NetSpec, create_net

    def saved(obj: Any) -> bytes:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    net = create_net(NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8))
    return {"weights.pt": saved(net.state_dict()), "random.pt": bytes(range(256)) * 4, "code.pt": saved({"w": _RunsCode()})}


CODE_RAN = Path(tempfile.gettempdir()) / f"exitflow-fuzz-code-ran-{os.getpid()}"


class _RunsCode:
    def __reduce__(self):  # noqa: ANN204 - what a crafted file does: a call on load (here: touch a file)
        return (pathlib.Path.touch, (CODE_RAN,))


@pytest.mark.usefixtures("one_torch_thread")
@cli_settings(150)
@given(preflight_documents)
def test_plan_on_specs_that_reach_preflight(doc: dict[str, Any]) -> None:
    _plan(yaml.safe_dump(doc, allow_unicode=True).encode("utf-8"), [], start_files())
    assert not CODE_RAN.exists()
