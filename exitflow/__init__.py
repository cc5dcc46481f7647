"""exitflow: train and study early-exit networks under joint, disjoint and mixed regimes.

The project's two folders install under this one name, so nothing generic lands at the top level
of a user's environment: `pipeline/` as `exitflow.pipeline` (the stage API and the orchestration)
and `stages/` as `exitflow.stages` (the stage kinds and, in `exitflow.stages.core`, the PyTorch
core); setup.py maps them. The command line is `exitflow` (`exitflow.pipeline.cli`).

From Python, a finished study's tables:

    from exitflow import open_study
    with open_study("PIPELINE_RUN_ID") as study:
        study.budgets()

Importing `exitflow` imports nothing heavy: `open_study` loads the results module (and MLflow) on
first use.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exitflow.pipeline.results import StudyResults, open_study

try:
    __version__ = version("exitflow")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"

_LAZY = {"open_study": "exitflow.pipeline.results", "StudyResults": "exitflow.pipeline.results"}
__all__ = ["StudyResults", "__version__", "open_study"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'exitflow' has no attribute {name!r}")
