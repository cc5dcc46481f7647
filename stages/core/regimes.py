"""Training phases and regimes of multi-exit nets (paper section 2).

P1 trains the backbone (with its final classifier) on the final exit's loss; P2 trains
everything on a weighted combination of every exit's loss; P3 freezes the backbone (parameters
*and* BatchNorm statistics) and trains the internal classifiers (ICs) alone. A regime is the
sequence of phases it runs: joint = P2, disjoint = P1 then P3, mixed = P1 then P2.

The combination is the paper's Eq. 2 with the weights of its code (`phase_objective`): by default
(`loss_reduction: mean`) the weighted sum over exits divided by the number of exits E, in P3 as
well, where the frozen final exit drops out of the sum but not out of E; docs/methods.md states
every weighting's formula with its source.
"""

from __future__ import annotations

import logging
from typing import Callable, Literal, get_args

import torch
from torch import Tensor, nn

from exitflow.stages.core.nets.exit_method import ExitLosses, ExitMethod, each_exit_alone
from exitflow.stages.core.phase_config import LossReduction, LossWeighting

logger = logging.getLogger(__name__)

Phase = Literal["P1", "P2", "P3"]
Regime = Literal["joint", "disjoint", "mixed"]

PHASES: tuple[Phase, ...] = get_args(Phase)
REGIME_PHASES: dict[str, tuple[Phase, ...]] = {
    "joint": ("P2",),
    "disjoint": ("P1", "P3"),
    "mixed": ("P1", "P2"),
}

# Kaya et al. 2019 (SDN): IC k's weight grows linearly from 0.01 to a cap equal to the IC's
# relative depth; their six ICs sit at 15%..90% of the net, hence caps 0.15..0.9.
KAYA_START = 0.01
KAYA_MAX_CAP = 0.9
# Han et al. 2022 (the paper's Fig. 15): constant weights linear in depth from 0.6 to 1.4 (mean 1),
# rising ("han") or falling ("han_decreasing") along the net.
HAN_FIRST, HAN_LAST = 0.6, 1.4


def unwrap(net: nn.Module) -> nn.Module:
    """The bare net inside DDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        if isinstance(net, nn.parallel.DistributedDataParallel | nn.DataParallel):
            net = net.module
        elif hasattr(net, "_orig_mod") and isinstance(net._orig_mod, nn.Module):
            net = net._orig_mod
        else:
            return net


def check_phase(phase: str) -> Phase:
    """`phase` itself if it is a known phase; a ValueError naming the known ones otherwise."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; known: {list(PHASES)}")
    return phase  # type: ignore[return-value]


def prepare_phase(net: nn.Module, phase: Phase) -> list[nn.Parameter]:
    """Set `requires_grad` for `phase` and return the trainable parameters, in module order.

    P1: backbone only; P2: backbone and ICs; P3: ICs only (the method's modules that train with the
    ICs, GPF's `net.aggregator`, count as the ICs': `net.ic_modules()`). The method's other modules
    (`net.method_modules()`: ZTW's `net.ensemble`, JEI-DNN's `net.gates`) are trained by no phase: its
    step of its own fits them on the frozen net (`ExitMethod.finish`). Call it before any DDP wrap: DDP registers the parameters that require
    grad at construction, and a frozen parameter it registered would stall its gradient
    all-reduce. A wrapped net is accepted (unwrapped).
    """
    check_phase(phase)
    model = unwrap(net)
    backbone, ics = model.backbone, model.ic_modules()
    own = list(model.method_modules().values())
    grouped = {id(p) for m in (backbone, *ics, *own) for p in m.parameters()}
    stray = [name for name, p in model.named_parameters() if id(p) not in grouped]
    if stray:
        # A parameter in no group has no phase semantics; refuse rather than guess.
        raise ValueError(f"parameters outside net.backbone, net.ics and the method's modules "
                         f"({', '.join(f'net.{n}' for n in model.own_modules()) or 'none'}): {stray}")
    backbone.requires_grad_(phase in ("P1", "P2"))
    for module in ics:
        module.requires_grad_(phase in ("P2", "P3"))
    for module in own:
        module.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    logger.debug("phase %s: %d trainable tensors, %d values", phase, len(params), sum(p.numel() for p in params))
    return params


def set_train_mode(net: nn.Module, phase: Phase) -> None:
    """Train mode for `phase`; in P3 the frozen backbone stays in eval mode.

    Eval mode keeps BatchNorm from updating its running statistics (requires_grad does not
    cover buffers) and turns dropout off, so P3 sees exactly the backbone P1 produced.
    """
    check_phase(phase)
    net.train()
    if phase == "P3":
        unwrap(net).backbone.eval()


def exit_weights(kind: LossWeighting, num_exits: int, progress: float = 1.0, method: ExitMethod | None = None) -> Tensor:
    """Per-exit loss weights (float32, final exit last): the phase's `kind`, times the early-exit
    method's own (`ExitMethod.loss_weights`: 1 but for PABEE's and GPF's depth weights, `depth_weights`).

    - "uniform", "gradient_equilibrium", "l2w": all 1 (gradient equilibrium rescales gradients in
      the net instead, see `MultiExitNet.set_gradient_equilibrium`; L2W weighs each sample's
      losses on top of these, see `stages.core.l2w`).
    - "han" (Han et al. 2022): constant, linear in depth from 0.6 (first exit) to 1.4 (last);
      "han_decreasing": from 1.4 down to 0.6 (the paper's Fig. 15 tries both directions).
    - "kaya" (Kaya et al. 2019, SDN): the final exit weighs 1; IC k of K ICs (0-based) weighs
      min(cap_k, 0.01 + progress * cap_k) with cap_k = 0.9 * (k + 1) / K, i.e. the SDN
      schedule with caps at the ICs' relative positions. `progress` in [0, 1] is the fraction
      of the ramp done (SDN: epoch / epochs, 1-based epoch); the other kinds ignore it.
    """
    weights = _kind_weights(kind, num_exits, progress)
    return weights if method is None else weights * method.loss_weights(num_exits)


def _kind_weights(kind: LossWeighting, num_exits: int, progress: float) -> Tensor:
    if num_exits < 1:
        raise ValueError(f"num_exits must be >= 1, got {num_exits}")
    if kind in ("uniform", "gradient_equilibrium", "l2w"):
        return torch.ones(num_exits)
    if kind in ("han", "han_decreasing"):
        if num_exits == 1:
            return torch.ones(1)
        rising = torch.linspace(HAN_FIRST, HAN_LAST, num_exits)
        return rising if kind == "han" else rising.flip(0)
    if kind == "kaya":
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must lie in [0, 1], got {progress}")
        num_ics = num_exits - 1
        caps = KAYA_MAX_CAP * torch.arange(1, num_ics + 1, dtype=torch.float64) / max(num_ics, 1)
        ics = torch.minimum(caps, KAYA_START + progress * caps)
        return torch.cat([ics, torch.ones(1, dtype=torch.float64)]).float()
    raise ValueError(f"unknown loss weighting {kind!r}; known: {list(get_args(LossWeighting))}")


def phase_loss(
    logits: list[Tensor],
    target: Tensor,
    phase: Phase,
    weights: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    exit_losses: ExitLosses = each_exit_alone,
    sample_weights: Callable[[Tensor], Tensor] | None = None,
    reduction: LossReduction = "mean",
) -> tuple[Tensor, Tensor]:
    """The phase's training loss and every exit's loss (detached, for logging).

    `exit_losses` is the net's early-exit method's (`ExitMethod.losses`): each exit's loss.
    The phase's loss is `phase_objective` of them. With `sample_weights` (L2W's: per-sample
    losses [B, E] -> weights [B, E]), `loss_fn` gives per-sample losses and loss_k is the mean of
    each sample's loss times its weight at exit k.
    """
    check_phase(phase)
    if len(logits) != weights.numel():
        raise ValueError(f"{len(logits)} exits but {weights.numel()} weights")
    losses = exit_losses(logits, target, loss_fn)
    if sample_weights is not None:
        w = sample_weights(torch.stack([l.detach() for l in losses], dim=1))
        weighted = per_sample_weighted(losses, w)
        losses = [l.mean() for l in losses]
    else:
        weighted = losses
    per_exit = torch.stack([l.detach() for l in losses])
    return phase_objective(weighted, phase, weights, reduction), per_exit


def per_sample_weighted(losses: list[Tensor], sample_weights: Tensor) -> list[Tensor]:
    """Each exit's per-sample losses [B] weighted by its column of `sample_weights` [B, E], averaged."""
    return [(l * sample_weights[:, k].to(l.dtype)).mean() for k, l in enumerate(losses)]


def phase_objective(losses: list[Tensor], phase: Phase, weights: Tensor, reduction: LossReduction = "mean") -> Tensor:
    """The phase's loss from every exit's (scalar) loss L_k, k = 1..E (the final exit last).

    P1: L_E alone. P2: sum_k w_k L_k over every exit. P3: the same sum over the ICs only (the
    final head belongs to the frozen backbone). `reduction` "mean" divides P2's and P3's sums by
    E, the number of exits, in P3 too (the paper's code averages over every output, the frozen
    final one included, so its P3 loss is sum_{k<E} L_k / E); "sum" leaves them undivided.
    """
    if reduction not in get_args(LossReduction):
        raise ValueError(f"unknown loss reduction {reduction!r}; known: {list(get_args(LossReduction))}")
    if phase == "P1":
        return losses[-1]
    # Build the sum only from the exits in the objective: a stack of all losses would
    # send zero gradients back through every excluded head.
    used = losses if phase == "P2" else losses[:-1]
    total = torch.stack(used).mul(weights[: len(used)].to(used[0].device)).sum()
    return total / len(losses) if reduction == "mean" else total
