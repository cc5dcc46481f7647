"""Early-exit methods: how a multi-exit net turns its exits' raw outputs into the logits each exit emits.

A method is one registration. `combine(raw)` gets the raw logits of exits 0..k (every IC up to
k, or the final head when k is the last exit) and returns exit k's logits: SDN (Kaya et al. 2019)
lets every IC answer alone; an ensembling method averages the exits so far. `head` is the IC
head kind the method defaults to (None: the family's default). When a sample leaves is the exit
criterion's business (`stages.core.evaluation`), whatever the method. `losses` gives each
exit's training loss (SDN: each exit against the labels alone); the phase weights and sums them.

A method may also bring modules and a step of its own (ZTW, `stages.core.nets.ztw`): `cascade`
wraps every IC after the first so that it also reads the previous IC's output; `ensemble` builds a
module (its parameters under `net.ensemble`, trained by no phase) that replaces `combine`; `finish`
is a step that runs once a phase that trained the ICs (P2, P3) has its best state, on the frozen
net: ZTW fits its ensemble there. `gates` builds a module of learned exit decisions (JEI-DNN's,
`stages.core.nets.jei_dnn`; under `net.gates`, trained by no phase, fitted by `finish`), and
`curve` is the method's own curve beside the criteria's (its name in curve.parquet and the
report): the exit each test sample takes at each of its points, decided by the method's modules.
`aggregator` builds a module that replaces `combine` and trains with the ICs (GPF's,
`stages.core.nets.gpf`; under `net.aggregator`): the ICs then give it hidden states of its
`state_width`, not logits. `aux_loss` is a loss of the method's own, read from the net after each
training forward and added to the loss of the phases that train the ICs (GPF's imitation loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from stages.core.nets import gpf, jei_dnn, ztw
from stages.core.registry import Registry


ExitLosses = Callable[[Sequence[Tensor], Tensor, Callable[[Tensor, Tensor], Tensor]], list[Tensor]]
# (the unwrapped net, its training batches on the device, a sum over the DDP ranks) -> a line for the log
FinishStep = Callable[[nn.Module, Iterable[tuple[Tensor, Tensor]], Callable[[Tensor], Tensor]], str]
# (the net, test logits [E, N, C]) -> (each point's value [T], its `threshold` column; the exit every sample takes
# at each point [T, N]); the evaluation maths gives each point its FLOPs, accuracy and ECE
CurveFn = Callable[[nn.Module, Tensor], tuple[np.ndarray, np.ndarray]]
# (the net, IC `ic`'s logits [N, C], ic, a point's value) -> which samples leave there [N] bool: the same
# rule as the curve's, for dynamic inference (stages.core.inference), which has no later exit yet
LeaveFn = Callable[[nn.Module, Tensor, int, float], Tensor]


@dataclass(frozen=True)
class MethodCurve:
    name: str  # its `criterion` in curve.parquet, budgets.parquet and calibration.parquet; never a criterion's name
    compute: CurveFn
    leaves: LeaveFn
    # its source bins ECE by equal mass (JEI-DNN's code): the curve also gets `ece_equal_mass`
    # (stages.core.evaluation.equal_mass_calibration_error) beside the house's equal-width `ece`
    equal_mass_ece: bool = False


def each_exit_alone(logits: Sequence[Tensor], target: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> list[Tensor]:
    """Every exit's loss against the labels (SDN's): the phase weights and sums them."""
    return [loss_fn(z, target) for z in logits]


@dataclass(frozen=True)
class ExitMethod:
    name: str
    combine: Callable[[Sequence[Tensor]], Tensor]  # raw logits of exits 0..k -> exit k's logits
    independent: bool = False  # exit k's logits are its own raw output: exit k needs no earlier IC
    head: str | None = None
    # (exits' logits, labels, the phase's loss function) -> each exit's training loss; the phase
    # decides which exits count and weights them (stages.core.phases.phase_loss)
    losses: ExitLosses = each_exit_alone
    # The method's own weights on its exits' losses (number of exits -> [E], mean 1), multiplied into
    # the phase's `loss_weighting` in P2 and P3; None: all 1. P1 trains the plain backbone: unweighted.
    loss_weights: Callable[[int], Tensor] | None = None
    cascade: bool = False  # IC k > 0 also reads IC k - 1's output, detached (its head wrapped in ztw.CascadeHead)
    ensemble: Callable[[int, int], nn.Module] | None = None  # (exits, classes) -> net.ensemble, used in place of `combine`
    finish: FinishStep | None = None  # after a phase that trained the ICs, on its best state (see the module docstring)
    gates: Callable[[int, int], nn.Module] | None = None  # (exits, classes) -> net.gates, fitted by `finish`
    curve: MethodCurve | None = None  # a curve of the method's own, evaluated beside the criteria's
    aggregator: Callable[[int, int], nn.Module] | None = None  # (exits, classes) -> net.aggregator, trained with the ICs
    aux_loss: Callable[[nn.Module], Tensor | None] | None = None  # the unwrapped net after a training forward -> a loss


METHODS: Registry[ExitMethod] = Registry("method")


def register_method(method: ExitMethod) -> ExitMethod:
    return METHODS.register(method.name, method)


def get_method(name: str) -> ExitMethod:
    try:
        return METHODS.get(name)
    except ValueError as e:
        raise ValueError(f"net spec field `method`: {e}") from None


def depth_weights(num_exits: int) -> Tensor:
    """PABEE's and GPF's exit weights: exit j (1-based) weighs j, scaled to a mean of 1 (j E / sum(1..E)).

    With the phase's mean reduction (sum_k w_k L_k / E) the loss is then sum_j j L_j / sum_j j, the
    depth-weighted average both sources train with: PABEE's code (Zhou et al. 2020) divides
    sum_j j L_j by sum_j j; GPF's, in the paper's code (its `methods/early_exit.py`), by E (E + 1) / 2.
    """
    j = torch.arange(1, num_exits + 1, dtype=torch.float32)
    return j * num_exits / j.sum()


register_method(ExitMethod("sdn", combine=lambda raw: raw[-1], independent=True))
# PABEE: independent ICs (as SDN's) and the depth-weighted loss; its exit rule is the `patience`
# criterion (stages.core.evaluation), which works with every method.
register_method(ExitMethod("pabee", combine=lambda raw: raw[-1], independent=True, loss_weights=depth_weights))
# GPF: ICs give hidden states, aggregated with the earlier ICs' (past) and imitations of the later
# ICs' (future) into each exit's logits; the depth-weighted loss as the paper's code forms it, and the
# imitation loss added to it, unweighted, in the IC phases (stages.core.nets.gpf).
register_method(ExitMethod("gpf", combine=lambda raw: raw[-1], aggregator=gpf.PastFutureAggregator,
                           aux_loss=gpf.imitation_loss, loss_weights=depth_weights))
# ZTW: cascading ICs and a geometric ensemble of the ICs so far, fitted on the frozen net once the
# ICs are trained (stages.core.nets.ztw); exit k needs every IC before it.
register_method(ExitMethod("ztw", combine=lambda raw: raw[-1], cascade=True, ensemble=ztw.GeometricEnsemble,
                           finish=ztw.fit_ensemble))
# JEI-DNN: independent ICs (as SDN's) and learned exit gates, one set per cost trade-off lambda,
# fitted on the frozen net once the ICs are trained (stages.core.nets.jei_dnn); its curve sweeps lambda.
register_method(ExitMethod("jei_dnn", combine=lambda raw: raw[-1], independent=True, gates=jei_dnn.ExitGates,
                           finish=jei_dnn.fit_gates, curve=MethodCurve("gates", jei_dnn.gate_points, jei_dnn.gate_leaves, equal_mass_ece=True)))


def method_curves(names: Iterable[str]) -> tuple[str, ...]:
    """The names of the methods' own curves (JEI-DNN's "gates"), in order, for the methods named."""
    return tuple(dict.fromkeys(m.curve.name for m in map(get_method, names) if m.curve is not None))
