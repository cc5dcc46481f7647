"""The experiment spec: one YAML file, validated by pydantic, with `--set key=value` overrides.

Raw dicts stop here: the rest of exitflow sees frozen, validated models. Every field has a
default that serves the embedded digits study, so an empty file is a valid spec. This module holds
the study (`StudySpec`), its comparison axes (`variants`) and how a spec is read (`load_spec`);
its sections are `pipeline.spec_sections`, the types they are made of `pipeline.spec_types`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from exitflow.pipeline.spec_sections import (
    AnalysesConfig,
    DataConfig,
    EvaluationConfig,
    NetConfig,
    PhasesConfig,
    ResourcesConfig,
    SearchConfig,
    TrackingConfig,
)
from exitflow.pipeline.spec_types import Regime, Seed, SpecError, SpecModel, format_validation_error, shown
from exitflow.pipeline.spec_yaml import SpecYAMLError, load_yaml
from exitflow.stages.core.allowed import MAX_SEEDS, MAX_SPEC_BYTES, MAX_VARIANTS, MAX_YAML_DEPTH, RUN_PREFIX, pretrained_source
from exitflow.stages.core.user_backbone import import_root, names_module


class StudySpec(SpecModel):
    """One study: every regime x seed trained, evaluated and compared."""

    name: str = Field("digits-study", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    data: DataConfig = Field(default_factory=DataConfig)
    net: NetConfig = Field(default_factory=NetConfig)
    regimes: list[Regime] = Field(default_factory=lambda: ["joint", "disjoint", "mixed"], min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1, max_length=MAX_SEEDS)
    phases: PhasesConfig = Field(default_factory=PhasesConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    analyses: AnalysesConfig = Field(default_factory=AnalysesConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    # Comparison axes: a spec field's dotted path -> the values to compare. The study is every
    # combination of them, with every regime and seed; nodes whose keys agree are shared.
    compare: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("regimes", "seeds")
    @classmethod
    def _unique(cls, v: list[Any]) -> list[Any]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicates in {v}")
        return v

    @model_validator(mode="after")
    def _analyses_fit_the_study(self) -> "StudySpec":
        for section in self.analyses.sections():  # e.g. connectivity's models, named by regime and seed
            section.check_study(self.regimes, self.seeds)
        return self

    @field_validator("compare")
    @classmethod
    def _axes(cls, v: dict[str, list[Any]], info: ValidationInfo) -> dict[str, list[Any]]:
        for axis, values in v.items():
            parts = axis.split(".")
            if not all(parts):
                raise ValueError(f"{axis!r}: not a dotted field path")
            barred = next((p for p in NOT_AXES if axis == p or axis.startswith(p + ".")), None)
            if barred is not None:
                raise ValueError(f"{axis!r} cannot be compared: {NOT_AXES[barred]}")
            if not isinstance(values, list) or not values:
                raise ValueError(f"{axis!r}: give a non-empty list of values")
            seen = [yaml.safe_dump(x) for x in values]
            if len(set(seen)) != len(seen):
                raise ValueError(f"{axis!r}: duplicate values in {values}")
        count = math.prod(len(values) for values in v.values())
        if count > MAX_VARIANTS:
            raise ValueError(f"{count} variants (the product of the axes' lengths): at most {MAX_VARIANTS}")
        fields = [f for f in cls.model_fields if f != "compare"]
        if not all(f in info.data for f in fields):
            return v  # another field is invalid: that error is reported, the variants cannot be built
        # Every combination of the axes' values (each variant `variants` builds) must make a valid
        # study: checked now, before Ray, naming the values.
        base = {f: (info.data[f].model_dump(mode="json") if isinstance(info.data[f], BaseModel) else info.data[f]) for f in fields}
        for assignment, doc in _combinations(base, v):
            try:
                StudySpec.model_validate(doc)
            except ValidationError as e:
                reasons = "; ".join(line.strip() for line in format_validation_error(e).splitlines()[1:])
                raise ValueError(f"{axis_label(assignment)} makes an invalid study: {reasons}") from None
        return v


# Spec fields no comparison axis may name, and why.
NOT_AXES = {
    "regimes": "every study compares its regimes already",
    "seeds": "seeds are averaged over, not compared",
    "compare": "axes do not nest",
    "name": "it names the study, it changes no result",
    "resources": "how a study runs changes no result",
    "tracking": "where results are stored changes no result",
    "search.max_concurrent_trials": "how a search runs changes no result",
}


def _set_path(doc: dict[str, Any], parts: list[str], value: Any) -> dict[str, Any]:
    """A copy of `doc` with the field at `parts` set to `value` (the sections on the way created)."""
    out = _deep_copy(doc)
    node = out
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise SpecError(f"{shown('.'.join(parts))}: {p!r} is not a section")
        node = child
    node[parts[-1]] = _deep_copy(value)
    return out


def _combinations(base: dict[str, Any], compare: dict[str, list[Any]]) -> list[tuple[tuple[tuple[str, Any], ...], dict[str, Any]]]:
    """(assignment, document) for every combination of the axes' values, applied to `base`."""
    axes = list(compare)
    out = []
    for combo in itertools.product(*compare.values()):
        doc = base
        for axis, value in zip(axes, combo):
            doc = _set_path(doc, axis.split("."), value)
        out.append((tuple(zip(axes, combo)), doc))
    return out


def variants(spec: StudySpec) -> list[tuple[tuple[tuple[str, Any], ...], StudySpec]]:
    """Every combination of the comparison axes' values, as (assignment, the study with it set);
    one variant with an empty assignment when the spec compares nothing. The first value of each
    axis is its baseline. Each combination was validated with the spec."""
    if not spec.compare:
        return [((), spec)]
    base = spec.model_dump(mode="json", exclude={"compare"})
    return [(assignment, StudySpec.model_validate(doc)) for assignment, doc in _combinations(base, spec.compare)]


def axis_label(assignment: tuple[tuple[str, Any], ...]) -> str:
    """`phases.P2.loss_weighting=kaya,net.exit_every=2`: how a variant is named in node ids and tables."""
    return ",".join(f"{axis}={_value_text(value)}" for axis, value in assignment)


def _value_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


# ----------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML), so `seeds=[0,1]` gives a list."""
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise SpecError(f"--set {item!r}: empty key")
    if len(parts) > MAX_YAML_DEPTH:
        raise SpecError(f"--set {key[:40]!r}...: a key of {len(parts)} parts: no field lies deeper than {MAX_YAML_DEPTH}")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except SpecYAMLError as e:
        raise SpecError(f"--set {shown(key)}: {'value is not valid YAML' if e.malformed else 'value refused'}: {e}") from None
    return parts, value


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set` overrides to a raw document (a copy)."""
    out = _deep_copy(doc)
    for item in overrides:
        parts, value = parse_override(item)
        try:
            out = _set_path(out, parts, value)
        except SpecError as e:
            raise SpecError(f"--set {e}") from None
    return out


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d




def load_spec(path: str | Path | None, overrides: list[str] | None = None) -> StudySpec:
    """Read (`load_yaml`: bounded, no duplicate keys), override and validate a spec; its paths then
    resolve against the spec file's folder (`resolve_paths`; the working directory without a file)."""
    doc: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SpecError(f"spec file {'is a folder' if p.is_dir() else 'not found'}: {p}")
        try:
            if p.stat().st_size > MAX_SPEC_BYTES:
                raise SpecError(f"{p}: {p.stat().st_size} bytes: a spec file is at most {MAX_SPEC_BYTES} bytes")
            loaded = load_yaml(p.read_text(encoding="utf-8"))
        except SpecYAMLError as e:
            raise SpecError(f"{p}: {'malformed YAML' if e.malformed else 'YAML refused'}: {e}") from None
        except UnicodeDecodeError as e:
            raise SpecError(f"{p}: malformed YAML: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise SpecError(f"{p}: cannot read: {e.strerror or e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SpecError(f"{p}: the top level must be a mapping of fields, got {type(loaded).__name__}")
        doc = loaded
        base = p.resolve().parent
    where = str(path) if path is not None else "--set"
    try:
        doc = apply_overrides(doc, overrides or [])
        spec = StudySpec.model_validate(doc)
    except ValidationError as e:
        raise SpecError(format_validation_error(e)) from None
    except RecursionError:  # the YAML reader bounds nesting; this guards what else may nest (pydantic, copies)
        raise SpecError(f"{where}: invalid spec: nested too deeply") from None
    spec = resolve_paths(spec, base)
    if any(names_module(v.net.backbone) for _, v in variants(spec)):
        import_root(base)  # `net.backbone: my_backbone:build` imports the spec folder's my_backbone.py (Ray ships it)
    return spec


def _is_file_init(v: str) -> bool:
    return not v.startswith(RUN_PREFIX) and pretrained_source(v) is None


# The spec's local paths (field -> whether a value is one: not a URI, a run or a library's weights).
# tracking.uri is not among them: like --tracking-uri and its default, its sqlite path is the working
# directory's (the runner makes it absolute).
PATH_FIELDS: dict[str, Callable[[str], bool]] = {
    "data.root": lambda v: "://" not in v,
    "net.init": _is_file_init,
    "tracking.storage_path": lambda v: "://" not in v,
}


def resolve_paths(spec: StudySpec, base: Path) -> StudySpec:
    """Every local path of the spec absolute, `~` expanded, a relative one against `base`, the spec's
    folder (Ray changes its workers' working directory): the PATH_FIELDS, and the same fields in the
    values of the `compare` axes (a variant's `data.root`, or a whole `data:` section's root)."""
    updates: dict[str, Any] = {}
    for field, is_local in PATH_FIELDS.items():
        section, name = field.split(".")
        model = updates.get(section, getattr(spec, section))
        value = getattr(model, name)
        if value and is_local(value):
            updates[section] = model.model_copy(update={name: local_path(field, value, base)})
    compare = {}
    for axis, values in spec.compare.items():
        compare[axis] = [_paths_in(axis, v, base) for v in values]
        seen = [yaml.safe_dump(v) for v in compare[axis]]
        if len(set(seen)) != len(seen):
            twice = next(v for v, text in zip(values, seen) if seen.count(text) > 1)
            raise SpecError(f"invalid spec:\n  compare: {axis!r}: two values name the same path as {twice!r}")
    return spec.model_copy(update={**updates, "compare": compare})


def local_path(field: str, value: str, base: Path) -> str:
    """`value` with `~` expanded, made absolute against `base` when relative."""
    try:
        path = Path(value).expanduser()
    except RuntimeError as e:  # ~user of no such user
        raise SpecError(f"invalid spec:\n  {field}: {value!r}: {e}") from None
    return str(path if path.is_absolute() else (base / path).resolve())


def _paths_in(axis: str, value: Any, base: Path) -> Any:
    """An axis value with every path field at or under the axis made absolute (`local_path`)."""
    where = axis.split(".")
    for field, is_local in PATH_FIELDS.items():
        parts = field.split(".")
        if parts[: len(where)] == where:
            value = _replace_at(value, parts[len(where):], lambda v, f=field, ok=is_local: (
                local_path(f, v, base) if isinstance(v, str) and v and ok(v) else v))
    return value


def _replace_at(value: Any, parts: list[str], change: Callable[[Any], Any]) -> Any:
    """`value` with `change` applied at the key path `parts` (unchanged where that path is absent)."""
    if not parts:
        return change(value)
    if isinstance(value, dict) and parts[0] in value:
        return {**value, parts[0]: _replace_at(value[parts[0]], parts[1:], change)}
    return value


def spec_to_yaml(spec: StudySpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
