"""A training phase's hyper-parameters: the core's own config, and where the study spec takes its
allowed values and defaults from (one list, one default).

Torch-free on purpose: the spec (and so every command line, `--help` included) imports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from stages.core.fields import reject_unknown

OptimizerName = Literal["sgd", "adamw", "adam"]
Schedule = Literal["none", "cosine", "step"]
Selection = Literal["final", "mean"]
LossWeighting = Literal["uniform", "kaya", "han", "han_decreasing", "gradient_equilibrium", "l2w"]
# How the weighted exit losses combine (stages.core.phases.phase_objective): "mean" divides the weighted
# sum by the number of exits E (the paper's code: 1/E, in P3 as well); "sum" is the plain weighted sum.
LossReduction = Literal["mean", "sum"]


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
    """Hyper-parameters of one training phase. The defaults are a study's (the spec's `phases.*` take
    them from here): a quick Adam schedule that suits the embedded digits; the paper's are noted."""

    optimizer: OptimizerName = "adam"  # paper: SGD for ResNet/EfficientNet, AdamW for ViT
    lr: float | None = 3e-3  # peak learning rate (after warm-up); None: searched, each trial sets its own
    momentum: float = 0.9  # SGD momentum (paper: 0.9); unused by Adam(W)
    nesterov: bool = False  # SGD Nesterov momentum
    weight_decay: float = 0.0  # on weights with ndim >= 2 only: biases, norms, SDN alphas are not decayed
    batch_size: int = 64  # the loop's loaders' batch size (a study's is global: the train stage divides it by workers)
    max_epochs: int = 15  # hard cap; early stopping usually ends the phase first
    patience: int = 4  # epochs in a row with no exit beating its best val accuracy before stopping
    schedule: Schedule = "cosine"  # per-step lr factor after warm-up: constant, cosine to 0 at max_epochs, step decay
    warmup_epochs: int = 0  # linear warm-up from lr / (warm-up steps) to lr
    step_epochs: int = 30  # "step": multiply the lr by step_gamma every this many epochs
    step_gamma: float = 0.1  # "step": decay factor
    grad_clip: float | None = None  # max global grad norm of the trainable params (paper: 1 for EfficientNet)
    loss_weighting: LossWeighting = "uniform"  # exit loss weights (stages.core.phases.exit_weights); equilibrium acts in P2 only
    kaya_epochs: int | None = None  # "kaya": epochs for IC weights to reach their caps; None -> max_epochs (SDN's code)
    loss_reduction: LossReduction = "mean"  # the weighted exit losses / E (the paper's code) or their plain sum
    label_smoothing: float = 0.0  # training loss only; validation loss is plain cross-entropy
    bf16: bool = False  # bf16 autocast on CUDA; a no-op on CPU (CPU autocast is slow on most CPUs)
    channels_last: bool = False  # channels-last net and 4-D inputs on CUDA; a no-op on CPU
    selection: Selection = "mean"  # val accuracy that picks the best state: final exit or mean over exits (P2)
    gradient_dominance_every: int = 0  # P2: measure each exit's gradient dominance every N steps (0: off)
    # "l2w" (stages.core.l2w, Han et al. 2022): the weight prediction network's settings (L2WSettings)
    l2w_epsilon: float = _L2W.epsilon
    l2w_target_p: float = _L2W.target_p
    l2w_hidden: int = _L2W.hidden
    l2w_meta_lr: float = _L2W.meta_lr
    l2w_meta_weight_decay: float = _L2W.meta_weight_decay
    l2w_meta_interval: int = _L2W.meta_interval

    def __post_init__(self) -> None:
        for name, kind in (("optimizer", OptimizerName), ("schedule", Schedule), ("selection", Selection),
                           ("loss_weighting", LossWeighting), ("loss_reduction", LossReduction)):
            allowed = get_args(kind)
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; known: {list(allowed)}")
        if (self.lr is not None and self.lr <= 0) or self.weight_decay < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError(f"need lr > 0, weight_decay >= 0, 0 <= label_smoothing < 1: {self}")
        if not 0 <= self.momentum < 1 or self.step_gamma <= 0:
            raise ValueError(f"need 0 <= momentum < 1 and step_gamma > 0: {self}")
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1 or self.warmup_epochs < 0:
            raise ValueError(f"need batch_size, max_epochs, patience >= 1 and warmup_epochs >= 0: {self}")
        if self.gradient_dominance_every < 0:
            raise ValueError(f"gradient_dominance_every must be >= 0 (0: off), got {self.gradient_dominance_every}")
        if self.step_epochs < 1 or (self.kaya_epochs is not None and self.kaya_epochs < 1):
            raise ValueError(f"need step_epochs >= 1 and kaya_epochs >= 1: {self}")
        if not 0 < self.l2w_epsilon <= 0.5 or self.l2w_target_p <= 0 or self.l2w_meta_lr <= 0 or self.l2w_meta_weight_decay < 0:
            raise ValueError(f"need 0 < l2w_epsilon <= 0.5, l2w_target_p > 0, l2w_meta_lr > 0, l2w_meta_weight_decay >= 0: {self}")
        if self.l2w_hidden < 1 or self.l2w_meta_interval < 1:
            raise ValueError(f"need l2w_hidden >= 1 and l2w_meta_interval >= 1: {self}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (a resume state and MLflow params hold this)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhaseConfig:
        """Inverse of `to_dict`; unknown keys fail loudly."""
        reject_unknown(cls, d, "phase config")
        return cls(**d)
