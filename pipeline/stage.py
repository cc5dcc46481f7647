"""The stage registry: what a stage kind declares, and the one place the pipeline finds it.

A stage kind is one module with one registered class:

    @register_stage
    class Evaluate(Stage):
        kind = "evaluate"
        reads = (CHECKPOINT,)                 # artifact kinds it reads from its inputs
        writes = (EXITS, CURVE)               # artifact kinds it writes (each table kind has one schema)
        code = ("exitflow.stages.evaluate",)           # modules whose source joins its cache key
        plan_order = 20                       # after the phases, whose models it evaluates
        def plan(self, spec, graph): ...      # the nodes it adds to a study
        def resources(self, node, settings): ...
        def run(self, node, inputs, ctx) -> StageResult: ...

Every kind plans its own nodes (`plan`, called in `plan_order`) and may declare its section of the
spec (`section`, under `analyses:`). What the pipeline needs to know of a kind it asks here, by the
kind's declared `role` (a phase, the report, an analysis) and capabilities, never by its name:
`pipeline.execute.execute_node` is the same for every kind (verify and load inputs through the
artifact store, call `run`, save and hash the declared outputs, log the run). The built-in kinds
are found by `pipeline.kinds`. This module imports neither torch, Ray nor MLflow.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from exitflow.pipeline.dag import Graph, Node
from exitflow.pipeline.kinds import declare_section, drop_sections, load_builtin_kinds

if TYPE_CHECKING:
    from exitflow.pipeline.spec import StudySpec
    from exitflow.pipeline.spec_types import AnalysisSection


class Role(enum.Enum):
    """What the pipeline may rely on a kind for, in place of its name."""

    PHASE = enum.auto()  # trains a model of the study (a regime's phase): its run holds a checkpoint another study may start from
    REPORT = enum.auto()  # the study's result: one node; `exitflow run` and `exitflow report` print its `printed` texts
    ANALYSIS = enum.auto()  # the pipeline run links its run (`exitflow report` lists its plots)


PHASE, REPORT, ANALYSIS = Role.PHASE, Role.REPORT, Role.ANALYSIS

# Where a kind plans: per variant of the comparison axes (`Graph.variants` empty), or once on the
# graph that merges them (`Graph.variants` set).
VARIANT, STUDY = "variant", "study"

NODE_RETRIES = 1  # a node task whose process dies (a lost node, the OOM killer) runs again, resuming its stage
CHECKPOINT = "checkpoint"  # a model: state_dict + the spec that rebuilds its net
FILES = "files"  # plain files (plots, text): hashed like the rest, no schema


@dataclass(frozen=True)
class TableKind:
    """A Parquet table artifact: its kind, file name and required columns (one schema per kind)."""

    name: str
    path: str
    columns: tuple[str, ...]
    # also logged as an MLflow table (`<stem>.json`, split orient, tagged mlflow.loggedArtifacts):
    # the UI's artifact view renders it as a table, where Parquet shows as a file
    ui: bool = False


@dataclass(frozen=True)
class Checkpoint:
    state: Mapping[str, Any]  # the unwrapped state_dict
    meta: Mapping[str, Any]  # spec.json: must hold "net" (NetSpec.to_dict())


@dataclass(frozen=True)
class Table:
    kind: str
    table: Any  # pyarrow.Table
    meta: Mapping[str, str] = field(default_factory=dict)  # Parquet schema metadata


@dataclass(frozen=True)
class File:
    path: Path


Artifact = Checkpoint | Table | File


@dataclass
class StageResult:
    """What a stage's run produced; execute_node stores every part of it on the stage's MLflow run."""

    artifacts: list[Artifact] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # handed to downstream nodes (and kept as a tag)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    # MLflow models to log on the run once its metrics are in: each called with (client, run id),
    # returns the LoggedModel's id (the evaluate kind's early-exit pyfunc)
    models: list[Callable[[Any, str], str]] = field(default_factory=list)


class StageFailed(RuntimeError):
    """A stage failure that marks the stage's run (the tags) before it is closed FAILED."""

    def __init__(self, message: str, tags: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.tags = dict(tags or {})


@dataclass(frozen=True)
class Resources:
    """What a node's Ray task reserves while its stage runs."""

    num_cpus: float = 0.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class RunSettings:
    """How a study runs, not what it computes: never in a cache key (the driver reads them once)."""

    study_name: str = "study"
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 1
    torch_threads: int | None = None
    max_concurrent_trials: int = 2
    admission: bool = True  # start a node only when the study's running nodes leave room (pipeline.admission)
    trainer: str = "auto"  # auto: one-worker phases train in their stage's own process; ray_train: all under Ray Train

    @property
    def in_process(self) -> bool:
        """Whether a phase trains in the process of its stage (or trial), without Ray Train: one worker, `auto`."""
        return self.trainer == "auto" and self.num_workers <= 1

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.cpus_per_worker))

    def net_task(self) -> Resources:
        """What a task that runs a net itself holds (evaluate, analyses): a worker's CPUs, and its GPU when the study has them."""
        return Resources(self.cpus_per_worker, self.gpus_per_worker if self.use_gpu else 0.0)

    def worker_group(self) -> Resources:
        """What one phase's Train workers reserve (local mode, 0 workers, trains in one process all the same)."""
        n = max(1, self.num_workers)
        return Resources(n * self.cpus_per_worker, n * self.gpus_per_worker if self.use_gpu else 0.0)

    def device(self) -> str:
        """Where such a task runs the net: the task's GPU when the study has GPUs and one is visible, else CPU."""
        import torch

        return "cuda" if self.use_gpu and torch.cuda.is_available() else "cpu"


class StageInput(Protocol):
    """A finished input node, as a stage sees it: only the kinds its stage `reads` can be loaded."""

    node_id: str
    run_id: str
    summary: dict[str, Any]

    def table(self, kind: str) -> Any: ...

    def checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]]: ...

    def checkpoint_source(self) -> Callable[[], dict[str, Any]]: ...


class StageContext(Protocol):
    """What the pipeline lends a running stage: its run, its settings and the tracking services."""

    run_id: str
    storage_path: str
    settings: RunSettings
    workdir: Path  # a scratch folder that lives until the stage's artifacts are stored
    fault_plan: tuple[Any, ...]

    def metrics_sink(self) -> Callable[[int, dict[str, float]], None]: ...

    def run_checkpoint(self, run_id: str) -> Callable[[], dict[str, Any]]: ...

    def trial_runs(self) -> TrialRuns: ...


@dataclass(frozen=True)
class TrialOutcome:
    """How one trial of a search ended, as its nested run records it."""

    name: str  # the trial's run name (what `TrialRuns.__call__` was given)
    stopped_by: str  # patience | scheduler | diverged | max_epochs
    chosen: bool  # its model is the search's
    best_val: float
    epochs: int


class TrialRuns(Protocol):
    """Each trial of a search as a run nested under its stage's run (`StageContext.trial_runs`)."""

    def __call__(self, trial_name: str, lr: float) -> Any:
        """The trial's run (made, or found again on a resume): a metrics sink `(step, metrics)` with `close(status)`."""

    def adopt(self, trials: Iterable[TrialOutcome]) -> None:
        """After a search: every trial's run under the stage's run with its outcome, none left open."""

    def abandon(self, prefix: str) -> None:
        """After a failed search: the trial runs still open whose names start with `prefix` are killed."""


class Stage:
    """The base of every stage kind; subclasses set the class attributes and `run`."""

    kind: ClassVar[str] = ""
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[TableKind | str, ...]] = ()
    code: ClassVar[tuple[str, ...]] = ()
    # (section, field) of its config that it receives but that cannot change its result: not keyed
    unkeyed: ClassVar[tuple[tuple[str, str], ...]] = ()
    role: ClassVar[Role | None] = None  # PHASE, REPORT, ANALYSIS, or none
    plan_order: ClassVar[int] = 100  # kinds plan in this order (then by kind): a kind reads the nodes planned before it
    scope: ClassVar[str] = VARIANT
    also_plans: ClassVar[tuple[str, ...]] = ()  # other kinds its plan adds nodes of (train plans the searched phases: tune)
    section: ClassVar[type[AnalysisSection] | None] = None  # its section under `analyses:`, declared beside its code
    printed: ClassVar[tuple[str, ...]] = ()  # text files of its run that the commands print (the report's tables)
    data_context: ClassVar[str] = ""  # what it reads its data for, as MLflow's dataset input says (default: its family)

    def resources(self, node: Node, settings: RunSettings) -> Resources:
        return Resources()  # orchestration only: the work reserves its own (Train workers, Tune trials)

    def retries(self, node: Node, settings: RunSettings) -> int:
        """How often Ray runs the node's task again when its process dies (the stage resumes)."""
        return NODE_RETRIES

    def footprint(self, node: Node, settings: RunSettings) -> Resources:
        """What the node holds on the cluster while it runs: its task's reservation and what its work
        reserves (Train workers, Tune trials). The driver starts a node only when the study's running
        nodes leave room for it (`pipeline.admission`), so a waiting node costs no Ray process."""
        return self.resources(node, settings)

    def params(self, node: Node) -> dict[str, str]:
        """MLflow params of the node's run, logged when it starts."""
        return {}

    def describe(self, summary: dict[str, Any]) -> str:
        """The tail of the node's progress line (after kind and seconds), from its summary."""
        return ""

    def plan(self, spec: StudySpec, graph: Graph) -> list[Node]:
        """The nodes this kind adds to a study's graph, which holds those of the kinds planned before it
        (`plan_order`); a VARIANT kind sees one variant's study and nodes, a STUDY kind the merged graph."""
        return []

    def spec_section(self, spec: StudySpec) -> AnalysisSection | None:
        """This study's values of the kind's `section` (its defaults when the spec leaves it out)."""
        return getattr(spec.analyses, self.section.name) if self.section is not None else None

    def run(self, node: Node, inputs: list[StageInput], ctx: StageContext) -> StageResult:
        raise NotImplementedError(f"stage {self.kind!r} has no run()")

    # ------------------------------------------------------------------ declared outputs
    def table_kinds(self) -> dict[str, TableKind]:
        return {w.name: w for w in self.writes if isinstance(w, TableKind)}

    def check_outputs(self, result: StageResult) -> None:
        """Refuse an artifact the stage did not declare: each kind has one declared writer."""
        declared = set(self.table_kinds()) | {w for w in self.writes if isinstance(w, str)}
        for a in result.artifacts:
            kind = a.kind if isinstance(a, Table) else CHECKPOINT if isinstance(a, Checkpoint) else FILES
            if kind not in declared:
                raise TypeError(f"stage {self.kind!r} wrote an undeclared artifact kind {kind!r} (declared: {sorted(declared)})")


_STAGES: dict[str, Stage] = {}
_TABLES: dict[str, TableKind] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Register a stage kind (a class decorator). A kind, and a table kind's schema, is defined once."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__}: a stage needs a kind")
    if not cls.code:
        raise ValueError(f"stage {cls.kind!r}: declare the modules whose code computes it (`code`)")
    old = _STAGES.get(cls.kind)
    if old is not None and (type(old).__module__, type(old).__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"stage kind {cls.kind!r} is registered already (by {type(old).__module__})")
    for t in cls.writes:
        if isinstance(t, TableKind) and _TABLES.get(t.name, t) != t:
            raise ValueError(f"stage {cls.kind!r}: table kind {t.name!r} is defined already as {_TABLES[t.name]}")
    if cls.scope not in (VARIANT, STUDY):
        raise ValueError(f"stage {cls.kind!r}: scope {cls.scope!r}, not {VARIANT!r} or {STUDY!r}")
    if cls.section is not None:
        declare_section(cls.kind, cls.section)
    for t in cls.writes:
        if isinstance(t, TableKind):
            _TABLES[t.name] = t
    _STAGES[cls.kind] = cls()
    return cls


def unregister_stage(kind: str) -> None:
    """Forget a stage kind and the table kinds only it wrote (tests register and drop their own)."""
    stage = _STAGES.pop(kind, None)
    if stage is None:
        return
    drop_sections(kind)
    still = {t for s in _STAGES.values() for t in s.table_kinds()}
    for name in stage.table_kinds():
        if name not in still:
            _TABLES.pop(name, None)


def get_stage(kind: str) -> Stage:
    if kind not in _STAGES:
        load_builtin_kinds()
    try:
        return _STAGES[kind]
    except KeyError:
        raise KeyError(f"unknown stage kind {kind!r}; registered: {sorted(_STAGES)}") from None


def stages() -> list[Stage]:
    """Every registered stage kind (the built-in ones included)."""
    load_builtin_kinds()
    return list(_STAGES.values())


def table_kind(name: str) -> TableKind:
    if name not in _TABLES:
        load_builtin_kinds()
    try:
        return _TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table kind {name!r}; known: {sorted(_TABLES)}") from None


def role_of(kind: str) -> Role | None:
    """The role of a kind (None for a kind without one, or one no longer registered)."""
    if kind not in _STAGES:
        load_builtin_kinds()
    stage = _STAGES.get(kind)
    return stage.role if stage is not None else None


def kinds_with_role(role: Role) -> list[str]:
    """The registered kinds that play `role`, in registry order."""
    return [s.kind for s in stages() if s.role == role]


def nodes_with_role(graph: Graph, role: Role) -> list[Node]:
    """The graph's nodes whose kind plays `role` (a study's phases: `nodes_with_role(graph, PHASE)`)."""
    return [n for n in graph.nodes.values() if role_of(n.kind) == role]


def planners(scope: str) -> list[Stage]:
    """The kinds that plan in `scope`, in the order they plan: `plan_order`, then kind."""
    return sorted((s for s in stages() if s.scope == scope), key=lambda s: (s.plan_order, s.kind))
