"""Strict reading of the core's frozen dataclasses from plain dicts (JSON, YAML, MLflow params), and
the checks of their declared values (a field's `Literal` choices and `annotated_types` bounds)."""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from annotated_types import Ge, Gt, Le, Lt

_BOUNDS = ((Ge, "ge", ">=", lambda v, b: v >= b), (Gt, "gt", ">", lambda v, b: v > b),
           (Le, "le", "<=", lambda v, b: v <= b), (Lt, "lt", "<", lambda v, b: v < b))


def reject_unknown(cls: type, d: dict[str, Any], what: str, error: type[Exception] = ValueError) -> None:
    """Raise `error` naming every key of `d` that is not a field of `cls`: a misspelt or stale key
    is an error, never silently dropped."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise error(f"{what}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's field annotations, resolved, their `Annotated` metadata kept."""
    return get_type_hints(cls, include_extras=True)


def check_fields(obj: Any) -> None:
    """Raise ValueError naming the first field of dataclass `obj` whose value its annotation refuses:
    a value outside a `Literal`'s choices, or past an `annotated_types` bound (Ge, Gt, Le, Lt). None
    passes where the annotation allows it; other types are not checked (the spec checks them)."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        _check(f.name, getattr(obj, f.name), hints[f.name])


def _check(name: str, value: Any, hint: Any) -> None:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        arms = get_args(hint)
        if value is None and type(None) in arms:
            return
        for arm in arms:
            if arm is not type(None):
                _check(name, value, arm)
        return
    if origin is Annotated:
        base, *metadata = get_args(hint)
        _check(name, value, base)
        for m in metadata:
            for kind, attr, sign, holds in _BOUNDS:
                if isinstance(m, kind) and not holds(value, getattr(m, attr)):
                    raise ValueError(f"{name} must be {sign} {getattr(m, attr)}, got {value!r}")
        return
    if origin is Literal and value not in get_args(hint):
        raise ValueError(f"{name}={value!r}; known: {list(get_args(hint))}")

