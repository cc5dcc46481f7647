"""Code fingerprints: which source a stage's result depends on, hashed into its cache key.

A stage kind's code is its entry modules and every project module they import, found by reading
the imports in the source (no import runs). The hash covers that code's tokens without comments
or blank lines, so editing the training loop re-trains, editing the report re-runs only reports,
and a comment changes nothing. Fault hooks and progress logging are left out: they never change
a result.
"""

from __future__ import annotations

import ast
import importlib.util
import functools
import hashlib
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the folder holding pipeline/ and stages/
NAMESPACE = "exitflow"  # pipeline/ and stages/ install as exitflow.pipeline and exitflow.stages
PACKAGES = ("pipeline", "stages")

# Whose imports are followed: the stage modules and the PyTorch core. Each stage kind declares its
# entry modules (`Stage.code`); pipeline modules named there are hashed but not followed, and the
# rest of the pipeline (tracking, locks, the spec) reaches a result only through the config,
# which the key holds already.
FOLLOWED = ("exitflow.stages",)
IGNORED = frozenset({"exitflow.stages.core.faults", "exitflow.stages.core.log_lines"})

# The hash reads module names and code without the namespace: where the code is installed is not
# what it does, so the keys of results made before the packages moved under `exitflow.` still hold.
_NAMESPACED = re.compile(rf"\b{NAMESPACE} \. ({'|'.join(PACKAGES)})\b|(?<=[\"']){NAMESPACE}\.(?=(?:{'|'.join(PACKAGES)})\b)")


def _in_project(name: str) -> bool:
    return name == NAMESPACE or name.startswith(NAMESPACE + ".")


def _module_file(name: str, root: Path) -> Path | None:
    if _in_project(name):
        parts = name.split(".")[1:]
        if not parts or parts[0] not in PACKAGES:
            return None
        base = root.joinpath(*parts)
        for p in (base.with_suffix(".py"), base / "__init__.py"):
            if p.is_file():
                return p
        return None  # a name imported from a module, not a module
    spec = importlib.util.find_spec(name)  # a stage registered from outside the project (a plugin, a test)
    origin = spec.origin if spec is not None else None
    return Path(origin) if origin and origin.endswith(".py") else None


def _type_only(tree: ast.Module) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` blocks: imports for annotations, which never run."""
    return {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and isinstance(block.test, ast.Name)
            and block.test.id == "TYPE_CHECKING" for stmt in block.body for n in ast.walk(stmt)}


def _imports(path: Path, name: str) -> set[str]:
    """Project modules imported anywhere in the file (top level or inside functions), less type-only imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return set(_source_imports(path.read_text(), package))


# Parsing and tokenizing ~100 modules took ~3 s of a run's start, each once per stage kind: the
# results are kept per source text (an edited file is read and parsed afresh).
def _source_imports(source: str, package: str) -> frozenset[str]:
    return frozenset(m for m in imported_names(source, package) if _in_project(m))


@functools.lru_cache(maxsize=1024)
def imported_names(source: str, package: str) -> frozenset[str]:
    """Every module name the source imports, and every `module.name` it imports from one (which may be
    a module), less type-only imports; relative imports resolved against `package`."""
    found: set[str] = set()
    tree = ast.parse(source)
    skipped = _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .y import z
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from stages.core import faults`: a module
    return frozenset(found)


def modules(code: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """The modules a stage's result depends on (its declared `code` and what they import in stages/), sorted."""
    todo, seen = list(code), set()
    while todo:
        name = todo.pop()
        if name in seen or name in IGNORED:
            continue
        path = _module_file(name, root)
        if path is None:  # a name imported from a module, not a module
            continue
        seen.add(name)
        if name.startswith(FOLLOWED):
            todo.extend(m for m in _imports(path, name) if m.startswith(FOLLOWED))
    return sorted(seen, key=lambda m: m.removeprefix(NAMESPACE + "."))  # the order keys were made in


def tokens(path: Path) -> str:
    """The file's code without comments and blank lines: what changes behaviour, give or take docstrings."""
    return _source_tokens(path.read_text())


@functools.lru_cache(maxsize=1024)
def _source_tokens(source: str) -> str:
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.ENCODING}
    toks = tokenize.generate_tokens(io.StringIO(source).readline)
    return " ".join(t.string for t in toks if t.type not in skip)


@functools.cache
def fingerprint(code: tuple[str, ...], root: Path = ROOT) -> str:
    h = hashlib.sha256()
    for name in modules(code, root):
        path = _module_file(name, root)
        assert path is not None
        h.update(name.removeprefix(NAMESPACE + ".").encode() + b"\0" + _NAMESPACED.sub(r"\1", tokens(path)).encode() + b"\0")
    return h.hexdigest()[:16]
