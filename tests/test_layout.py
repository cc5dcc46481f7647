"""The two layers: the PyTorch core under stages/core/ imports neither Ray nor MLflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_core_imports_neither_ray_nor_mlflow() -> None:
    modules = sorted(
        "exitflow." + ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in (REPO / "stages" / "core").rglob("*.py")
    )
    assert "exitflow.stages.core.loop" in modules and "exitflow.stages.core.nets.multi_exit" in modules
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted({m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow') or m.startswith('exitflow.pipeline')}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_every_stage_kind_is_one_module_beside_the_core() -> None:
    from exitflow.pipeline.stage import stages

    kinds = {s.kind: type(s).__module__ for s in stages()}
    assert {k: kinds[k] for k in ("train", "tune", "evaluate", "report")} == {
        "train": "exitflow.stages.train", "tune": "exitflow.stages.tune", "evaluate": "exitflow.stages.evaluate", "report": "exitflow.stages.report"}
    for s in stages():
        assert s.code and type(s).__module__ in s.code  # its own source joins its cache key
