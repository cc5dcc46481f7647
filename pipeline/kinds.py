"""Where the stage registry finds the built-in kinds, and the spec sections that registered kinds declare.

The pipeline imports no stage kind's module by name. The built-in kinds are the modules of the
`stages` package (outside `stages.core`) that define a class decorated `@register_stage`: found by
reading their source, which imports nothing, and imported on the registry's first lookup. So a new
kind is a new module under `stages/` (with its core maths and its test) and no file of `pipeline/`
changes; one that lives elsewhere (a plugin, a test) registers itself when it is imported.

A kind may declare a section of the spec (`Stage.section`: a section under `analyses:`).
`pipeline.spec_sections.AnalysesConfig` validates a study's `analyses:` against the sections
declared here, so each is declared once, beside the code that reads it.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exitflow.pipeline.spec_types import AnalysisSection

STAGES_PACKAGE = "exitflow.stages"  # the package of the built-in kinds; its `core` subpackage holds none
DECORATOR = "register_stage"


def _registers_a_kind(source: str) -> bool:
    """Whether a module's source defines a top-level class decorated `@register_stage`."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for d in node.decorator_list:
                if (isinstance(d, ast.Name) and d.id == DECORATOR) or (isinstance(d, ast.Attribute) and d.attr == DECORATOR):
                    return True
    return False


@functools.cache
def builtin_modules() -> tuple[str, ...]:
    """The modules of the built-in kinds, sorted: `stages/<name>.py` files that register one."""
    spec = importlib.util.find_spec(STAGES_PACKAGE)  # a top-level package: finding it imports nothing
    if spec is None or not spec.submodule_search_locations:
        return ()
    found = []
    for folder in spec.submodule_search_locations:
        for path in sorted(Path(folder).glob("*.py")):
            if path.stem != "__init__" and _registers_a_kind(path.read_text(encoding="utf-8")):
                found.append(f"{STAGES_PACKAGE}.{path.stem}")
    return tuple(found)


def load_builtin_kinds() -> None:
    """Import every built-in kind's module (each registers itself); a no-op once they are imported."""
    for name in builtin_modules():
        importlib.import_module(name)


# ----------------------------------------------------------------------------- spec sections

_SECTIONS: dict[str, tuple[type[AnalysisSection], list[str]]] = {}  # name -> (model, the kinds that declare it)


def declare_section(kind: str, model: type[AnalysisSection]) -> None:
    """Kind `kind` reads `analyses.<model.name>`. Kinds may share a section (train and tune read
    `gradient_dominance`), never declare two models under one name."""
    old = _SECTIONS.get(model.name)
    if old is not None and (old[0].__module__, old[0].__qualname__) != (model.__module__, model.__qualname__):
        raise ValueError(f"stage {kind!r}: spec section analyses.{model.name} is declared already "
                         f"(as {old[0].__module__}.{old[0].__qualname__}, by {', '.join(old[1])})")
    kinds = old[1] if old is not None else []
    _SECTIONS[model.name] = (model, kinds + [kind] if kind not in kinds else kinds)


def drop_sections(kind: str) -> None:
    """Forget what `kind` declared; a section no registered kind declares any more goes."""
    for name, (model, kinds) in list(_SECTIONS.items()):
        rest = [k for k in kinds if k != kind]
        if rest:
            _SECTIONS[name] = (model, rest)
        else:
            del _SECTIONS[name]


def analysis_sections() -> dict[str, type[AnalysisSection]]:
    """Every section under `analyses:` that a registered kind declares (the built-in kinds loaded), by name."""
    load_builtin_kinds()
    return {name: model for name, (model, _) in sorted(_SECTIONS.items())}
