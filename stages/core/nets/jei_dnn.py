"""JEI-DNN (Regol, Chataoui, Coates, ICLR 2024): learned exit gates trained on cost-aware binary targets.

- **Gates.** Gate k reads four uncertainty statistics of IC k's softmax p (its output detached):
  the top probability, the entropy, the margin between the two top probabilities and the entropy
  of the powered softmax p^2 / sum(p^2) (sharper than p: it separates confident samples that the
  plain entropy lumps together), standardized, and gives g_k = sigmoid(w_k . phi + b_k), the
  probability that a sample leaves at IC k. A sample leaves at the first IC whose gate says yes
  (g_k > 1/2), else at the final exit.
- **Targets** (the paper's section 4.1). Leaving at exit l costs C_l = CE_l + lambda * F_l / F_E,
  the exit's cross-entropy on the sample plus lambda times the exit's share of the whole net's
  FLOPs; l* = argmin_l C_l (the first on a tie). Gate k's target is 1 when k >= l* (leave at l*,
  and leave at once past it), else 0. Each gate's loss is the plain binary cross-entropy. (The
  authors' code weights a gate's positives by its negatives / positives; that balances away the
  prior that lambda sets: on digits the share of samples leaving at an IC went from 94% at
  lambda = 0 to 92% at lambda = 4, a flat curve, where unweighted it goes from 91% to 100% and
  the mean cost from 0.73x to 0.26x of the full net's.)
- **lambda** trades accuracy for cost: one set of gates per value of `LAMBDAS`, all fitted at once.
  The method's curve ("gates" in curve.parquet) has one point per lambda (`gate_points` gives each
  sample's exit), on the same FLOPs-accuracy axes as the thresholded criteria, with its ECE.
- **ECE as the authors bin it**: the house ECE has 15 equal-width bins; the authors' code
  (networkslab/dynn) bins the taken exit's top softmax probability into 15 equal-mass bins
  (quantile edges) instead. The gates curve carries both (`ece`, and `ece_equal_mass` from
  `stages.core.evaluation.equal_mass_calibration_error`, `MethodCurve.equal_mass_ece`).

What differs from the paper, and why: there the ICs and gates train together (the IC losses
weighted by the gates' exit probabilities) on a frozen backbone, after a warm-up of the ICs. In
exitflow the ICs are trained by the study's regime, which is what a study compares; the gates are
fitted as the method's own step on the frozen net once a phase that trained the ICs (P2, P3) has
its best state, on the training split (`fit_gates`): the paper's gate step, with the ICs as the
regime left them. No phase trains the gates' parameters.

Of the rest of exitflow this imports only the method protocol and the full-batch fit, never the
evaluation maths (the training code imports this module: that maths stays out of its fingerprint);
`stages.core.nets.methods` registers `JEIDNN`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exitflow.stages.core.nets.exit_method import ExitMethod, ExitNet, MakeICs, MethodCurve, MethodParts
from exitflow.stages.core.nets.full_batch import fit_full_batch

# lambda = 0 sends each sample to its most accurate exit; at 4 the full net's cost outweighs any
# cross-entropy gap a trained net shows, and nearly every sample leaves at the first IC.
LAMBDAS: tuple[float, ...] = (0.0, *(float(v) for v in np.geomspace(0.01, 4.0, 15)))
NUM_FEATURES = 4
GATE_STEPS = 300  # full-batch Adam steps: a gate has 5 parameters
GATE_LR = 0.05
MAX_CACHED_SAMPLES = 2**20  # per DDP rank: features and per-exit losses are a few floats per sample


def gate_features(logits: Tensor) -> Tensor:
    """Uncertainty statistics of a softmax: [..., C] logits -> [..., 4] float32 (top probability,
    entropy, top-two margin, entropy of the powered softmax p^2 / sum(p^2))."""
    z = logits.detach().float()
    logp = F.log_softmax(z, dim=-1)
    p = logp.exp()
    top2 = p.topk(2, dim=-1).values
    logp2 = F.log_softmax(2.0 * z, dim=-1)  # log(p^2 / sum p^2)
    return torch.stack([top2[..., 0], -(p * logp).sum(-1), top2[..., 0] - top2[..., 1], -(logp2.exp() * logp2).sum(-1)],
                       dim=-1)


class ExitGates(nn.Module):
    """One gate per IC for each lambda: gate logits [L, ICs, N] from features [N, ICs, 4].

    The features are standardized with the training cache's mean and std (buffers set by
    `fit_gates`), which keeps full-batch Adam well conditioned whatever the number of classes.
    """

    def __init__(self, num_exits: int, num_classes: int) -> None:
        super().__init__()
        ics = num_exits - 1
        self.register_buffer("lambdas", torch.tensor(LAMBDAS, dtype=torch.float32))
        self.register_buffer("feature_mean", torch.zeros(ics, NUM_FEATURES))
        self.register_buffer("feature_std", torch.ones(ics, NUM_FEATURES))
        self.weight = nn.Parameter(torch.zeros(len(LAMBDAS), ics, NUM_FEATURES))
        self.bias = nn.Parameter(torch.zeros(len(LAMBDAS), ics))

    def forward(self, features: Tensor) -> Tensor:
        z = (features - self.feature_mean) / self.feature_std
        return torch.einsum("nkf,lkf->lkn", z, self.weight) + self.bias[:, :, None]

    def at_ic(self, features: Tensor, ic: int, lam: int) -> Tensor:
        """Gate `ic`'s logits [N] under lambda number `lam`, from that IC's features [N, 4] alone
        (what dynamic inference has when a sample reaches IC `ic`)."""
        z = (features - self.feature_mean[ic]) / self.feature_std[ic]
        return z @ self.weight[lam, ic] + self.bias[lam, ic]


def gate_targets(losses: Tensor, cost: Tensor, lambdas: Tensor) -> tuple[Tensor, Tensor]:
    """(l* [L, N], targets [L, E - 1, N] in {0, 1}) from every exit's loss [E, N] on each sample,
    the exits' relative costs [E] and the lambdas [L]: see the module docstring."""
    level = losses[None] + lambdas[:, None, None] * cost[None, :, None]  # [L, E, N]
    best = level.argmin(dim=1)  # torch returns the first minimum on a tie
    ics = torch.arange(losses.shape[0] - 1, device=losses.device)
    return best, (ics[None, :, None] >= best[:, None, :]).to(losses.dtype)


def gate_exits(gate_logits: Tensor) -> Tensor:
    """The exit every sample takes under each gate set: [L, ICs, N] logits -> [L, N] in [0, ICs]
    (the first IC whose gate probability is above 1/2; ICs = the final exit when none is)."""
    leave = gate_logits > 0
    ics = gate_logits.shape[1]
    return torch.where(leave.any(dim=1), leave.to(torch.int64).argmax(dim=1), torch.full_like(leave[:, 0], ics, dtype=torch.int64))


def relative_costs(model: Any) -> Tensor:
    """Every exit's FLOPs over the final exit's: [E] float32, on the model's device."""
    from exitflow.stages.core.flops import exit_flops  # fvcore's import is costly: only when gates are fitted

    flops = torch.tensor(exit_flops(model), dtype=torch.float64)
    return (flops / flops[-1]).float().to(next(model.parameters()).device)


def _cache(model: Any, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The ICs' gate features [N, ICs, 4] and every exit's cross-entropy [E, N] on the training samples."""
    features, losses, n = [], [], 0
    with torch.no_grad():
        for x, y in batches:
            raw = model.raw_exits(x)
            features.append(gate_features(torch.stack(raw[:-1], dim=1)))
            losses.append(torch.stack([F.cross_entropy(r.float(), y, reduction="none") for r in raw]))
            n += y.shape[0]
            if n >= MAX_CACHED_SAMPLES:
                break
    if not features:
        raise ValueError("jei_dnn: the training loader yielded no samples to fit the gates on")
    return torch.cat(features)[:MAX_CACHED_SAMPLES], torch.cat(losses, dim=1)[:, :MAX_CACHED_SAMPLES]


def fit_gates(model: Any, batches: Iterable[tuple[Tensor, Tensor]], reduce_sum: Callable[[Tensor], Tensor]) -> str:
    """Fit `model.gates` on the frozen net (eval mode), every lambda at once.

    Every DDP rank caches its own shard; the feature statistics, the sample count and the
    gradient are summed over ranks (`reduce_sum`), so every rank takes the same steps.
    """
    gates: ExitGates = model.gates
    model.eval()
    no_autocast = torch.autocast(gates.lambdas.device.type, enabled=False)  # costs and the fit in float32
    with no_autocast:
        cost = relative_costs(model)
    features, losses = _cache(model, batches)  # the net's pass as the phase ran it (bf16 or not)
    with no_autocast:
        features, losses = features.float(), losses.float()
        count = reduce_sum(torch.tensor(float(features.shape[0]), dtype=torch.float64, device=features.device)).item()
        mean = reduce_sum(features.double().sum(0)) / count
        var = reduce_sum(((features.double() - mean) ** 2).sum(0)) / count
        gates.feature_mean.copy_(mean.float())
        gates.feature_std.copy_(var.sqrt().clamp_min(1e-6).float())
        _, targets = gate_targets(losses, cost, gates.lambdas)
        before, after = fit_full_batch(
            gates, lambda: F.binary_cross_entropy_with_logits(gates(features), targets, reduction="sum"), GATE_STEPS, GATE_LR,
            count, reduce_sum)
        early = (gate_exits(gates(features)) < features.shape[1]).double().mean(dim=1)  # [L] share leaving at an IC
    shares = ", ".join(f"{lam:g}: {share:.0%}" for lam, share in zip(LAMBDAS[:: 5], early[:: 5].tolist()))
    return (f"jei_dnn gates fitted on {int(count)} training samples for {len(LAMBDAS)} values of lambda: BCE "
            f"{before:.4f} -> {after:.4f} per sample; share leaving at an IC (this rank) by lambda {shares}")


def gate_points(net: Any, logits: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The gates' curve from cached test logits [E, N, C]: (the lambdas [L], the exit every sample
    takes under each lambda's gates [L, N]); the evaluation maths turns them into curve points."""
    gates: ExitGates = net.gates
    with torch.no_grad():
        exits = gate_exits(gates(gate_features(logits[:-1].transpose(0, 1)).to(gates.lambdas.device)))
    return gates.lambdas.double().cpu().numpy(), exits.cpu().numpy()


def gate_leaves(net: Any, logits: Tensor, ic: int, point: float) -> Tensor:
    """Dynamic inference's exit rule: which samples leave at IC `ic` [N] bool, from that IC's logits
    [N, C], under the gates of lambda `point` (one of `net.gates.lambdas`, as the curve lists them)."""
    gates: ExitGates = net.gates
    found = (gates.lambdas.double().cpu() == float(point)).nonzero()
    if found.numel() == 0:
        raise ValueError(f"jei_dnn: no gates for lambda {point!r}; fitted for {[round(v, 6) for v in gates.lambdas.tolist()]}")
    return gates.at_ic(gate_features(logits).to(gates.lambdas.device), ic, int(found[0])) > 0


# one point per lambda; ECE also binned by equal mass, as the authors' code bins it
GATES_CURVE = MethodCurve("gates", gate_points, gate_leaves, equal_mass_ece=True)


class JEIDNN(ExitMethod):
    """Independent ICs (as SDN's) and learned exit gates (`net.gates`, trained by no phase), one set per
    cost trade-off lambda, fitted on the frozen net once the ICs are trained; its curve sweeps lambda."""

    name = "jei_dnn"

    def build(self, make_ics: MakeICs, num_exits: int, num_classes: int) -> MethodParts:
        return MethodParts(make_ics(num_classes), fitted={"gates": ExitGates(num_exits, num_classes)})

    def finish(self, net: ExitNet, batches: Iterable[tuple[Tensor, Tensor]],
               reduce_sum: Callable[[Tensor], Tensor]) -> str:
        return fit_gates(net, batches, reduce_sum)

    def curves(self) -> tuple[MethodCurve, ...]:
        return (GATES_CURVE,)
