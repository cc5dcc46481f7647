"""GPF (Liao et al., NAACL 2021, "A global past-future early exit method"): each IC decides from
an aggregate of the states of every IC before it (the past), its own, and imitations of the ICs
after it (the future).

- **States.** IC k is a head that maps its block's features to a hidden state s_k of
  `STATE_WIDTH` units (the study's head kind, with `STATE_WIDTH` outputs, then a ReLU), not to
  logits. The final exit is the backbone's own head: P1 trains the plain backbone whatever the method.
- **Future.** For every later IC j > k, an imitator (one per j: Linear + ReLU, shared by every
  earlier IC) predicts s_j from s_k: f_kj = imitator_j(s_k).
- **Aggregation** (exit k's logits, k < number of ICs). Each slot i has a projection to the classes,
  P_i(s) = W_i s + b_i. past = sum_{i<=k} P_i(s_i) with the earlier states s_i, i < k, detached
  (an IC does not train the ICs before it); future = sum_{j>k} P_j(f_kj) (zero at the last IC).
  A per-class balance a = sigmoid(B(relu(mean_{i<=k} G_i(s_i)))), with G_i a second projection
  per slot and B one Linear over the classes, mixes them: logits_k = a * past + (1 - a) * future.
  This is the authors' implementation (their BERT code, and the one of the paper exitflow follows),
  which sums projected states where the paper's text describes attention over them.
- **Imitation loss** (the method's auxiliary loss): for each IC k but the last, the mean cosine
  distance 1 - cos(f_kj, s_j) over every later j and sample, the real s_j detached, averaged over
  those ICs. It is added, unweighted, to the loss of the phases that train the ICs (P2, P3):
  it trains IC k's head and the imitators, never the states it imitates.
- **Loss.** As the paper's code forms it: the exits' losses averaged with depth weights,
  sum_j j L_j / sum_j j (`exit_method.depth_weights` with the phase's mean reduction), plus the
  imitation loss.

The aggregator's parameters live under `net.aggregator` and train with the ICs (P2, P3).
Of the rest of exitflow this imports only the method protocol; `stages.core.nets.methods` registers `GPF`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exitflow.stages.core.nets.exit_method import ExitMethod, ExitNet, MakeICs, MethodParts, depth_weights

STATE_WIDTH = 128  # the ICs' hidden state; the authors' code makes it a setting (head_dim)


class StateHead(nn.Module):
    """An IC head giving a hidden state: the head (with `STATE_WIDTH` outputs) then a ReLU."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, h: Tensor) -> Tensor:
        return F.relu(self.head(h))


def _projections(slots: int, width: int, classes: int) -> tuple[nn.Parameter, nn.Parameter]:
    """One linear map to the classes per slot, [slots, classes, width] and [slots, classes], as in the authors' code."""
    weight = nn.Parameter(torch.randn(slots, classes, width) / math.sqrt(width))
    return weight, nn.Parameter(torch.zeros(slots, classes))


class PastFutureAggregator(nn.Module):
    """Exit k's logits from the states of ICs 0..k (see the module docstring); the final exit's
    raw output (the backbone's logits) passes through unchanged."""

    def __init__(self, num_exits: int, num_classes: int, width: int = STATE_WIDTH) -> None:
        super().__init__()
        if num_exits < 2:
            raise ValueError(f"GPF needs at least one IC, got {num_exits} exit(s)")
        self.num_ics = num_exits - 1
        self.state_width = width
        # imitators[j - 1] predicts IC j's state (j >= 1): no IC comes before IC 0 to predict it
        self.imitators = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(self.num_ics - 1))
        self.project_weight, self.project_bias = _projections(self.num_ics, width, num_classes)
        self.gate_weight, self.gate_bias = _projections(self.num_ics, width, num_classes)
        self.balance = nn.Linear(num_classes, num_classes)
        self._imitation: Tensor | None = None

    def wrap_head(self, head: nn.Module) -> nn.Module:
        return StateHead(head)

    def _project(self, slot: int, s: Tensor) -> Tensor:
        return F.linear(s, self.project_weight[slot], self.project_bias[slot])

    def futures(self, state: Tensor, k: int) -> list[Tensor]:
        """IC k's imitations of the states of ICs k + 1 .. last."""
        return [self.imitators[j - 1](state) for j in range(k + 1, self.num_ics)]

    def forward(self, raw: Sequence[Tensor]) -> Tensor:
        if len(raw) == self.num_ics + 1:  # the final exit: the backbone's head alone
            if self.training and torch.is_grad_enabled():  # a training pass: keep the imitation loss for the phase
                self._imitation = self.imitation_loss(raw[:-1])
            return raw[-1]
        k = len(raw) - 1
        states = [s.detach() for s in raw[:k]] + [raw[k]]
        past = torch.stack([self._project(i, s) for i, s in enumerate(states)]).sum(0)
        gate = torch.stack([F.linear(s, self.gate_weight[i], self.gate_bias[i]) for i, s in enumerate(states)]).mean(0)
        a = torch.sigmoid(self.balance(F.relu(gate)))
        ahead = self.futures(raw[k], k)
        if not ahead:  # the last IC has no future: its balance scales the past alone, as in the authors' code
            return a * past
        future = torch.stack([self._project(j, f) for j, f in zip(range(k + 1, self.num_ics), ahead)]).sum(0)
        return a * past + (1 - a) * future

    def imitation_loss(self, states: Sequence[Tensor]) -> Tensor:
        """Mean over ICs k < last of the mean cosine distance between IC k's imitations and the real
        (detached) states of the ICs after it."""
        if self.num_ics < 2:
            return states[0].new_zeros(())
        per_ic = []
        for k in range(self.num_ics - 1):
            guesses = torch.cat(self.futures(states[k], k))
            real = torch.cat([s.detach() for s in states[k + 1:]])
            wide = torch.promote_types(guesses.dtype, torch.float32)  # bf16 under autocast: the sums in float32
            per_ic.append((1 - F.cosine_similarity(guesses.to(wide), real.to(wide), dim=-1)).mean())
        return torch.stack(per_ic).mean()

    def take_imitation_loss(self) -> Tensor | None:
        """The imitation loss of the last training pass, once (None when there was none)."""
        loss, self._imitation = self._imitation, None
        return loss


def imitation_loss(net: ExitNet) -> Tensor | None:
    """The method's auxiliary loss after a training forward of `net` (a MultiExitNet with GPF's aggregator)."""
    return net.aggregator.take_imitation_loss()


class GPF(ExitMethod):
    """ICs give hidden states; the aggregator (`net.aggregator`, trained with the ICs) forms every IC
    exit's logits from them; the depth-weighted loss plus the imitation loss."""

    name = "gpf"
    independent = False  # exit k aggregates the states of ICs 0..k

    def build(self, make_ics: MakeICs, num_exits: int, num_classes: int) -> MethodParts:
        aggregator = PastFutureAggregator(num_exits, num_classes)  # first: the heads draw their weights after it
        heads = [aggregator.wrap_head(h) for h in make_ics(aggregator.state_width)]
        return MethodParts(heads, trained={"aggregator": aggregator})

    def combine(self, net: ExitNet, raw: Sequence[Tensor]) -> Tensor:
        return net.aggregator(raw)

    def loss_weights(self, num_exits: int) -> Tensor:
        return depth_weights(num_exits)  # the paper's code: sum_i (i + 1) L_i / (E (E + 1) / 2)

    def aux_loss(self, net: ExitNet) -> Tensor | None:
        return imitation_loss(net)
