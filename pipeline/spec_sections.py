"""The study's own sections of a spec (data, net, phases, search, evaluation, resources, tracking), and
`analyses:`, whose sections the stage kinds declare beside their code.

Each field's allowed values and defaults come from the core where it reads them (`stages.core.allowed`,
`stages.core.phase_config`, ...), so the spec and the code that runs cannot disagree.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    Discriminator,
    Field,
    ModelWrapValidatorHandler,
    Tag,
    create_model,
    field_validator,
    model_validator,
)

from exitflow.pipeline.kinds import analysis_sections
from exitflow.pipeline.spec_types import AnalysisSection, Float, Int, PathText, SpecModel
from exitflow.stages.core.allowed import (
    DATASET_NAMES,
    HEAD_KINDS,
    MAX_BATCH,
    MAX_DEPTH,
    MAX_EPOCHS,
    MAX_HEAD_LAYERS,
    MAX_PROCESSES,
    MAX_THRESHOLDS,
    MAX_TRIALS,
    MAX_WIDTH,
    MIN_SUBSET,
    NEEDS_NO_ROOT,
    RESIZE_BOUNDS,
    RUN_PREFIX,
    VAL_FRACTION_BOUNDS,
    pretrained_source,
)
from exitflow.stages.core.augment import Augmentations as _CoreAugmentations
from exitflow.stages.core.budgets import DEFAULT_BUDGETS, NAMED_BUDGETS, BudgetRule, SeedAveraging
from exitflow.stages.core.fields import field_types
from exitflow.stages.core.phase_config import SET_BY, Selection
from exitflow.stages.core.phase_config import PhaseConfig as _CorePhase

# The paper's per-family learning-rate grids (its appendix D).
LR_PRESETS: dict[str, tuple[float, ...]] = {
    "resnet": (8e-3, 2e-2, 5e-2, 8e-2, 2e-1),
    "vit": (1e-3, 1e-4, 1e-5, 4e-3, 8e-3, 5e-4, 8e-4, 4e-5, 8e-5),
    "efficientnet": (3e-1, 1e-1, 3e-2, 1e-2, 1e-3, 3e-3),
}


class AugmentationsConfig(SpecModel):
    """The paper's extra train-split augmentations (its appendix E); 0 switches one off. Bounds are the
    core's (`stages.core.augment.Augmentations`)."""

    rotation: Float = 0.0  # degrees: a uniform turn in [-rotation, rotation] per image
    contrast: Float = 0.0  # contrast factor uniform in [max(0, 1 - contrast), 1 + contrast]
    random_erasing: Float = 0.0  # probability of erasing a random rectangle of the normalised image
    mixup: Float = 0.0  # Mixup's Beta(alpha, alpha) (per batch; soft targets)
    cutmix: Float = 0.0  # CutMix's Beta(alpha, alpha); with mixup on too, each batch takes one of the two

    @model_validator(mode="after")
    def _core_bounds(self) -> "AugmentationsConfig":
        _CoreAugmentations(**self.model_dump())  # its ValueError names the field and the bound
        return self


class DataConfig(SpecModel):
    name: Literal[DATASET_NAMES] = "digits"  # type: ignore[valid-type]  # the core's list
    root: PathText | None = None  # folder of the data set; relative paths resolve against the spec file, ~ is expanded
    val_fraction: Float = Field(0.1, gt=VAL_FRACTION_BOUNDS[0], lt=VAL_FRACTION_BOUNDS[1])  # stratified validation split of train
    augment: bool = True  # train-time augmentation (never on val/test)
    download: bool = False  # torchvision cifar10/cifar100 only
    train_subset: Int | None = Field(None, ge=MIN_SUBSET)  # stratified cap on train samples (quick runs)
    test_subset: Int | None = Field(None, ge=MIN_SUBSET)  # stratified cap on test samples
    num_workers: Int = Field(0, ge=0, le=MAX_PROCESSES)  # DataLoader worker processes per training worker
    augmentations: AugmentationsConfig = Field(default_factory=AugmentationsConfig)  # need augment: true
    # Resize every split's images to this square side (None: the data set's own), e.g. 224 to
    # fine-tune an ImageNet-pretrained ViT-B/16 on CIFAR's 32 px images (the paper's Fig. 11)
    resize: Int | None = Field(None, ge=RESIZE_BOUNDS[0], le=RESIZE_BOUNDS[1])

    @model_validator(mode="after")
    def _root_needed(self) -> "DataConfig":
        if self.name not in NEEDS_NO_ROOT and not self.root:
            raise ValueError(f"data.root is required for data.name={self.name!r}")
        if not self.augment and any(self.augmentations.model_dump().values()):
            raise ValueError("data.augmentations are set but data.augment is false: turn augment on or them off")
        return self


class NetConfig(SpecModel):
    backbone: str = "resnet20"  # a built-in net (exitflow plan lists them on error), timm:NAME, or module.path:builder
    method: str = "sdn"  # early-exit method, registered in stages.core.nets.methods
    exits: list[Annotated[Int, Field(le=MAX_DEPTH)]] | None = Field(None, max_length=MAX_DEPTH)  # IC positions: 1-based block numbers an IC follows
    exit_every: Int | None = Field(None, ge=1, le=MAX_DEPTH)  # or one IC every n blocks ...
    exit_start: Int | None = Field(None, ge=1, le=MAX_DEPTH)  # ... from this block
    head: Literal[HEAD_KINDS] | None = None  # type: ignore[valid-type]  # IC head kind; None -> family default
    head_norm: bool = False  # LayerNorm before a linear or MLP head
    head_hidden: list[Annotated[Int, Field(le=MAX_WIDTH)]] = Field(default_factory=list, max_length=MAX_HEAD_LAYERS)  # an "mlp" head's hidden widths, e.g. [1024] or [2048, 2048]
    small_input: bool | None = None  # torchvision ResNets: CIFAR stem; None -> by image size
    width: Int | None = Field(None, ge=1, le=MAX_WIDTH)  # width / embed-dim override (small nets)
    depth: Int | None = Field(None, ge=1, le=MAX_DEPTH)  # block-count override where the family allows it
    # Starting point of the phases that train from scratch (P1, joint's P2): a state-dict file (relative
    # paths resolve against the spec file), runs:/RUN_ID (an exitflow phase run, e.g. another study's
    # P1), or torchvision:NAME / timm:NAME (pretrained weights already in that library's local cache)
    init: PathText | None = None

    @field_validator("init")
    @classmethod
    def _init_source(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip()
        if not v:
            raise ValueError("a path to a state-dict file, runs:/RUN_ID, torchvision:NAME or timm:NAME")
        if pretrained_source(v) is not None:  # raises when the weights go unnamed
            return v
        if v.startswith(RUN_PREFIX) and not re.fullmatch(re.escape(RUN_PREFIX) + "[0-9a-f]{32}", v):
            raise ValueError(f"{v!r}: expected runs:/ and a 32-character MLflow run id")
        if "://" in v:
            raise ValueError(f"{v!r}: a local state-dict file, runs:/RUN_ID, torchvision:NAME or timm:NAME (other URIs are not read)")
        return v

    @field_validator("method")
    @classmethod
    def _registered_method(cls, v: str) -> str:
        from exitflow.stages.core.nets.methods import METHODS  # the methods' one list: their registry

        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; known: {METHODS.names()}")
        return v


class LogUniform(SpecModel):
    loguniform: tuple[Float, Float]  # (low, high), both > 0
    num_samples: Int = Field(4, ge=1, le=MAX_TRIALS)

    @field_validator("loguniform")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0 < lo < hi):
            raise ValueError("needs 0 < low < high")
        return v


class Preset(SpecModel):
    preset: Literal["resnet", "vit", "efficientnet"]  # the paper's grid for that family


def _lr_kind(v: Any) -> str | None:
    """Which form of lr `v` is, so a bad value gets the errors of that form alone."""
    if isinstance(v, (Preset, LogUniform)):
        return f"lr={type(v).__name__.lower()}"
    if isinstance(v, dict):
        return "lr=preset" if "preset" in v else "lr=loguniform" if "loguniform" in v else None
    if isinstance(v, (list, tuple)):
        return "lr=grid"
    return "lr=number"


LrSpec = Annotated[
    Union[
        Annotated[Float, Tag("lr=number")],
        Annotated[list[Float], Field(max_length=MAX_TRIALS), Tag("lr=grid")],
        Annotated[Preset, Tag("lr=preset")],
        Annotated[LogUniform, Tag("lr=loguniform")],
    ],
    Discriminator(
        _lr_kind,
        custom_error_type="lr_form",
        custom_error_message="an lr is a number, a list of numbers, {preset: NAME} or {loguniform: [LOW, HIGH]}",
    ),
]


def _budget_kind(v: Any) -> str:
    """A word is a named budget (an unknown one is told the names); anything else must be a number."""
    if isinstance(v, str):
        try:
            float(v)
        except ValueError:
            return "budget=name"
    return "budget=number"


Budget = Annotated[
    Union[Annotated[Float, Tag("budget=number")], Annotated[Literal["max", "best_on_test"], Tag("budget=name")]],
    Discriminator(_budget_kind),
]


class PhaseSection(SpecModel):
    """What every `phases.<phase>` section has beyond its fields: the lr's forms, and the core's config.
    Its fields are the core's (`PhaseConfig` below is generated from `stages.core.phase_config`)."""

    if TYPE_CHECKING:  # the generated fields the methods read
        lr: LrSpec

    @field_validator("lr", check_fields=False)
    @classmethod
    def _positive(cls, v: LrSpec) -> LrSpec:
        values = v if isinstance(v, list) else [v] if isinstance(v, (int, float)) else []
        if isinstance(v, list) and not v:
            raise ValueError("an lr grid needs at least one value")
        for x in values:
            if not (isinstance(x, (int, float)) and x > 0 and math.isfinite(x)):
                raise ValueError(f"learning rates must be finite and > 0, got {x!r}")
        return v

    def lr_values(self) -> list[float] | None:
        """The grid to search, or None for a log-uniform range (sampled by Tune)."""
        if isinstance(self.lr, (int, float)):
            return [float(self.lr)]
        if isinstance(self.lr, list):
            return [float(x) for x in self.lr]
        if isinstance(self.lr, Preset):
            return list(LR_PRESETS[self.lr.preset])
        return None

    def is_search(self) -> bool:
        values = self.lr_values()
        return values is None or len(values) > 1

    def phase_config(self, **set_elsewhere: Any) -> _CorePhase:
        """The core's config of this phase: its fields, a searched lr None (each trial sets its own),
        and the fields other sections set (`selection`, `gradient_dominance_every`: the phase planner's)."""
        fields = {name: getattr(self, name) for name in type(self).model_fields if name != "lr"}
        lr = None if self.is_search() else self.lr_values()[0]  # type: ignore[index]
        return _CorePhase(lr=lr, **fields, **set_elsewhere)


def _spec_type(hint: Any) -> Any:
    """A core field's annotation as a spec field's: its numbers read as YAML gives them (`Int`, `Float`:
    never a boolean), its Literal choices and `annotated_types` bounds kept as they are."""
    origin = get_origin(hint)
    if origin is Annotated:
        base, *bounds = get_args(hint)
        return Annotated[(_spec_type(base), *bounds)]
    if origin in (Union, types.UnionType):
        return Union[tuple(_spec_type(arm) for arm in get_args(hint))]
    return {int: Int, float: Float}.get(hint, hint)


def _phase_section() -> type[PhaseSection]:
    """`phases.<phase>`: a model with one field per field of the core's PhaseConfig, in its order, with
    its default and bounds (so the spec and the loop cannot disagree), less those another section sets
    (`SET_BY`); `lr` also takes a grid, a preset or a log-uniform range (`LrSpec`)."""
    hints = field_types(_CorePhase)
    fields: dict[str, Any] = {
        f.name: (LrSpec if f.name == "lr" else _spec_type(hints[f.name]), f.default)
        for f in dataclasses.fields(_CorePhase) if SET_BY not in f.metadata
    }
    return create_model("PhaseConfig", __base__=PhaseSection, __module__=__name__, **fields)


# A phase's hyper-parameters, as a study sets them: the core's fields (stages.core.phase_config), less
# the ones other sections set, with lr's search forms.
PhaseConfig = _phase_section()


def _default_p1() -> PhaseConfig:
    return PhaseConfig()


class PhasesConfig(SpecModel):
    P1: PhaseConfig = Field(default_factory=_default_p1)  # backbone alone, final exit only
    P2: PhaseConfig = Field(default_factory=PhaseConfig)  # backbone + every IC
    P3: PhaseConfig = Field(default_factory=PhaseConfig)  # frozen backbone, ICs only


class SearchConfig(SpecModel):
    selection: Selection = "mean"  # P2/P3 metric; P1 always uses the final exit
    scheduler: Literal["none", "asha"] = "none"  # ASHA stops poor learning rates early
    grace_period: Int = Field(2, ge=1, le=MAX_EPOCHS)  # ASHA: epochs before a trial may be stopped
    reduction_factor: Float = Field(2.0, gt=1.0)
    max_concurrent_trials: Int = Field(2, ge=1, le=MAX_PROCESSES)


class EvaluationConfig(SpecModel):
    criteria: list[str] = Field(default_factory=lambda: ["max_softmax", "entropy"], min_length=1)  # registered in stages.core.evaluation
    thresholds: Int = Field(100, ge=2, le=MAX_THRESHOLDS)
    # uniform: evenly spaced (the paper's); quantile: where the ICs' confidences are, so the curve
    # covers the FLOPs range even when confident ICs put every max softmax above 0.99
    threshold_spacing: Literal["uniform", "quantile"] = "uniform"
    # fractions of the backbone's FLOPs; max: the curve's costliest point (the paper's Max);
    # best_on_test: its most accurate point, selected on test labels (not the paper's)
    budgets: list[Budget] = Field(default_factory=lambda: list(DEFAULT_BUDGETS), min_length=1)
    # costliest: the accuracy of the costliest curve point within the budget (the paper's rule);
    # best: the best accuracy of any point within it (selected on test labels)
    budget_rule: BudgetRule = "costliest"
    # curve: the seeds' curves averaged threshold by threshold, then read (the paper's); budget:
    # each seed's curve read, then the readings averaged
    seed_averaging: SeedAveraging = "curve"
    batch_size: Int = Field(256, ge=1, le=MAX_BATCH)

    @field_validator("criteria")
    @classmethod
    def _registered(cls, v: list[str]) -> list[str]:
        from exitflow.stages.core.evaluation import CRITERIA  # the criteria's one list: their registry

        unknown = [c for c in v if c not in CRITERIA]
        if unknown:
            raise ValueError(f"unknown criterion {unknown[0]!r}; known: {CRITERIA.names()}")
        return v

    @field_validator("budgets")
    @classmethod
    def _in_range(cls, v: list[Any]) -> list[Any]:
        for b in v:
            if b not in NAMED_BUDGETS and not (0.0 < float(b) <= 1.0):
                raise ValueError(f"a budget is a fraction of the backbone's FLOPs in (0, 1] or one of {list(NAMED_BUDGETS)}, "
                                 f"got {b!r}")
        return v

    @model_validator(mode="after")
    def _one_grid_for_every_seed(self) -> EvaluationConfig:
        if self.seed_averaging == "curve" and self.threshold_spacing == "quantile":
            raise ValueError("seed_averaging 'curve' averages the seeds' curves threshold by threshold, which needs one "
                             "threshold grid for every seed: use threshold_spacing 'uniform' (the paper's), or "
                             "seed_averaging 'budget' with quantile spacing")
        return self


class ResourcesConfig(SpecModel):
    num_workers: Int = Field(1, ge=0, le=MAX_PROCESSES)  # Ray Train workers per phase (0 and 1: one, in process unless trainer: ray_train)
    use_gpu: bool = False
    cpus_per_worker: Float = Field(1.0, gt=0.0, le=MAX_PROCESSES)
    gpus_per_worker: Float = Field(1.0, ge=0.0, le=MAX_PROCESSES)  # used only with use_gpu
    max_failures: Int = Field(1, ge=0, le=MAX_PROCESSES)  # worker-group restarts from the last checkpoint
    torch_threads: Int | None = Field(None, ge=1, le=MAX_PROCESSES)  # torch.set_num_threads in workers (None: cpus_per_worker)
    # Start a phase only when the study's running phases leave room for its workers; false on an
    # autoscaling cluster, where waiting phases' demand is what makes the cluster grow.
    admission: bool = True
    # auto: a phase with one worker (num_workers 0 or 1) trains in its stage's own process (the
    # node's Ray task, or its Tune trial), without Ray Train's controller and actors (~10 s of CPU
    # a phase); ray_train: every phase under Ray Train, as phases with several workers always are.
    trainer: Literal["auto", "ray_train"] = "auto"


class TrackingConfig(SpecModel):
    uri: PathText | None = None  # MLflow tracking URI; None -> $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str | None = None  # MLflow experiment; None -> the spec's name
    # Ray Train/Tune storage (shared FS or s3:// on a cluster); a relative path resolves against the
    # spec file, ~ is expanded; None -> beside a local sqlite store, else ./.exitflow/ray (runner.storage_path)
    storage_path: PathText | None = None


class AnalysesConfig(SpecModel):
    """`analyses:`: one section per analysis, each declared by the stage kind that reads it
    (`Stage.section`, found through the registry: `pipeline.kinds`), none named here. A study's
    sections are attributes (`spec.analyses.rank`), every declared one present (its defaults when unset)."""

    model_config = SpecModel.model_config | {"extra": "allow"}  # the declared sections, held as extras

    @model_validator(mode="wrap")
    @classmethod
    def _declared_sections(cls, data: Any, handler: ModelWrapValidatorHandler[AnalysesConfig]) -> AnalysesConfig:
        if isinstance(data, AnalysesConfig) or not isinstance(data, dict):
            return handler(data)  # a validated one as it is; anything but a mapping refused as usual
        declared = analysis_sections()
        # Its errors carry their locations (`analyses.rank.samples`) and an unknown section is an unknown key.
        checked = _sections_model(tuple(declared.items())).model_validate(data)
        return handler({name: getattr(checked, name) for name in declared})

    def sections(self) -> tuple[AnalysisSection, ...]:
        """The study's sections, one per declared analysis, by name."""
        return tuple((self.__pydantic_extra__ or {}).values())

    if TYPE_CHECKING:  # a section by its declared name (pydantic serves extras as attributes)
        def __getattr__(self, name: str) -> Any: ...


@functools.lru_cache(maxsize=64)
def _sections_model(declared: tuple[tuple[str, type[AnalysisSection]], ...]) -> type[SpecModel]:
    """A model with one field per declared section: validates `analyses:` as a fixed model would."""
    fields: dict[str, Any] = {name: (model, Field(default_factory=model)) for name, model in declared}
    return create_model("analyses", __base__=SpecModel, **fields)
