"""The experiment spec: one YAML file, validated by pydantic, with `--set key=value` overrides.

Raw dicts stop here: the rest of exitflow sees frozen, validated models. Every field has a
default that serves the embedded digits study, so an empty file is a valid spec.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from stages.core.analysis.mutual_information import estimator_setting as _mi_setting
from stages.core.augment import Augmentations as _CoreAugmentations
from stages.core.allowed import (
    DATASET_NAMES,
    HEAD_KINDS,
    MAX_BATCH,
    MAX_DEPTH,
    MAX_EPOCHS,
    MAX_GRID,
    MAX_HEAD_LAYERS,
    MAX_INT,
    MAX_PROCESSES,
    MAX_SAMPLES,
    MAX_SEEDS,
    MAX_SPEC_BYTES,
    MAX_THRESHOLDS,
    MAX_TRIALS,
    MAX_VARIANTS,
    MAX_WIDTH,
    MAX_YAML_DEPTH,
    MIN_SUBSET,
    NEEDS_NO_ROOT,
    RESIZE_BOUNDS,
    RUN_PREFIX,
    VAL_FRACTION_BOUNDS,
    pretrained_source,
)
from stages.core.budgets import DEFAULT_BUDGETS, NAMED_BUDGETS, BudgetRule, SeedAveraging
from stages.core.phase_config import LossReduction, LossWeighting, OptimizerName, Schedule
from stages.core.phase_config import PhaseConfig as _CorePhase

from pipeline.spec_yaml import SpecYAMLError, load_yaml

Regime = Literal["joint", "disjoint", "mixed"]
PhaseName = Literal["P1", "P2", "P3"]

# The paper's per-family learning-rate grids (its appendix D).
LR_PRESETS: dict[str, tuple[float, ...]] = {
    "resnet": (8e-3, 2e-2, 5e-2, 8e-2, 2e-1),
    "vit": (1e-3, 1e-4, 1e-5, 4e-3, 8e-3, 5e-4, 8e-4, 4e-5, 8e-5),
    "efficientnet": (3e-1, 1e-1, 3e-2, 1e-2, 1e-3, 3e-3),
}


class SpecError(ValueError):
    """A spec that cannot run; `str()` names each bad field and the reason."""


def _not_bool(v: Any) -> Any:
    # pydantic's lax mode reads true/false as 1/0: `patience: yes` must not mean 1 epoch.
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got the boolean {v!r}")
    return v


# Numbers as YAML gives them (ints, floats, and strings such as "1e-3": PyYAML reads an
# exponent without a dot as a string), but never booleans. Every integer is capped (a field's own
# cap, from stages.core.allowed, is tighter where it sizes something).
Int = Annotated[int, BeforeValidator(_not_bool), Field(ge=-MAX_INT, le=MAX_INT)]
Float = Annotated[float, BeforeValidator(_not_bool)]


def _no_control_characters(v: str) -> str:
    # A newline or NUL in a path is a quoting accident; it would also split the one-line messages that name it.
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise ValueError(f"{v!r} holds a control character")
    return v


PathText = Annotated[str, AfterValidator(_no_control_characters)]  # a path or URI
# numpy/sklearn seeds must fit in 32 bits.
Seed = Annotated[int, BeforeValidator(_not_bool), Field(ge=0, lt=2**32)]


class _Model(BaseModel):
    # allow_inf_nan=False: .inf / .nan are never a meaningful size, rate or fraction.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class AugmentationsConfig(_Model):
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


class DataConfig(_Model):
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


class NetConfig(_Model):
    backbone: str = "resnet20"  # registry name (exitflow plan lists them on error)
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
        from stages.core.nets.methods import METHODS  # the methods' one list: their registry

        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; known: {METHODS.names()}")
        return v


class LogUniform(_Model):
    loguniform: tuple[Float, Float]  # (low, high), both > 0
    num_samples: Int = Field(4, ge=1, le=MAX_TRIALS)

    @field_validator("loguniform")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0 < lo < hi):
            raise ValueError("needs 0 < low < high")
        return v


class Preset(_Model):
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


_PHASE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(_CorePhase)}


class PhaseConfig(_Model):
    """A phase's hyper-parameters: the allowed values and defaults are the core's own
    (`stages.core.phase_config.PhaseConfig`), so the spec and the training loop cannot disagree."""

    optimizer: OptimizerName = _PHASE_DEFAULTS["optimizer"]
    lr: LrSpec = _PHASE_DEFAULTS["lr"]  # a number, a grid (list or preset) or a log-uniform range: a list/range is tuned
    momentum: Float = Field(_PHASE_DEFAULTS["momentum"], ge=0.0, lt=1.0)
    nesterov: bool = _PHASE_DEFAULTS["nesterov"]
    weight_decay: Float = Field(_PHASE_DEFAULTS["weight_decay"], ge=0.0)
    batch_size: Int = Field(_PHASE_DEFAULTS["batch_size"], ge=1, le=MAX_BATCH)  # global: split over the Train workers
    max_epochs: Int = Field(_PHASE_DEFAULTS["max_epochs"], ge=1, le=MAX_EPOCHS)
    patience: Int = Field(_PHASE_DEFAULTS["patience"], ge=1, le=MAX_EPOCHS)  # early stopping: epochs with no exit improving
    schedule: Schedule = _PHASE_DEFAULTS["schedule"]
    warmup_epochs: Int = Field(_PHASE_DEFAULTS["warmup_epochs"], ge=0, le=MAX_EPOCHS)
    step_epochs: Int = Field(_PHASE_DEFAULTS["step_epochs"], ge=1, le=MAX_EPOCHS)  # schedule "step": decay every this many epochs
    step_gamma: Float = Field(_PHASE_DEFAULTS["step_gamma"], gt=0.0)  # schedule "step": the decay factor
    grad_clip: Float | None = Field(_PHASE_DEFAULTS["grad_clip"], gt=0.0)
    loss_weighting: LossWeighting = _PHASE_DEFAULTS["loss_weighting"]
    kaya_epochs: Int | None = Field(_PHASE_DEFAULTS["kaya_epochs"], ge=1, le=MAX_EPOCHS)  # "kaya": epochs to the IC weights' caps; None: max_epochs
    loss_reduction: LossReduction = _PHASE_DEFAULTS["loss_reduction"]  # mean: weighted exit losses / E (the paper's); sum
    label_smoothing: Float = Field(_PHASE_DEFAULTS["label_smoothing"], ge=0.0, lt=1.0)
    bf16: bool = _PHASE_DEFAULTS["bf16"]  # bf16 autocast (CUDA only; a no-op on CPU)
    channels_last: bool = _PHASE_DEFAULTS["channels_last"]  # NHWC memory format for conv nets on CUDA
    # loss_weighting "l2w": the weight prediction network (P2 and P3; see docs/methods.md)
    l2w_epsilon: Float = Field(_PHASE_DEFAULTS["l2w_epsilon"], gt=0.0, le=0.5)
    l2w_target_p: Float = Field(_PHASE_DEFAULTS["l2w_target_p"], gt=0.0)
    l2w_hidden: Int = Field(_PHASE_DEFAULTS["l2w_hidden"], ge=1, le=MAX_WIDTH)
    l2w_meta_lr: Float = Field(_PHASE_DEFAULTS["l2w_meta_lr"], gt=0.0)
    l2w_meta_weight_decay: Float = Field(_PHASE_DEFAULTS["l2w_meta_weight_decay"], ge=0.0)
    l2w_meta_interval: Int = Field(_PHASE_DEFAULTS["l2w_meta_interval"], ge=1, le=MAX_SAMPLES)

    @field_validator("lr")
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


def _default_p1() -> PhaseConfig:
    return PhaseConfig()


class PhasesConfig(_Model):
    P1: PhaseConfig = Field(default_factory=_default_p1)  # backbone alone, final exit only
    P2: PhaseConfig = Field(default_factory=PhaseConfig)  # backbone + every IC
    P3: PhaseConfig = Field(default_factory=PhaseConfig)  # frozen backbone, ICs only


class SearchConfig(_Model):
    selection: Literal["mean", "final", "auc"] = "mean"  # P2/P3 metric; P1 always uses the final exit
    scheduler: Literal["none", "asha"] = "none"  # ASHA stops poor learning rates early
    grace_period: Int = Field(2, ge=1, le=MAX_EPOCHS)  # ASHA: epochs before a trial may be stopped
    reduction_factor: Float = Field(2.0, gt=1.0)
    max_concurrent_trials: Int = Field(2, ge=1, le=MAX_PROCESSES)


class EvaluationConfig(_Model):
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
        from stages.core.evaluation import CRITERIA  # the criteria's one list: their registry

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


class ResourcesConfig(_Model):
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


class RankAnalysis(_Model):
    """Numerical rank of every backbone layer's output (paper Fig. 3): P1's backbone (= disjoint's), mixed, joint."""

    enabled: bool = False
    # Which images, always with eval transforms: the test set, the validation share of the training
    # set, or the training images the phases learn from (the paper's landscapes and connectivity).
    split: Literal["train", "test", "val"] = "test"
    samples: Int = Field(1000, ge=2, le=MAX_SAMPLES)  # the batch: rows of each layer's matrix (the paper: the test set)
    features: Int = Field(6000, ge=1, le=MAX_SAMPLES)  # columns kept per layer, the same random subset across models
    rtol: Float | None = Field(None, gt=0.0)  # None: s_max * max(m, n) * float32 eps (numpy's rule)


class LandscapeAnalysis(_Model):
    """The loss of every exit (and their sum) around each regime's final model, on a plane of two
    filter-normalised random directions (paper App. A, Fig. 17)."""

    enabled: bool = False
    split: Literal["train", "test", "val"] = "test"
    samples: Int = Field(500, ge=1, le=MAX_SAMPLES)  # the images every grid point is evaluated on
    steps: Int = Field(21, ge=3, le=MAX_GRID)  # points per axis (odd: the centre is the model); the paper: 100 x 100
    span: Float = Field(1.0, gt=0.0)  # the grid covers [-span, span]^2 in units of the directions

    @field_validator("steps")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"steps must be odd, so the grid's centre is the model itself; got {v}")
        return v


class MutualInformationAnalysis(_Model):
    """I(X; Z) between the input and every block's noisy representation (paper Fig. 5, D.6)."""

    enabled: bool = False
    split: Literal["train", "test", "val"] = "test"
    samples: Int = Field(500, ge=2, le=MAX_SAMPLES)  # N: X is uniform over these images (I <= log N)
    # jensen (the paper's), mc: Kawaguchi et al. 2023's fixed-noise estimator; relative_noise: noise
    # scaled to each block's median pairwise distance (exitflow's earlier estimator)
    estimator: Literal["jensen", "mc", "relative_noise"] = "jensen"
    # Each estimator's own settings. Unset (null): the estimator's default (in parentheses; the stage
    # fills it in, so a spec's dump carries no default another estimator would refuse, e.g. in
    # `compare`); set for an estimator that does not read it: refused, never silently ignored.
    noise_std: Float | None = Field(None, gt=0.0)  # jensen, mc: the noise's std, absolute (1.0)
    noise: Float | None = Field(None, gt=0.0)  # relative_noise: std as a share of the median distance (0.25)
    draws: Int | None = Field(None, ge=1, le=MAX_GRID)  # mc, relative_noise: noise draws per sample (4)

    @field_validator("noise_std", "noise", "draws")
    @classmethod
    def _read_by_the_estimator(cls, v: float | int | None, info: ValidationInfo) -> float | int | None:
        if "estimator" in info.data:  # absent: the estimator itself is invalid, and its own error says so
            _mi_setting(info.data["estimator"], info.field_name or "", v)
        return v


class GradientDominanceAnalysis(_Model):
    """During P2 (joint, mixed): each exit's gradient on the backbone against the total (paper Fig. 4).
    Measured inside training: switching it on re-trains those P2 phases."""

    enabled: bool = False
    every: Int = Field(10, ge=1, le=MAX_SAMPLES)  # measure every N training steps of an epoch (the epoch's mean is logged)


class ConnectivityAnalysis(_Model):
    """Mode connectivity between the regimes' final models after weight matching (paper Fig. 2, D.8):
    the loss along the line between every pair, and over the plane through three."""

    enabled: bool = False
    split: Literal["train", "test", "val"] = "test"  # the images every point is evaluated on
    samples: Int = Field(500, ge=1, le=MAX_SAMPLES)
    train_samples: Int = Field(500, ge=2, le=MAX_SAMPLES)  # training images each point's BatchNorm statistics are recomputed on
    bn_repair: bool = True  # recompute BatchNorm statistics at every point (false: interpolate them as weights)
    points: Int = Field(11, ge=2, le=MAX_GRID)  # points along each line, both models included
    plane_steps: Int = Field(11, ge=2, le=MAX_GRID)  # points per axis of the plane's grid; the paper: 150 x 150
    iterations: Int = Field(100, ge=1, le=MAX_SAMPLES)  # weight matching: most passes over the permutation groups
    # Regime -> the seed whose model it contributes, e.g. {disjoint: 0, mixed: 1, joint: 2}: one node
    # across seeds (the paper's D.8 takes disjoint's and mixed's backbones from different seeds, so
    # matching has real permutations to find). None: one node per seed, its regimes' models.
    seeds: dict[Regime, Seed] | None = None

    @field_validator("seeds")
    @classmethod
    def _two_models(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is not None and len(v) < 2:
            raise ValueError(f"name at least two regimes, each with the seed of its model; got {v}")
        return v


class AnalysesConfig(_Model):
    rank: RankAnalysis = Field(default_factory=RankAnalysis)
    gradient_dominance: GradientDominanceAnalysis = Field(default_factory=GradientDominanceAnalysis)
    mutual_information: MutualInformationAnalysis = Field(default_factory=MutualInformationAnalysis)
    landscape: LandscapeAnalysis = Field(default_factory=LandscapeAnalysis)
    connectivity: ConnectivityAnalysis = Field(default_factory=ConnectivityAnalysis)


class TrackingConfig(_Model):
    uri: PathText | None = None  # MLflow tracking URI; None -> $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str | None = None  # MLflow experiment; None -> the spec's name
    # Ray Train/Tune storage (shared FS or s3:// on a cluster); a relative path resolves against the
    # spec file, ~ is expanded; None -> beside a local sqlite store, else ./.exitflow/ray (runner.storage_path)
    storage_path: PathText | None = None


class StudySpec(_Model):
    """One study: every regime x seed trained, evaluated and compared."""

    name: str = Field("digits-study", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    data: DataConfig = Field(default_factory=DataConfig)
    net: NetConfig = Field(default_factory=NetConfig)
    regimes: list[Regime] = Field(default_factory=lambda: ["joint", "disjoint", "mixed"], min_length=1)
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1, max_length=MAX_SEEDS)
    phases: PhasesConfig = Field(default_factory=PhasesConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    analyses: AnalysesConfig = Field(default_factory=AnalysesConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    # Comparison axes: a spec field's dotted path -> the values to compare. The study is every
    # combination of them, with every regime and seed; nodes whose keys agree are shared.
    compare: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("regimes", "seeds")
    @classmethod
    def _unique(cls, v: list[Any]) -> list[Any]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicates in {v}")
        return v

    @model_validator(mode="after")
    def _connectivity_models(self) -> "StudySpec":
        chosen = self.analyses.connectivity.seeds or {}
        for regime, seed in chosen.items():
            if regime not in self.regimes:
                raise ValueError(f"analyses.connectivity.seeds: {regime!r} is not among the study's regimes {self.regimes}")
            if seed not in self.seeds:
                raise ValueError(f"analyses.connectivity.seeds: {regime}'s seed {seed} is not among the study's seeds {self.seeds}")
        return self

    @field_validator("compare")
    @classmethod
    def _axes(cls, v: dict[str, list[Any]], info: ValidationInfo) -> dict[str, list[Any]]:
        for axis, values in v.items():
            parts = axis.split(".")
            if not all(parts):
                raise ValueError(f"{axis!r}: not a dotted field path")
            barred = next((p for p in NOT_AXES if axis == p or axis.startswith(p + ".")), None)
            if barred is not None:
                raise ValueError(f"{axis!r} cannot be compared: {NOT_AXES[barred]}")
            if not isinstance(values, list) or not values:
                raise ValueError(f"{axis!r}: give a non-empty list of values")
            seen = [yaml.safe_dump(x) for x in values]
            if len(set(seen)) != len(seen):
                raise ValueError(f"{axis!r}: duplicate values in {values}")
        count = math.prod(len(values) for values in v.values())
        if count > MAX_VARIANTS:
            raise ValueError(f"{count} variants (the product of the axes' lengths): at most {MAX_VARIANTS}")
        fields = [f for f in cls.model_fields if f != "compare"]
        if not all(f in info.data for f in fields):
            return v  # another field is invalid: that error is reported, the variants cannot be built
        # Every combination of the axes' values (each variant `variants` builds) must make a valid
        # study: checked now, before Ray, naming the values.
        base = {f: (info.data[f].model_dump(mode="json") if isinstance(info.data[f], BaseModel) else info.data[f]) for f in fields}
        for assignment, doc in _combinations(base, v):
            try:
                StudySpec.model_validate(doc)
            except ValidationError as e:
                reasons = "; ".join(line.strip() for line in format_validation_error(e).splitlines()[1:])
                raise ValueError(f"{axis_label(assignment)} makes an invalid study: {reasons}") from None
        return v


# Spec fields no comparison axis may name, and why.
NOT_AXES = {
    "regimes": "every study compares its regimes already",
    "seeds": "seeds are averaged over, not compared",
    "compare": "axes do not nest",
    "name": "it names the study, it changes no result",
    "resources": "how a study runs changes no result",
    "tracking": "where results are stored changes no result",
    "search.max_concurrent_trials": "how a search runs changes no result",
}


def _set_path(doc: dict[str, Any], parts: list[str], value: Any) -> dict[str, Any]:
    """A copy of `doc` with the field at `parts` set to `value` (the sections on the way created)."""
    out = _deep_copy(doc)
    node = out
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise SpecError(f"{shown('.'.join(parts))}: {p!r} is not a section")
        node = child
    node[parts[-1]] = _deep_copy(value)
    return out


def _combinations(base: dict[str, Any], compare: dict[str, list[Any]]) -> list[tuple[tuple[tuple[str, Any], ...], dict[str, Any]]]:
    """(assignment, document) for every combination of the axes' values, applied to `base`."""
    import itertools

    axes = list(compare)
    out = []
    for combo in itertools.product(*compare.values()):
        doc = base
        for axis, value in zip(axes, combo):
            doc = _set_path(doc, axis.split("."), value)
        out.append((tuple(zip(axes, combo)), doc))
    return out


def variants(spec: StudySpec) -> list[tuple[tuple[tuple[str, Any], ...], StudySpec]]:
    """Every combination of the comparison axes' values, as (assignment, the study with it set);
    one variant with an empty assignment when the spec compares nothing. The first value of each
    axis is its baseline. Each combination was validated with the spec."""
    if not spec.compare:
        return [((), spec)]
    base = spec.model_dump(mode="json", exclude={"compare"})
    return [(assignment, StudySpec.model_validate(doc)) for assignment, doc in _combinations(base, spec.compare)]


def axis_label(assignment: tuple[tuple[str, Any], ...]) -> str:
    """`phases.P2.loss_weighting=kaya,net.exit_every=2`: how a variant is named in node ids and tables."""
    return ",".join(f"{axis}={_value_text(value)}" for axis, value in assignment)


def _value_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


# ----------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML), so `seeds=[0,1]` gives a list."""
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise SpecError(f"--set {item!r}: empty key")
    if len(parts) > MAX_YAML_DEPTH:
        raise SpecError(f"--set {key[:40]!r}...: a key of {len(parts)} parts: no field lies deeper than {MAX_YAML_DEPTH}")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except SpecYAMLError as e:
        raise SpecError(f"--set {shown(key)}: {'value is not valid YAML' if e.malformed else 'value refused'}: {e}") from None
    return parts, value


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set` overrides to a raw document (a copy)."""
    out = _deep_copy(doc)
    for item in overrides:
        parts, value = parse_override(item)
        try:
            out = _set_path(out, parts, value)
        except SpecError as e:
            raise SpecError(f"--set {e}") from None
    return out


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def shown(text: str) -> str:
    """`text` as a message shows a user's key: itself, or quoted (with escapes) when it holds a newline
    or another unprintable character, or starts or ends with a space (each problem on its one line,
    and what the key is, exactly)."""
    return text if text.isprintable() and text == text.strip() else repr(text)


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: `  dotted.field: reason`, under an "invalid spec:" heading."""
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        # Drop union tags from the path, but never the last part of an unknown key: that is the user's key.
        keep_last = loc[-1:] if e["type"] == "extra_forbidden" else []
        parts = [p for p in loc[: len(loc) - len(keep_last)] if not (isinstance(p, str) and p in _UNION_TAGS)] + keep_last
        where = shown(".".join(str(p) for p in parts)) or "(spec)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {msg}")
    # Union members repeat the same location; keep each line once, in order.
    return "invalid spec:\n" + "\n".join(dict.fromkeys(lines))


_UNION_TAGS = {"lr=number", "lr=grid", "lr=preset", "lr=loguniform", "budget=number", "budget=name"}


def load_spec(path: str | Path | None, overrides: list[str] | None = None) -> StudySpec:
    """Read (`load_yaml`: bounded, no duplicate keys), override and validate a spec; its paths then
    resolve against the spec file's folder (`resolve_paths`; the working directory without a file)."""
    doc: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SpecError(f"spec file {'is a folder' if p.is_dir() else 'not found'}: {p}")
        try:
            if p.stat().st_size > MAX_SPEC_BYTES:
                raise SpecError(f"{p}: {p.stat().st_size} bytes: a spec file is at most {MAX_SPEC_BYTES} bytes")
            loaded = load_yaml(p.read_text(encoding="utf-8"))
        except SpecYAMLError as e:
            raise SpecError(f"{p}: {'malformed YAML' if e.malformed else 'YAML refused'}: {e}") from None
        except UnicodeDecodeError as e:
            raise SpecError(f"{p}: malformed YAML: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise SpecError(f"{p}: cannot read: {e.strerror or e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SpecError(f"{p}: the top level must be a mapping of fields, got {type(loaded).__name__}")
        doc = loaded
        base = p.resolve().parent
    where = str(path) if path is not None else "--set"
    try:
        doc = apply_overrides(doc, overrides or [])
        spec = StudySpec.model_validate(doc)
    except ValidationError as e:
        raise SpecError(format_validation_error(e)) from None
    except RecursionError:  # the YAML reader bounds nesting; this guards what else may nest (pydantic, copies)
        raise SpecError(f"{where}: invalid spec: nested too deeply") from None
    return resolve_paths(spec, base)


def _is_file_init(v: str) -> bool:
    return not v.startswith(RUN_PREFIX) and pretrained_source(v) is None


# The spec's local paths (field -> whether a value is one: not a URI, a run or a library's weights).
# tracking.uri is not among them: like --tracking-uri and its default, its sqlite path is the working
# directory's (the runner makes it absolute).
PATH_FIELDS: dict[str, Callable[[str], bool]] = {
    "data.root": lambda v: "://" not in v,
    "net.init": _is_file_init,
    "tracking.storage_path": lambda v: "://" not in v,
}


def resolve_paths(spec: StudySpec, base: Path) -> StudySpec:
    """Every local path of the spec absolute, `~` expanded, a relative one against `base`, the spec's
    folder (Ray changes its workers' working directory): the PATH_FIELDS, and the same fields in the
    values of the `compare` axes (a variant's `data.root`, or a whole `data:` section's root)."""
    updates: dict[str, Any] = {}
    for field, is_local in PATH_FIELDS.items():
        section, name = field.split(".")
        model = updates.get(section, getattr(spec, section))
        value = getattr(model, name)
        if value and is_local(value):
            updates[section] = model.model_copy(update={name: local_path(field, value, base)})
    compare = {}
    for axis, values in spec.compare.items():
        compare[axis] = [_paths_in(axis, v, base) for v in values]
        seen = [yaml.safe_dump(v) for v in compare[axis]]
        if len(set(seen)) != len(seen):
            twice = next(v for v, text in zip(values, seen) if seen.count(text) > 1)
            raise SpecError(f"invalid spec:\n  compare: {axis!r}: two values name the same path as {twice!r}")
    return spec.model_copy(update={**updates, "compare": compare})


def local_path(field: str, value: str, base: Path) -> str:
    """`value` with `~` expanded, made absolute against `base` when relative."""
    try:
        path = Path(value).expanduser()
    except RuntimeError as e:  # ~user of no such user
        raise SpecError(f"invalid spec:\n  {field}: {value!r}: {e}") from None
    return str(path if path.is_absolute() else (base / path).resolve())


def _paths_in(axis: str, value: Any, base: Path) -> Any:
    """An axis value with every path field at or under the axis made absolute (`local_path`)."""
    where = axis.split(".")
    for field, is_local in PATH_FIELDS.items():
        parts = field.split(".")
        if parts[: len(where)] == where:
            value = _replace_at(value, parts[len(where):], lambda v, f=field, ok=is_local: (
                local_path(f, v, base) if isinstance(v, str) and v and ok(v) else v))
    return value


def _replace_at(value: Any, parts: list[str], change: Callable[[Any], Any]) -> Any:
    """`value` with `change` applied at the key path `parts` (unchanged where that path is absent)."""
    if not parts:
        return change(value)
    if isinstance(value, dict) and parts[0] in value:
        return {**value, parts[0]: _replace_at(value[parts[0]], parts[1:], change)}
    return value


def spec_to_yaml(spec: StudySpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
