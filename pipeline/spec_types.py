"""What every field of a spec is made of: the base model, the field types, the error and its messages.

A leaf of the spec (it imports nothing of exitflow's but the core's allowed values): the study's
sections (`pipeline.spec_sections`) and the sections a stage kind declares beside its code
(`AnalysisSection`, e.g. `stages/analyze_rank.py`) are all built from these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from exitflow.stages.core.allowed import MAX_INT

Regime = Literal["joint", "disjoint", "mixed"]
PhaseName = Literal["P1", "P2", "P3"]

class SpecError(ValueError):
    """A spec that cannot run; `str()` names each bad field and the reason."""


def _not_bool(v: Any) -> Any:
    # pydantic's lax mode reads true/false as 1/0: `patience: yes` must not mean 1 epoch.
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got the boolean {v!r}")
    return v


# Numbers as YAML gives them (ints, floats, and strings such as "1e-3": PyYAML reads an
# exponent without a dot as a string), but never booleans. Every integer is capped (a field's own
# cap, from stages.core.allowed, is tighter where it sizes something).
Int = Annotated[int, BeforeValidator(_not_bool), Field(ge=-MAX_INT, le=MAX_INT)]
Float = Annotated[float, BeforeValidator(_not_bool)]


def _no_control_characters(v: str) -> str:
    # A newline or NUL in a path is a quoting accident; it would also split the one-line messages that name it.
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise ValueError(f"{v!r} holds a control character")
    return v


PathText = Annotated[str, AfterValidator(_no_control_characters)]  # a path or URI
# numpy/sklearn seeds must fit in 32 bits.
Seed = Annotated[int, BeforeValidator(_not_bool), Field(ge=0, lt=2**32)]


class SpecModel(BaseModel):
    """The base of every spec section: unknown keys refused, frozen once validated."""

    # allow_inf_nan=False: .inf / .nan are never a meaningful size, rate or fraction.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class AnalysisSection(SpecModel):
    """A section under `analyses:` that a stage kind declares beside its code (`Stage.section`):
    `name` is its key there; the spec finds it through the stage registry, never by name."""

    name: ClassVar[str]
    enabled: bool = False

    def settings(self) -> dict[str, Any]:
        """Its fields but `enabled`, as plain values: what a node's config takes from it."""
        return self.model_dump(mode="json", exclude={"enabled"})

    def check_study(self, regimes: Sequence[str], seeds: Sequence[int]) -> None:
        """Refuse (ValueError) settings that name what the study lacks (a regime, a seed); none by default."""


C = TypeVar("C", bound=type)


def with_settings(section: type[AnalysisSection], exclude: tuple[str, ...] = ()) -> Callable[[C], C]:
    """A class decorator: the class as a frozen dataclass of its own fields, then `section`'s settings
    (its fields but `enabled` and `exclude`, in its order, typed as it types them), so a node's config
    declares none of them again. The config holds plain values (`settings()`), as a key hashes them:

        @with_settings(ExitSpreadAnalysis)
        class SpreadConfig:
            seed: int               # the node's own fields; `statistic` comes from the section
    """

    def wrap(cls: C) -> C:
        own = dict(cls.__dict__.get("__annotations__", {}))
        settings = {name: f.annotation for name, f in section.model_fields.items() if name != "enabled" and name not in exclude}
        clash = sorted(set(own) & set(settings))
        if clash:
            raise TypeError(f"{cls.__name__}: {clash} are {section.__name__}'s settings already")
        cls.__annotations__ = {**own, **settings}
        return dataclasses.dataclass(frozen=True)(cls)

    return wrap


# ----------------------------------------------------------------------------- messages


def shown(text: str) -> str:
    """`text` as a message shows a user's key: itself, or quoted (with escapes) when it holds a newline
    or another unprintable character, or starts or ends with a space (each problem on its one line,
    and what the key is, exactly)."""
    return text if text.isprintable() and text == text.strip() else repr(text)


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: `  dotted.field: reason`, under an "invalid spec:" heading."""
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        # Drop union tags from the path, but never the last part of an unknown key: that is the user's key.
        keep_last = loc[-1:] if e["type"] == "extra_forbidden" else []
        parts = [p for p in loc[: len(loc) - len(keep_last)] if not (isinstance(p, str) and p in UNION_TAGS)] + keep_last
        where = shown(".".join(str(p) for p in parts)) or "(spec)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {msg}")
    # Union members repeat the same location; keep each line once, in order.
    return "invalid spec:\n" + "\n".join(dict.fromkeys(lines))


# The tags of the unions of field forms (pipeline.spec_sections): a location shows none of them.
UNION_TAGS = {"lr=number", "lr=grid", "lr=preset", "lr=loguniform", "budget=number", "budget=name"}
