"""docs/spec-field-path.md's claims: the walk of a phase field (`phases.P2.lr`) from the command line to
the optimizer passes through at most 7 files in at most 3 forms; each file holds what the walk names
there; and at run time the core's PhaseConfig the plan puts in a node is the object the job carries to
`build_optimizer`. No Ray: planning and the job's construction need none."""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "spec-field-path.md"


def _walk() -> list[tuple[str, list[str], str]]:
    """The doc's walk table: (file, the names it holds, the form column)."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            rows.append((cells[1].strip("`"), re.findall(r"`([\w.]+)`", cells[2]), cells[3]))
    return rows


def _defined(path: Path) -> set[str]:
    """Top-level functions, classes and assignments of a module, and `Class.method` for its classes' methods."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {f"{node.name}.{m.name}" for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def test_the_walk_is_at_most_seven_files_and_three_forms() -> None:
    walk = _walk()
    files = [f for f, _, _ in walk]
    assert len(files) == len(set(files)) and 1 < len(files) <= 7, files
    assert files[0] == "pipeline/cli.py" and files[-1] == "stages/core/loop.py"  # from the CLI to the optimizer
    forms = {int(n) for _, _, form in walk for n in re.findall(r"form (\d)", form)}
    assert forms == {1, 2, 3}, forms
    for file, names, _ in walk:
        defined = _defined(REPO / file)
        missing = [n for n in names if n not in defined]
        assert names and not missing, f"{file} lacks {missing}"
    assert "build_optimizer" in walk[-1][1]


def test_the_optimizer_reads_the_object_the_plan_put_in_the_node() -> None:
    from exitflow.pipeline.graph import build_graph
    from exitflow.pipeline.spec import load_spec
    from exitflow.stages.core.loop import build_optimizer, build_scheduler
    from exitflow.stages.core.nets import create_net
    from exitflow.stages.core.phase_config import PhaseConfig
    from exitflow.stages.core.regimes import prepare_phase
    from exitflow.stages.phase_kind import phase_job

    spec = load_spec(None, ["phases.P2.lr=0.01", "phases.P2.max_epochs=30", "regimes=[joint]", "net.width=8"])
    assert spec.phases.P2.lr == 0.01  # form 2: the spec's section
    node = build_graph(spec).nodes["seed0/joint/P2"]
    train = node.config.train
    assert type(train) is PhaseConfig and (train.lr, train.max_epochs) == (0.01, 30)  # form 3, in the node
    ctx = SimpleNamespace(metrics_sink=lambda: None, settings=SimpleNamespace(threads=1), fault_plan=())
    job, ns = phase_job(node, [], ctx)  # type: ignore[arg-type]
    assert job.config is node.config  # the job carries the node's config: no copy of its fields
    assert pickle.loads(pickle.dumps(job.config)) == node.config  # Ray's serialisation gives back the same form
    net = create_net(ns)
    optimizer = build_optimizer(prepare_phase(net, "P2"), job.config.train)
    assert [g["lr"] for g in optimizer.param_groups] == [0.01] * len(optimizer.param_groups)
    scheduler = build_scheduler(optimizer, job.config.train, steps_per_epoch=2)
    for _ in range(30 * 2):  # the cosine reaches 0 after max_epochs
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_a_bad_value_is_refused_by_the_spec_naming_the_field_with_the_cores_bound() -> None:
    from exitflow.pipeline.spec import SpecError, load_spec
    from exitflow.stages.core.phase_config import PhaseConfig

    with pytest.raises(SpecError, match=re.escape("phases.P2.max_epochs: Input should be greater than or equal to 1")):
        load_spec(None, ["phases.P2.max_epochs=0"])
    with pytest.raises(ValueError, match="max_epochs must be >= 1"):
        PhaseConfig(max_epochs=0)  # the core refuses it too: the same declaration
