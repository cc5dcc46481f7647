"""Where a backbone of the user's own comes from (torch-free: the spec reads it before anything is built).

`net.backbone` names one as `module.path:builder` (a module beside the spec, or any importable one)
or as the name of an entry point in the group `exitflow.backbones` of an installed package. The
spec file's folder goes first on the import path of the driver (`import_root`), and Ray ships the
user's modules to every worker (`pipeline.user_code`), so a file beside the spec imports the same
everywhere. `stages.core.nets.custom_backbone` builds the net from it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from pathlib import Path
from typing import Any

from exitflow.stages.core.allowed import TIMM_PREFIX

ENTRY_POINT_GROUP = "exitflow.backbones"
# Prefixes that name a library's model, not a module: `timm:convnext_atto` is timm's (stages.core.nets.timm_backbone).
LIBRARY_PREFIXES = (TIMM_PREFIX.removesuffix(":"),)
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def builder_path(backbone: str) -> tuple[str, str] | None:
    """`module.path:builder` -> (module, builder); None for a registry name, a library's `timm:NAME`
    or an entry-point name. A ValueError for a `:` value that names no Python module and attribute."""
    if ":" not in backbone:
        return None
    module, _, attr = backbone.partition(":")
    if module in LIBRARY_PREFIXES:
        return None
    if module.endswith(".py"):
        raise ValueError(f"net spec field `backbone`: {backbone!r}: name the module, not its file: "
                         f"{module.removesuffix('.py').replace('/', '.')}:{attr}")
    if not _DOTTED.fullmatch(module) or not _DOTTED.fullmatch(attr):
        raise ValueError(f"net spec field `backbone`: {backbone!r}: expected module.path:builder (a Python module, "
                         f"then the callable in it that builds the backbone), e.g. my_backbone:build")
    return module, attr


def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """The backbones installed packages declare in the entry-point group `exitflow.backbones`, by name."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def names_module(backbone: str) -> bool:
    """Whether `backbone` is a `module:builder` value (well-formed or not): one a spec's folder must import."""
    try:
        return builder_path(backbone) is not None
    except ValueError:
        return True


def is_user_backbone(backbone: str) -> bool:
    """Whether `backbone` names a builder of the user's: `module:builder`, or an installed entry point."""
    return names_module(backbone) or backbone in entry_points()  # a malformed `a:b` too: its build says why it is refused


def builder_location(backbone: str) -> tuple[str, str]:
    """(module, attribute path) of a user's builder: a `module:builder` value, or an entry point's target."""
    path = builder_path(backbone)
    if path is not None:
        return path
    ep = entry_points().get(backbone)
    if ep is None:
        raise ValueError(f"net spec field `backbone`: no entry point {backbone!r} in the group {ENTRY_POINT_GROUP!r}")
    module, _, attr = ep.value.partition(":")
    return module.strip(), attr.strip()


def builder_module(backbone: str) -> str | None:
    """The module whose source builds a user's backbone (what joins the cache key), None for the project's own."""
    if not is_user_backbone(backbone):
        return None
    try:
        return builder_location(backbone)[0]
    except ValueError:
        return None


def load_builder(backbone: str) -> Any:
    """The callable `backbone` names, imported (the spec's folder is on the import path: `import_root`).
    A ValueError naming the field and why for a module that does not import and a builder it lacks."""
    module_name, attr = builder_location(backbone)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name and not module_name.startswith(f"{e.name}."):  # the module is there; what it imports is not
            raise ValueError(f"net spec field `backbone`: {backbone!r}: cannot import {module_name!r}: it imports "
                             f"{e.name!r}, which is not installed") from None
        raise ValueError(f"net spec field `backbone`: {backbone!r}: cannot import {module_name!r}: {e}; a module of your "
                         f"own lies beside the spec file, whose folder is searched first ({_first_root()})") from None
    except Exception as e:  # noqa: BLE001 - the user's module may raise anything while it imports
        raise ValueError(f"net spec field `backbone`: {backbone!r}: importing {module_name!r} raised "
                         f"{type(e).__name__}: {' '.join(str(e).split())}") from None
    found: Any = module
    for part in attr.split("."):
        if not hasattr(found, part):
            have = sorted(n for n, v in vars(module).items()
                          if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == module.__name__)
            raise ValueError(f"net spec field `backbone`: {backbone!r}: module {module_name!r} ({_file(module)}) has no "
                             f"{attr!r}; its callables: {have}")
        found = getattr(found, part)
    if not callable(found):
        raise ValueError(f"net spec field `backbone`: {backbone!r}: {attr!r} in {module_name!r} is a "
                         f"{type(found).__name__}, not a callable that builds the backbone")
    return found


_ROOTS: list[str] = []  # the folders `import_root` put first on this process's import path


def import_root(folder: Path) -> None:
    """Put `folder` (a spec file's folder) first on the import path: its modules import as top-level names."""
    entry = str(folder.resolve())
    if sys.path[:1] != [entry]:
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)
    importlib.invalidate_caches()  # a file written since the last import must be found
    if entry in _ROOTS:
        _ROOTS.remove(entry)
    _ROOTS.append(entry)


def _first_root() -> str:
    return _ROOTS[-1] if _ROOTS else str(Path.cwd())


def _file(module: Any) -> str:
    return getattr(module, "__file__", None) or module.__name__
