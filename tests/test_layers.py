"""The layers of docs/layers.md, read from the source: every import of every module under pipeline/
and stages/ (top level, inside functions and under `if TYPE_CHECKING:` alike) must point down, never
in a circle; `pipeline/` finds the stage kinds through the registry alone; `exitflow plan` plans
without Ray Train or Ray Tune.

    core (stages/core/)  <-  stage API (pipeline/: STAGE_API)  <-  stage kinds (stages/)
                                                               <-  orchestration (pipeline/)  <-  CLI

The stage kinds and the orchestration sit side by side above the stage API: the orchestration runs
the kinds, but only through the registry (`pipeline.kinds` finds their modules), never by an import.
The whole test module reads source and runs one `exitflow plan`: no Ray session.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "exitflow"  # pipeline/ and stages/ install as exitflow.pipeline and exitflow.stages (setup.py)
FOLDERS = ("pipeline", "stages")
# The pipeline's modules that a stage kind builds on: the registry and what a kind declares, the DAG's
# data, the spec and its sections' types, the spec's resolution into the core's configs, the progress
# events the kinds post. Everything else in pipeline/ orchestrates.
STAGE_API = frozenset({
    "exitflow.pipeline", "exitflow.pipeline.dag", "exitflow.pipeline.kinds", "exitflow.pipeline.stage", "exitflow.pipeline.spec", "exitflow.pipeline.spec_types",
    "exitflow.pipeline.spec_sections", "exitflow.pipeline.spec_yaml", "exitflow.pipeline.resolve", "exitflow.pipeline.events", "exitflow.pipeline.relay",
    "exitflow.pipeline.progress_events",
})
# The commands and the public face: `exitflow` itself re-exports the results API (lazily)
CLI = frozenset({"exitflow.pipeline.cli", "exitflow"})
CORE, API, KINDS, ORCHESTRATION, COMMANDS = 0, 1, 2, 3, 4
LAYER_NAMES = {CORE: "core", API: "stage API", KINDS: "stage kinds", ORCHESTRATION: "orchestration", COMMANDS: "CLI"}


@cache
def modules() -> dict[str, Path]:
    """Every project module (packages by their name) -> its file."""
    found = {NAMESPACE: REPO / NAMESPACE / "__init__.py"}
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = (NAMESPACE, *path.relative_to(REPO).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer(module: str) -> int:
    if module == "exitflow.stages.core" or module.startswith("exitflow.stages.core."):
        return CORE
    if module.startswith("exitflow.stages"):
        return KINDS
    if module in STAGE_API:
        return API
    return COMMANDS if module in CLI else ORCHESTRATION


@cache
def imports(module: str) -> frozenset[str]:
    """The project modules `module` imports, wherever the import statement stands."""
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            # `from stages.core import faults` imports the module stages.core.faults; `from x import name` x
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules() else base for a in node.names]
        for name in names:
            while name and name not in modules():  # `import a.b.c` of a module: a.b.c; of a name in a.b: a.b
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    found.discard(module)
    return frozenset(found)


def test_every_module_is_read() -> None:
    assert {"exitflow.pipeline.stage", "exitflow.pipeline.dag", "exitflow.pipeline.runner", "exitflow.stages.train", "exitflow.stages.core.loop"} <= set(modules())
    # function-level and TYPE_CHECKING imports count: the train kind reaches Ray Train inside `run`
    assert "exitflow.stages.ray_train" in imports("exitflow.stages.train")


def test_every_import_of_the_project_names_it_under_exitflow() -> None:
    """`pipeline` and `stages` are folders, not installed names: importing either bare would load a second
    copy of a module from a checkout (two registries, two classes) and fail where exitflow is installed."""
    files = [*modules().values(), *sorted(REPO.glob("tests/*.py")), *sorted(REPO.glob("bench/*.py")),
             *sorted(REPO.glob("examples/**/*.py"))]
    bare = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bare += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert bare == []


def test_only_exitflow_is_installed_at_the_top_level(tmp_path: Path) -> None:
    """Outside the checkout, the project answers to `exitflow` alone: the generic names stay free."""
    code = textwrap.dedent("""
        import importlib.util, exitflow, exitflow.pipeline.cli, exitflow.stages.core.loop
        print([importlib.util.find_spec(n) is None for n in ("pipeline", "stages")], exitflow.__version__)
        print(exitflow.open_study.__module__)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    free, module = out.stdout.splitlines()
    assert free.startswith("[True, True]") and module == "exitflow.pipeline.results"


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected sets of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = {stack.pop()}
            while v not in part:
                part.add(stack.pop())
            if len(part) > 1:
                found.append(part)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_among_the_projects_modules() -> None:
    found = circles({m: set(imports(m)) for m in modules()})
    assert found == []


def test_no_module_imports_one_of_a_higher_layer() -> None:
    upward = [f"{m} ({LAYER_NAMES[layer(m)]}) imports {i} ({LAYER_NAMES[layer(i)]})"
              for m in sorted(modules()) for i in sorted(imports(m)) if layer(i) > layer(m)]
    assert upward == []


def test_the_pipeline_imports_no_stage_kinds_module() -> None:
    """pipeline/ reaches the kinds through the registry only (`pipeline.kinds` finds and imports them)."""
    named = [f"{m} imports {i}" for m in sorted(modules()) if m.startswith("exitflow.pipeline")
             for i in sorted(imports(m)) if layer(i) == KINDS]
    assert named == []


def _strings(path: Path) -> set[str]:
    """The string constants of a module, less its docstrings (prose may name anything)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(body[0].value) for body in [tree.body] + [n.body for n in ast.walk(tree) if isinstance(
        n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))] if body and isinstance(body[0], ast.Expr)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs}


def test_nothing_in_the_pipeline_names_a_stage_kind_or_its_module() -> None:
    """No string in pipeline/ is a kind (or its family) or a kind's module: what the pipeline needs of a
    kind it asks the kind (`role`, `plan`, `printed`, ...), and it finds kinds' modules by reading stages/."""
    from exitflow.pipeline.kinds import builtin_modules
    from exitflow.pipeline.stage import stages

    kinds = {s.kind for s in stages()} | {s.kind.partition(".")[0] for s in stages()}
    assert {"train", "tune", "evaluate", "report", "analyze"} <= kinds
    named = {f"{m}: {text!r}" for m, path in modules().items() if m.startswith("exitflow.pipeline")
             for text in _strings(path) if text in kinds or re.match(r"(exitflow\.)?stages\.(?!core\b)", text)}
    assert named == set()
    # and every kind of the project's own is found there: each in stages/, none left out
    own = {type(s).__module__ for s in stages() if type(s).__module__.startswith("exitflow.stages.")}
    assert own == set(builtin_modules())


def test_the_core_imports_neither_ray_nor_mlflow_nor_the_layers_above() -> None:
    external = set()
    for m, path in modules().items():
        if layer(m) == CORE:
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                external |= {f"{m}: {n}" for n in names if n.split(".")[0] in ("ray", "mlflow")}
    assert external == set()


# ----------------------------------------------------------------------------- planning without Ray

EXAMPLE = REPO / "examples" / "digits.yaml"
# Runs `exitflow plan` where importing ray.train or ray.tune (or anything under them) raises, and
# lists every attempt, caught or not.
NO_RAY_TRAIN_OR_TUNE = textwrap.dedent("""
    import importlib.abc, sys

    attempts = []

    class Refused(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in ("ray.train", "ray.tune") or name.startswith(("ray.train.", "ray.tune.")):
                attempts.append(name)
                raise ImportError(f"{name}: planning must not import it")
            return None

    sys.meta_path.insert(0, Refused())
    from exitflow.pipeline.cli import main

    sys.argv = ["exitflow", "plan", sys.argv[1], "--tracking-uri", sys.argv[2]]
    try:
        main()
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    print("ATTEMPTS", sorted(set(attempts)))
    sys.exit(code)
""")


def test_exitflow_plan_runs_where_ray_train_and_tune_cannot_be_imported(tmp_path: Path) -> None:
    from exitflow.pipeline.graph import build_graph
    from exitflow.pipeline.spec import load_spec

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    store = f"sqlite:///{tmp_path / 'none.db'}"  # no such store: nothing cached, nothing made
    out = subprocess.run([sys.executable, "-c", NO_RAY_TRAIN_OR_TUNE, str(EXAMPLE), store], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ATTEMPTS []" in out.stdout, out.stdout[-2000:]
    printed = dict(re.findall(r"^  (\S+)\s+\S+\s+key=(\w+)", out.stdout, re.M))
    assert printed == {n.id: n.key for n in build_graph(load_spec(EXAMPLE)).nodes.values()}
    assert len(printed) == 8 and not (tmp_path / "none.db").exists()


MAX_LINES = 450  # a module past this is doing two jobs: split it by responsibility


def test_no_source_file_is_over_450_lines() -> None:
    files = [p for folder in (*FOLDERS, NAMESPACE, "tests", "bench", "examples", "cluster")
             for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 100
    long = {str(p.relative_to(REPO)): n for p in files if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}
