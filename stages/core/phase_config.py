"""A training phase's hyper-parameters: the one field list of a phase, with each field's default and
bounds, which the core enforces and the study spec's `phases.*` sections are generated from
(`pipeline.spec_sections`): one list, one default, one bound.

Bounds are `annotated_types` constraints inside `typing.Annotated` (pydantic's own vocabulary: the
spec validates them with its messages, the core checks them in `__post_init__`). A field the spec sets
from another section says which in its metadata (`SET_BY`). Torch-free on purpose: the spec (and so
every command line, `--help` included) imports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le, Lt

from exitflow.stages.core.allowed import MAX_BATCH, MAX_EPOCHS, MAX_SAMPLES, MAX_WIDTH
from exitflow.stages.core.fields import check_fields, reject_unknown

OptimizerName = Literal["sgd", "adamw", "adam"]
Schedule = Literal["none", "cosine", "step"]
# The score that picks the epoch a phase keeps (stages.core.selection): the final exit, the mean over
# exits, or the area under the exits' validation FLOPs-accuracy points. P1 always keeps by its final exit.
Selection = Literal["mean", "final", "auc"]
LossWeighting = Literal["uniform", "kaya", "han", "han_decreasing", "gradient_equilibrium", "l2w"]
# How the weighted exit losses combine (stages.core.regimes.phase_objective): "mean" divides the weighted
# sum by the number of exits E (the paper's code: 1/E, in P3 as well); "sum" is the plain weighted sum.
LossReduction = Literal["mean", "sum"]

# Field metadata: the spec field that sets this one, where `phases.<phase>` does not hold it.
SET_BY = "set_by"

Epochs = Annotated[int, Ge(1), Le(MAX_EPOCHS)]
Positive = Annotated[float, Gt(0.0)]
NonNegative = Annotated[float, Ge(0.0)]
Fraction = Annotated[float, Ge(0.0), Lt(1.0)]  # [0, 1)


@dataclass(frozen=True)
class L2WSettings:
    """L2W's settings (stages.core.l2w; the paper's defaults). A phase carries them as its `l2w_*` fields."""

    epsilon: float = 0.3  # weights are 1 + epsilon * (tanh output - its mean): in [1 - 2 eps, 1 + 2 eps]
    target_p: float = 0.75  # the exit distribution the meta loss mimics: q_k ∝ target_p^k
    hidden: int = 500  # the WPN's hidden width
    meta_lr: float = 1e-4  # the WPN's Adam, times the phase's schedule factor
    meta_weight_decay: float = 1e-4
    meta_interval: int = 1  # a meta step every this many batches

    @classmethod
    def of(cls, phase: PhaseConfig) -> L2WSettings:
        """The settings a phase config carries (its `l2w_<name>` fields)."""
        return cls(**{f.name: getattr(phase, f"l2w_{f.name}") for f in dataclasses.fields(cls)})


_L2W = L2WSettings()


@dataclass(frozen=True)
class PhaseConfig:
    """Hyper-parameters of one training phase. The defaults are a study's (the spec's `phases.*` are
    generated from these fields): a quick Adam schedule that suits the embedded digits; the paper's are noted."""

    optimizer: OptimizerName = "adam"  # paper: SGD for ResNet/EfficientNet, AdamW for ViT
    # peak learning rate (after warm-up); None: searched, each trial sets its own. The spec's
    # `phases.*.lr` also takes a grid, a preset or a log-uniform range (a search: pipeline.spec_sections)
    lr: Positive | None = 3e-3
    momentum: Fraction = 0.9  # SGD momentum (paper: 0.9); unused by Adam(W)
    nesterov: bool = False  # SGD Nesterov momentum
    weight_decay: NonNegative = 0.0  # on weights with ndim >= 2 only: biases, norms, SDN alphas are not decayed
    # the loop's loaders' batch size (a study's is global: the train stage divides it by workers)
    batch_size: Annotated[int, Ge(1), Le(MAX_BATCH)] = 64
    max_epochs: Epochs = 15  # hard cap; early stopping usually ends the phase first
    patience: Epochs = 4  # epochs in a row with no exit beating its best val accuracy before stopping
    schedule: Schedule = "cosine"  # per-step lr factor after warm-up: constant, cosine to 0 at max_epochs, step decay
    warmup_epochs: Annotated[int, Ge(0), Le(MAX_EPOCHS)] = 0  # linear warm-up from lr / (warm-up steps) to lr
    step_epochs: Epochs = 30  # "step": multiply the lr by step_gamma every this many epochs
    step_gamma: Positive = 0.1  # "step": decay factor
    grad_clip: Positive | None = None  # max global grad norm of the trainable params (paper: 1 for EfficientNet)
    loss_weighting: LossWeighting = "uniform"  # exit loss weights (stages.core.regimes.exit_weights); equilibrium acts in P2 only
    kaya_epochs: Epochs | None = None  # "kaya": epochs for IC weights to reach their caps; None -> max_epochs (SDN's code)
    loss_reduction: LossReduction = "mean"  # the weighted exit losses / E (the paper's code) or their plain sum
    label_smoothing: Fraction = 0.0  # training loss only; validation loss is plain cross-entropy
    bf16: bool = False  # bf16 autocast on CUDA; a no-op on CPU (CPU autocast is slow on most CPUs)
    channels_last: bool = False  # channels-last net and 4-D inputs on CUDA; a no-op on CPU
    # the val score that picks the kept epoch (stages.core.selection); P1 always keeps by its final exit
    selection: Selection = field(default="mean", metadata={SET_BY: "search.selection"})
    # P2: measure each exit's gradient dominance every N steps (0: off)
    gradient_dominance_every: Annotated[int, Ge(0), Le(MAX_SAMPLES)] = field(
        default=0, metadata={SET_BY: "analyses.gradient_dominance.every"})
    # "l2w" (stages.core.l2w, Han et al. 2022): the weight prediction network's settings (L2WSettings)
    l2w_epsilon: Annotated[float, Gt(0.0), Le(0.5)] = _L2W.epsilon
    l2w_target_p: Positive = _L2W.target_p
    l2w_hidden: Annotated[int, Ge(1), Le(MAX_WIDTH)] = _L2W.hidden
    l2w_meta_lr: Positive = _L2W.meta_lr
    l2w_meta_weight_decay: NonNegative = _L2W.meta_weight_decay
    l2w_meta_interval: Annotated[int, Ge(1), Le(MAX_SAMPLES)] = _L2W.meta_interval

    def __post_init__(self) -> None:
        check_fields(self)  # every Literal and bound above: ValueError naming the field

    def to_dict(self) -> dict[str, Any]:
        """Plain values (a resume state and MLflow params hold this)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhaseConfig:
        """Inverse of `to_dict`; unknown keys fail loudly."""
        reject_unknown(cls, d, "phase config")
        return cls(**d)
