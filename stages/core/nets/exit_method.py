"""The early-exit method protocol: what a method adds to a multi-exit net, its loss, its curve.

A method is a subclass of `ExitMethod` whose defaults are SDN's (Kaya et al. 2019): every IC is the
study's head answering alone, each exit's loss is its cross-entropy against the labels, all exits
weigh the same, nothing else is added. A method overrides what it changes, in three parts:

- **The net** (`build`, `ic_forward`, `combine`, `exit_logits`, `independent`, `head`): the IC heads
  it wants (their width, a wrapper) and modules of its own, held by the net under their names: those
  that train with the ICs (GPF's aggregator) and those no phase trains (ZTW's ensemble, JEI-DNN's
  gates), fitted by `finish`; how an IC reads its input and how exit k's logits come from the raw
  outputs of exits 0..k.
- **The loss** (`losses`, `loss_weights`, `aux_loss`, `finish`): each exit's training loss, the
  method's own weights on them, a loss of its own added in the phases that train the ICs, and a step
  run on the frozen net once such a phase has its best state.
- **The curve** (`curves`): evaluation curves of its own beside the exit criteria's (JEI-DNN's gates).

One instance, registered by name in `stages.core.nets.methods`, serves every net: a method holds
no state (a net's state lives in its modules). When a sample leaves is the exit criterion's business
(`stages.core.evaluation`), whatever the method, unless the method brings a curve of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor, nn


class ExitNet(Protocol):
    """What a method reads of the net it is part of (a `stages.core.nets.multi_exit.MultiExitNet`, which
    imports this module: hence a protocol, not that class)."""

    ics: nn.ModuleList
    num_exits: int
    training: bool

    def raw_exits(self, x: Tensor) -> list[Tensor]: ...

    def __getattr__(self, name: str) -> Any: ...  # the method's own modules, by the names its `build` gave them


LossFn = Callable[[Tensor, Tensor], Tensor]
# (the exits' logits, the labels, the phase's loss function) -> each exit's training loss
ExitLosses = Callable[[Sequence[Tensor], Tensor, LossFn], list[Tensor]]
# (outputs) -> one IC head per IC, each of the study's head kind with `outputs` outputs
MakeICs = Callable[[int], list[nn.Module]]
# (the net, test logits [E, N, C]) -> (each point's value [T], its `threshold` column; the exit every sample takes
# at each point [T, N]); the evaluation maths gives each point its FLOPs, accuracy and ECE
CurveFn = Callable[[ExitNet, Tensor], tuple[np.ndarray, np.ndarray]]
# (the net, IC `ic`'s logits [N, C], ic, a point's value) -> which samples leave there [N] bool: the same
# rule as the curve's, for dynamic inference (stages.core.inference), which has no later exit yet
LeaveFn = Callable[[ExitNet, Tensor, int, float], Tensor]


@dataclass(frozen=True)
class MethodCurve:
    """A curve of a method's own, evaluated beside the criteria's and reported like one."""

    name: str  # its `criterion` in curve.parquet, budgets.parquet and calibration.parquet; never a criterion's name
    compute: CurveFn
    leaves: LeaveFn
    # its source bins ECE by equal mass (JEI-DNN's code): the curve also gets `ece_equal_mass`
    # (stages.core.evaluation.equal_mass_calibration_error) beside the house's equal-width `ece`
    equal_mass_ece: bool = False


@dataclass(frozen=True)
class MethodParts:
    """What a method adds to a multi-exit net. The net holds each module of its own as `net.<name>`
    (its parameters under `<name>.*` in the state dict): `trained` ones before the ICs, `fitted` ones after."""

    ics: list[nn.Module]  # the IC heads, first to last
    trained: dict[str, nn.Module] = field(default_factory=dict)  # trained with the ICs, in P2 and P3
    fitted: dict[str, nn.Module] = field(default_factory=dict)  # trained by no phase; the method's `finish` fits them


def each_exit_alone(logits: Sequence[Tensor], target: Tensor, loss_fn: LossFn) -> list[Tensor]:
    """Every exit's loss against the labels (SDN's): the phase weights and sums them."""
    return [loss_fn(z, target) for z in logits]


def depth_weights(num_exits: int) -> Tensor:
    """PABEE's and GPF's exit weights: exit j (1-based) weighs j, scaled to a mean of 1 (j E / sum(1..E)).

    With the phase's mean reduction (sum_k w_k L_k / E) the loss is then sum_j j L_j / sum_j j, the
    depth-weighted average both sources train with: PABEE's code (Zhou et al. 2020) divides
    sum_j j L_j by sum_j j; GPF's, in the paper's code (its `methods/early_exit.py`), by E (E + 1) / 2.
    """
    j = torch.arange(1, num_exits + 1, dtype=torch.float32)
    return j * num_exits / j.sum()


class ExitMethod:
    """An early-exit method; every default is SDN's. Subclasses set `name` and override what they change."""

    name: ClassVar[str]  # `net.method` in a spec
    head: ClassVar[str | None] = None  # the IC head kind it defaults to; None: the backbone family's
    # exit k's logits are IC k's raw output alone: exit k runs no earlier IC, and combining costs nothing
    independent: ClassVar[bool] = True

    def __deepcopy__(self, memo: dict[int, Any]) -> ExitMethod:
        return self  # stateless: a copied net keeps the registered instance

    # --- what the method adds to the net

    def build(self, make_ics: MakeICs, num_exits: int, num_classes: int) -> MethodParts:
        """The IC heads and the method's own modules; `make_ics(outputs)` builds the study's heads.
        Modules are built in the order their initial weights draw from the RNG."""
        return MethodParts(make_ics(num_classes))

    def ic_forward(self, net: ExitNet, ic: int, h: Tensor, raw: Sequence[Tensor]) -> Tensor:
        """IC `ic`'s raw output on its block's features `h`; `raw` holds ICs 0..ic-1's raw outputs."""
        return net.ics[ic](h)

    def combine(self, net: ExitNet, raw: Sequence[Tensor]) -> Tensor:
        """Exit k's logits from the raw outputs of exits 0..k (the final head's last when k is the final exit)."""
        return raw[-1]

    def exit_logits(self, net: ExitNet, raw: list[Tensor]) -> list[Tensor]:
        """Every exit's logits from every exit's raw output: what the net's forward returns."""
        if self.independent:
            return raw
        return [self.combine(net, raw[: k + 1]) for k in range(len(raw))]

    # --- its loss

    def losses(self, logits: Sequence[Tensor], target: Tensor, loss_fn: LossFn) -> list[Tensor]:
        """Each exit's training loss; the phase decides which exits count and weights them
        (`stages.core.regimes.phase_loss`)."""
        return each_exit_alone(logits, target, loss_fn)

    def loss_weights(self, num_exits: int) -> Tensor:
        """The method's own weights on its exits' losses ([E], mean 1), multiplied into the phase's
        `loss_weighting` in P2 and P3 (P1 trains the plain backbone: unweighted)."""
        return torch.ones(num_exits)

    def aux_loss(self, net: ExitNet) -> Tensor | None:
        """A loss of the method's own, read from the net after each training forward (None: none this
        pass) and added, unweighted, to the loss of the phases that train the ICs."""
        return None

    def finish(self, net: ExitNet, batches: Iterable[tuple[Tensor, Tensor]],
               reduce_sum: Callable[[Tensor], Tensor]) -> str:
        """A step of the method's own once a phase that trained the ICs (P2, P3) has its best state: on
        that state, with the net's training batches and a sum over the DDP ranks; returns a line for the
        log. It fits the `fitted` modules. Runs only where a subclass overrides it (`finishes`)."""
        raise NotImplementedError(f"method {self.name!r} has no step of its own")

    @property
    def finishes(self) -> bool:
        """Whether the method has a step of its own at the end of the IC phases (it overrides `finish`)."""
        return type(self).finish is not ExitMethod.finish

    # --- its curve

    def curves(self) -> tuple[MethodCurve, ...]:
        """Curves of the method's own, evaluated beside the criteria's (none by default)."""
        return ()
