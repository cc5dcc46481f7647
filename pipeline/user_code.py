"""The user's own code a study runs: the module of a `net.backbone: module:builder` (or of an entry point)
and the modules of the user's it imports. Its source joins the cache key of the nodes that build the
net (`pipeline.keys`), and what is not installed travels to every Ray worker (`pipeline.ray_session`).

A module's own code is found by reading its imports (nothing more runs than the import machinery's
search): the modules of its top-level package, or, for a top-level module, those in its folder and
the packages there. An installed library is the environment's, never the user's.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import sysconfig
from collections.abc import Callable, Iterable
from pathlib import Path

from exitflow.pipeline.fingerprint import NAMESPACE, imported_names, tokens
from exitflow.stages.core.user_backbone import builder_module

_INSTALLED = ("site-packages", "dist-packages")


def module_file(name: str) -> Path | None:
    """The source file the import path gives for `name` (None: no such module, or not Python source)."""
    try:
        spec = importlib.util.find_spec(name)
    except Exception:  # noqa: BLE001 - a parent package that fails to import, `name` a class not a module...
        return None
    origin = spec.origin if spec is not None else None
    return Path(origin).resolve() if origin and origin.endswith(".py") else None


def installed(path: Path) -> bool:
    """Whether `path` belongs to the environment (an installed package, the standard library)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    return any(part in _INSTALLED for part in path.parts) or path.is_relative_to(stdlib)


def user_modules(name: str) -> dict[str, Path]:
    """Module `name` and the modules of the user's own it imports, each to its file, sorted by name; a
    ValueError when `name` is not on the import path."""
    first = module_file(name)
    if first is None:
        raise ValueError(f"net spec field `backbone`: cannot find module {name!r} on the import path (a module of "
                         "your own lies beside the spec file)")
    is_own = _scope(name)
    todo, found = [name], {}
    while todo:
        module = todo.pop()
        if module in found or module == NAMESPACE or module.startswith(NAMESPACE + "."):
            continue  # exitflow's own code is in every stage's fingerprint already
        path = first if module == name else module_file(module)
        if path is None or not is_own(module, path):
            continue
        found[module] = path
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        todo.extend(imported_names(path.read_text(encoding="utf-8"), package))
    return dict(sorted(found.items()))


def _scope(name: str) -> Callable[[str, Path], bool]:
    """Which modules are the user's, judged from `name`'s top-level module: the modules of its package, or
    for a top-level module the files and packages of its folder (its file alone where that is installed)."""
    top = name.split(".")[0]
    top_file = module_file(top)
    assert top_file is not None  # `name` was found, so its top-level package was
    if top_file.name == "__init__.py":
        return lambda module, path: module.split(".")[0] == top
    folder = top_file.parent
    if installed(top_file):
        return lambda module, path: module == top
    return lambda module, path: path.is_relative_to(folder) and not installed(path)


def user_code_digest(name: str) -> str:
    """The source of module `name` and of the user's modules it imports (`user_modules`), without comments
    or blank lines, hashed: editing a builder, or a file of the user's it imports, changes it."""
    h = hashlib.sha256()
    for module, path in user_modules(name).items():
        h.update(module.encode() + b"\0" + tokens(path).encode() + b"\0")
    return h.hexdigest()[:16]


def backbone_code(backbone: str) -> str | None:
    """`module@digest` of the user's code a backbone builds from, then `dist==version` of each installed
    library that code imports (timm, ...: its next version may build another net; torch, which every net
    is built on, is in no key); None for a backbone of the project's own."""
    module = builder_module(backbone)
    if module is None:
        return None
    return " ".join([f"{module}@{user_code_digest(module)}", *libraries(user_modules(module))])


UNKEYED_LIBRARIES = frozenset({"torch"})  # what every net runs on, keyed for no net


def libraries(modules: dict[str, Path]) -> list[str]:
    """`dist==version` of the installed distributions the user's `modules` import, sorted."""
    own = {name.split(".")[0] for name in modules}
    tops = {name.split(".")[0] for path in modules.values()
            for name in imported_names(path.read_text(encoding="utf-8"), "")} - own - {NAMESPACE}
    found = set()
    for top in tops:
        for dist in _distributions().get(top, ()):
            if dist.lower() not in UNKEYED_LIBRARIES:
                found.add(f"{dist}=={importlib.metadata.version(dist)}")
    return sorted(found)


@functools.cache
def _distributions() -> dict[str, list[str]]:
    """Top-level import name -> the installed distributions that provide it (read once per process)."""
    return importlib.metadata.packages_distributions()


def shipped_paths(backbones: Iterable[str]) -> list[str]:
    """What Ray ships to every worker so that the builders of `backbones` import there as they do here:
    the top-level file or package folder of each of the user's modules that is not installed."""
    paths: set[Path] = set()
    for backbone in backbones:
        module = builder_module(backbone)
        if module is None:
            continue
        for name, path in user_modules(module).items():
            if installed(path):
                continue
            depth = name.count(".") + (path.name == "__init__.py")
            paths.add(path.parents[depth - 1] if depth else path)  # a package's folder, or the module's own file
    return sorted(str(p) for p in paths)
