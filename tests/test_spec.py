"""The study spec: defaults, the examples, `--set` overrides, error messages, lr forms, paths."""

from __future__ import annotations

import re
from collections.abc import Callable

from pathlib import Path

import pytest

from exitflow.pipeline.spec import SpecError, StudySpec, load_spec, spec_to_yaml
from exitflow.pipeline.spec_sections import LR_PRESETS, LogUniform, PhaseConfig, Preset

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def _write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(path: Path | None, *sets: str) -> str:
    """The SpecError message load_spec raises for this spec (fails the test if it loads)."""
    with pytest.raises(SpecError) as info:
        load_spec(path, list(sets))
    return str(info.value)


# ----------------------------------------------------------------------------- defaults


def _assert_default(spec: StudySpec) -> None:
    assert spec.data.name == "digits"
    assert spec.data.root is None
    assert list(spec.regimes) == ["joint", "disjoint", "mixed"]
    assert list(spec.seeds) == [0]
    assert spec.phases.P1.lr_values() == [spec.phases.P1.lr]


def test_no_file_is_the_default_study() -> None:
    spec = load_spec(None)
    _assert_default(spec)
    assert spec == StudySpec()


@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "---\n", "~\n"])
def test_empty_file_is_the_default_study(tmp_path: Path, text: str) -> None:
    _assert_default(load_spec(_write(tmp_path, text)))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_loads(path: Path, tmp_path: Path) -> None:
    spec = load_spec(path)
    assert spec.name
    if spec.data.root is not None:
        assert Path(spec.data.root).is_absolute()
    # What the runner stores as the spec artifact reloads to the same spec.
    assert StudySpec.model_validate(spec.model_dump(mode="json")) == spec
    assert load_spec(_write(tmp_path, spec_to_yaml(spec))) == spec


def test_examples_exist() -> None:
    assert {p.stem for p in EXAMPLES} >= {"digits", "cifar10-quick", "cifar10-resnet"}


# ----------------------------------------------------------------------------- overrides


def test_set_nested_keys_and_yaml_values(tmp_path: Path) -> None:
    spec = load_spec(
        _write(tmp_path, "seeds: [0]\nnet: {width: 16}\n"),
        ["seeds=[0,1]", "net.width=8", "phases.P2.batch_size=32", "data.augment=false", "name=other"],
    )
    assert list(spec.seeds) == [0, 1]
    assert spec.net.width == 8
    assert spec.phases.P2.batch_size == 32
    assert spec.phases.P1.batch_size == 64  # siblings keep their defaults
    assert spec.data.augment is False
    assert spec.name == "other"


def test_set_overrides_a_file_value_and_keeps_the_rest(tmp_path: Path) -> None:
    path = _write(tmp_path, "phases:\n  P1: {lr: 0.01, max_epochs: 3}\n")
    spec = load_spec(path, ["phases.P1.lr=0.02"])
    assert spec.phases.P1.lr == 0.02
    assert spec.phases.P1.max_epochs == 3


def test_set_applies_in_order() -> None:
    assert list(load_spec(None, ["seeds=[3]", "seeds=[4,5]"]).seeds) == [4, 5]


def test_set_lr_grid() -> None:
    p2 = load_spec(None, ["phases.P2.lr=[1e-3, 3e-3, 1e-2]"]).phases.P2
    assert p2.lr_values() == [1e-3, 3e-3, 1e-2]
    assert p2.is_search()


def test_set_lr_number_written_without_a_dot() -> None:
    # PyYAML reads `1e-3` (no dot) as a string: it must still be the number 0.001.
    p1 = load_spec(None, ["phases.P1.lr=1e-3"]).phases.P1
    assert p1.lr_values() == [1e-3]
    assert not p1.is_search()


def test_set_lr_preset() -> None:
    p3 = load_spec(None, ["phases.P3.lr={preset: vit}"]).phases.P3
    assert p3.lr == Preset(preset="vit")
    assert p3.lr_values() == list(LR_PRESETS["vit"])
    assert p3.is_search()


def test_set_lr_loguniform() -> None:
    p2 = load_spec(None, ["phases.P2.lr={loguniform: [1e-4, 1e-2], num_samples: 3}"]).phases.P2
    assert isinstance(p2.lr, LogUniform)
    assert p2.lr.loguniform == (1e-4, 1e-2)
    assert p2.lr.num_samples == 3
    assert p2.lr_values() is None
    assert p2.is_search()


@pytest.mark.parametrize(
    ("lr", "values", "search"),
    [
        (3e-3, [3e-3], False),
        (1, [1.0], False),
        ([5e-4], [5e-4], False),
        ([1e-3, 1e-2], [1e-3, 1e-2], True),
        ({"preset": "resnet"}, list(LR_PRESETS["resnet"]), True),
        ({"preset": "efficientnet"}, list(LR_PRESETS["efficientnet"]), True),
        ({"loguniform": [1e-5, 1e-1]}, None, True),
    ],
)
def test_lr_values_and_is_search(lr: object, values: list[float] | None, search: bool) -> None:
    phase = PhaseConfig.model_validate({"lr": lr})
    assert phase.lr_values() == values
    assert phase.is_search() is search


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["=1"], "empty key"),
        (["seeds"], "expected key=value"),
        (["seeds=[0, 1"], "not valid YAML"),
        (["name=x", "name.sub=1"], "'name' is not a section"),
    ],
)
def test_bad_set_strings(sets: list[str], message: str) -> None:
    assert message in _error(None, *sets)


def test_set_empty_value_is_null() -> None:
    # `key=` sets null: the field's own validation decides (tracking.uri may be null, seeds may not).
    assert load_spec(None, ["tracking.uri="]).tracking.uri is None
    assert "seeds" in _error(None, "seeds=")


# ----------------------------------------------------------------------------- errors


def test_malformed_yaml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "seeds: [0, 1\nname: x\n")
    msg = _error(path)
    assert str(path) in msg and "malformed YAML" in msg


def test_not_utf8_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"\xff\xfe\x00seeds: [0]")
    assert "malformed YAML" in _error(path)


def test_recursive_alias_is_a_spec_error(tmp_path: Path) -> None:
    assert "alias *x lies inside its own anchor" in _error(_write(tmp_path, "seeds: &x [*x]\n"))


def test_absurd_nesting_is_a_spec_error(tmp_path: Path) -> None:
    assert "nested more than 64 levels deep" in _error(_write(tmp_path, "seeds: " + "[" * 3000 + "]" * 3000 + "\n"))
    assert "nested more than 64 levels deep" in _error(None, "seeds=" + "[" * 3000 + "]" * 3000)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    msg = _error(_write(tmp_path, text))
    assert "top level must be a mapping" in msg


def test_missing_file_and_folder(tmp_path: Path) -> None:
    assert "not found" in _error(tmp_path / "nope.yaml")
    assert "is a folder" in _error(tmp_path)


@pytest.mark.parametrize(
    ("sets", "field", "reason"),
    [
        (["epochs=3"], "epochs", "unknown key"),
        (["net.depth_multiplier=2"], "net.depth_multiplier", "unknown key"),
        (["phases.P4={lr: 0.1}"], "phases.P4", "unknown key"),
        (["phases.P1.lr={preset: vit, extra: 1}"], "phases.P1.lr.extra", "unknown key"),
        (["data=5"], "data", "valid dictionary"),
        (["seeds=abc"], "seeds", "valid list"),
        (["seeds=[a]"], "seeds.0", "valid integer"),
        (["phases.P1.batch_size=big"], "phases.P1.batch_size", "valid integer"),
        (["phases.P1.max_epochs=true"], "phases.P1.max_epochs", "boolean"),
        (["phases.P1.lr=yes"], "phases.P1.lr", "boolean"),
        (["phases.P1.lr=fast"], "phases.P1.lr", "valid number"),
        (["phases.P1.lr={foo: 1}"], "phases.P1.lr", "{preset: NAME} or {loguniform"),
        (["phases.P1.lr={preset: alexnet}"], "phases.P1.lr.preset", "'resnet', 'vit' or 'efficientnet'"),
        (["phases.P1.optimizer=lamb"], "phases.P1.optimizer", "'sgd', 'adamw' or 'adam'"),
        (["regimes=[joint, both]"], "regimes.1", "'joint', 'disjoint' or 'mixed'"),
        (["net.backbone=[resnet20]"], "net.backbone", "valid string"),
        (["evaluation.budgets=[half]"], "evaluation.budgets.0", "'max' or 'best_on_test'"),
        (["evaluation.budgets=[true]"], "evaluation.budgets.0", "boolean"),
    ],
)
def test_wrong_keys_and_types_name_the_field(sets: list[str], field: str, reason: str) -> None:
    msg = _error(None, *sets)
    assert msg.startswith("invalid spec")
    assert f"  {field}: " in msg
    assert reason in msg


@pytest.mark.parametrize(
    ("sets", "field", "reason"),
    [
        (["phases.P1.lr=-0.1"], "phases.P1.lr", "> 0"),
        (["phases.P2.lr=0"], "phases.P2.lr", "> 0"),
        (["phases.P2.lr=.inf"], "phases.P2.lr", "finite"),
        (["phases.P2.lr=.nan"], "phases.P2.lr", "finite"),
        (["phases.P3.lr=[1e-3, 0]"], "phases.P3.lr", "> 0"),
        (["phases.P3.lr=[1e-3, -1e-2]"], "phases.P3.lr", "> 0"),
        (["phases.P3.lr=[]"], "phases.P3.lr", "at least one value"),
        (["phases.P2.lr={loguniform: [1e-2, 1e-4]}"], "phases.P2.lr.loguniform", "0 < low < high"),
        (["phases.P2.lr={loguniform: [0, 1e-4]}"], "phases.P2.lr.loguniform", "0 < low < high"),
        (["phases.P2.lr={loguniform: [1e-4, .inf]}"], "phases.P2.lr.loguniform.1", "finite"),
        (["phases.P2.lr={loguniform: [1e-4, 1e-2], num_samples: 0}"], "phases.P2.lr.num_samples", "greater than or equal to 1"),
        (["phases.P1.patience=0"], "phases.P1.patience", "greater than or equal to 1"),
        (["phases.P1.max_epochs=-3"], "phases.P1.max_epochs", "greater than or equal to 1"),
        (["phases.P1.momentum=1.0"], "phases.P1.momentum", "less than 1"),
        (["evaluation.budgets=[0.5, 1.5]"], "evaluation.budgets", "(0, 1]"),
        (["evaluation.budgets=[0]"], "evaluation.budgets", "(0, 1]"),
        (["evaluation.budgets=[]"], "evaluation.budgets", "at least 1 item"),
        (["evaluation.thresholds=1"], "evaluation.thresholds", "greater than or equal to 2"),
        (["evaluation.budgets=[0.5, best]"], "evaluation.budgets.1", "'max' or 'best_on_test'"),
        (["evaluation.threshold_spacing=quantile"], "evaluation", "seed_averaging 'curve' averages the seeds' curves"),
        (["evaluation.seed_averaging=median"], "evaluation.seed_averaging", "'curve' or 'budget'"),
        (["phases.P2.loss_reduction=max"], "phases.P2.loss_reduction", "'mean' or 'sum'"),
        (["phases.P2.loss_weighting=han_rising"], "phases.P2.loss_weighting", "han_decreasing"),
        (["regimes=[]"], "regimes", "at least 1 item"),
        (["regimes=[joint, joint]"], "regimes", "duplicates"),
        (["seeds=[]"], "seeds", "at least 1 item"),
        (["seeds=[0, 1, 0]"], "seeds", "duplicates"),
        (["seeds=[-1]"], "seeds.0", "greater than or equal to 0"),
        (["seeds=[4294967296]"], "seeds.0", "less than 4294967296"),
        (["data.name=parquet"], "data", "data.root is required"),
        (["data.name=imagefolder"], "data", "data.root is required"),
        (["data.val_fraction=0.7"], "data.val_fraction", "less than 0.5"),
        (["resources.cpus_per_worker=0"], "resources.cpus_per_worker", "greater than 0"),
        (["resources.cpus_per_worker=.inf"], "resources.cpus_per_worker", "finite"),
        (["name=has space"], "name", "pattern"),
    ],
)
def test_impossible_values_name_the_field_and_reason(sets: list[str], field: str, reason: str) -> None:
    msg = _error(None, *sets)
    assert msg.startswith("invalid spec")
    assert f"  {field}: " in msg
    assert reason in msg


def test_every_bad_field_is_reported_once(tmp_path: Path) -> None:
    path = _write(tmp_path, "seeds: [0, 0]\nregimes: []\nphases:\n  P1: {lr: -1, patience: 0}\nbogus: 1\n")
    lines = _error(path).splitlines()[1:]
    fields = [line.split(":")[0].strip() for line in lines]
    assert sorted(fields) == sorted(["seeds", "regimes", "phases.P1.lr", "phases.P1.patience", "bogus"])


def test_error_lines_have_no_union_noise() -> None:
    msg = _error(None, "phases.P1.lr={loguniform: [1e-2, 1e-4]}")
    assert msg.splitlines()[1:] == ["  phases.P1.lr.loguniform: needs 0 < low < high"]


def test_a_key_named_like_an_internal_tag_is_still_named(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "phases:\n  P1:\n    lr=number: 1\n"))
    assert "  phases.P1.lr=number: unknown key" in msg


# ----------------------------------------------------------------------------- paths


def test_relative_data_root_resolves_against_the_spec_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "specs").mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = _write(tmp_path / "specs", "data: {name: parquet, root: ../data/cifar}\n")
    spec = load_spec(path)
    assert spec.data.root == str((tmp_path / "data" / "cifar").resolve())


def test_relative_data_root_from_set_resolves_against_the_spec_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "specs").mkdir()
    path = _write(tmp_path / "specs", "")
    spec = load_spec(path, ["data.name=parquet", "data.root=data"])
    assert spec.data.root == str((tmp_path / "specs" / "data").resolve())


def test_relative_data_root_without_a_file_resolves_against_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = load_spec(None, ["data.name=parquet", "data.root=data"])
    assert spec.data.root == str((tmp_path / "data").resolve())


def test_absolute_and_remote_roots_are_kept(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    assert load_spec(path, ["data.name=parquet", "data.root=/abs/data"]).data.root == "/abs/data"
    assert load_spec(path, ["data.name=cifar10", "data.root=s3://bucket/cifar"]).data.root == "s3://bucket/cifar"


def test_spec_is_frozen() -> None:
    spec = load_spec(None)
    with pytest.raises(Exception):  # pydantic's ValidationError for a frozen instance
        spec.seeds = [1]  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "valid"),
    [
        ("val_fraction", 0.49, True), ("val_fraction", 0.5, False), ("val_fraction", 0.0, False),
        ("train_subset", 10, True), ("train_subset", 9, False), ("test_subset", 9, False),
        ("name", "cifar100", True), ("name", "mnist", False),
    ],
)
def test_the_spec_and_the_core_allow_the_same_data_values(field: str, value: object, valid: bool) -> None:
    """One list of allowed values (stages/core/allowed.py): the spec never accepts what the core refuses, nor the reverse."""
    from exitflow.stages.core.data import DataSpec

    extra = {"root": "/data/x"} if field == "name" and value != "digits" else {}
    sets = [f"data.{field}={value}", *(f"data.{k}={v}" for k, v in extra.items())]
    spec_ok = _accepts(lambda: load_spec(None, sets), SpecError)
    core_ok = _accepts(lambda: DataSpec(**{field: value, **extra}), ValueError)
    assert spec_ok == core_ok == valid


def _accepts(build: Callable[[], object], error: type[Exception]) -> bool:
    """Whether `build()` accepts its input: False when it raises `error`."""
    try:
        build()
    except error:
        return False
    return True


@pytest.mark.parametrize(("head", "valid"), [("sdn", True), ("linear", True), ("conv", False)])
def test_the_spec_and_the_core_allow_the_same_heads(head: str, valid: bool) -> None:
    from exitflow.stages.core.nets.heads import make_head

    spec_ok = _accepts(lambda: load_spec(None, [f"net.head={head}"]), SpecError)
    core_ok = _accepts(lambda: make_head(head, (8, 4, 4), 10), ValueError)
    assert spec_ok == core_ok == valid


def test_phase_defaults_and_fields_are_the_cores() -> None:
    """One default per phase field: the spec's phases.* default to the core's PhaseConfig, and every
    field the core reads from a study is a spec field (the rest the pipeline derives)."""
    import dataclasses

    from exitflow.stages.core.phase_config import PhaseConfig as CorePhase

    derived = {"selection", "gradient_dominance_every"}  # from search.selection and analyses.gradient_dominance
    core = {f.name: f.default for f in dataclasses.fields(CorePhase) if f.name not in derived}
    for phase in ("P1", "P2", "P3"):
        assert getattr(StudySpec().phases, phase).model_dump() == core


def test_the_spec_phase_section_is_generated_from_the_cores_fields() -> None:
    """One field list: each phases.* field is the core's, in its order, with the core's bounds (as
    pydantic reads them) and default; only lr's type is the spec's own (a grid, a preset, a range)."""
    import dataclasses

    from annotated_types import Ge, Gt, Le, Lt

    from exitflow.stages.core.fields import field_types
    from exitflow.stages.core.phase_config import SET_BY
    from exitflow.stages.core.phase_config import PhaseConfig as CorePhase

    core = [f for f in dataclasses.fields(CorePhase) if SET_BY not in f.metadata]
    assert list(PhaseConfig.model_fields) == [f.name for f in core]
    assert {f.name for f in dataclasses.fields(CorePhase) if SET_BY in f.metadata} == {"selection", "gradient_dominance_every"}

    def bounds(hint: object) -> set[object]:
        found = {m for m in getattr(hint, "__metadata__", ()) if isinstance(m, (Ge, Gt, Le, Lt))}
        return found.union(*(bounds(arm) for arm in getattr(hint, "__args__", ())))

    hints = field_types(CorePhase)
    for f in core:
        if f.name != "lr":
            spec_field = PhaseConfig.model_fields[f.name]
            assert bounds(hints[f.name]) <= set(spec_field.metadata) | bounds(spec_field.annotation), f.name
    message = "phases.P2.max_epochs: Input should be greater than or equal to 1"
    with pytest.raises(SpecError, match=re.escape(message)):
        load_spec(None, ["phases.P2.max_epochs=0"])


@pytest.mark.parametrize(
    ("field", "value", "valid"),
    [
        ("optimizer", "sgd", True), ("optimizer", "lion", False), ("schedule", "step", True), ("schedule", "linear", False),
        ("loss_weighting", "han", True), ("loss_weighting", "equal", False), ("momentum", 0.99, True), ("momentum", 1.0, False),
        ("step_gamma", 0.5, True), ("step_gamma", 0.0, False), ("kaya_epochs", 1, True), ("kaya_epochs", 0, False),
        ("label_smoothing", 0.5, True), ("label_smoothing", 1.0, False), ("warmup_epochs", 0, True), ("warmup_epochs", -1, False),
        # the caps (stages.core.allowed) are the core's bounds too: one declaration, both refuse
        ("max_epochs", 10_000, True), ("max_epochs", 10_001, False), ("batch_size", 65_536, True), ("batch_size", 65_537, False),
        ("l2w_hidden", 8_192, True), ("l2w_hidden", 8_193, False), ("l2w_epsilon", 0.5, True), ("l2w_epsilon", 0.6, False),
        ("grad_clip", 1.0, True), ("grad_clip", 0.0, False), ("lr", 1e-3, True), ("lr", 0.0, False),
    ],
)
def test_the_spec_and_the_core_allow_the_same_phase_values(field: str, value: object, valid: bool) -> None:
    from exitflow.stages.core.phase_config import PhaseConfig as CorePhase

    spec_ok = _accepts(lambda: load_spec(None, [f"phases.P2.{field}={value}"]), SpecError)
    core_ok = _accepts(lambda: CorePhase(**{field: value}), ValueError)
    assert spec_ok == core_ok == valid


def test_the_paper_readout_is_the_default_and_exitflows_variants_are_named() -> None:
    ev = load_spec(None).evaluation
    assert (ev.thresholds, ev.threshold_spacing, ev.budget_rule, ev.seed_averaging) == (100, "uniform", "costliest", "curve")
    assert ev.budgets == [0.25, 0.5, 0.75, 1.0, "max"]
    assert load_spec(None).phases.P2.loss_reduction == "mean"
    variant = load_spec(None, ["evaluation.threshold_spacing=quantile", "evaluation.seed_averaging=budget",
                               "evaluation.budgets=[0.5, max, best_on_test]"]).evaluation
    assert variant.budgets == [0.5, "max", "best_on_test"]
