"""Strict reading of the core's frozen dataclasses from plain dicts (JSON, YAML, MLflow params)."""

from __future__ import annotations

import dataclasses
from typing import Any


def reject_unknown(cls: type, d: dict[str, Any], what: str, error: type[Exception] = ValueError) -> None:
    """Raise `error` naming every key of `d` that is not a field of `cls`: a misspelt or stale key
    is an error, never silently dropped."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise error(f"{what}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
