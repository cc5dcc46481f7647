"""L2W (Han et al., ECCV 2022, *Learning to Weight Samples for Dynamic Early-exiting Networks*):
per-sample, per-exit loss weights predicted by a small network that is meta-learned so that training
serves the way samples exit at test time.

The weight prediction network (WPN) reads a sample's loss at every exit and gives one weight per
exit: `w = 1 + epsilon * (o - mean(o))`, `o = tanh(MLP(losses))`, the mean taken over the whole
batch x exits matrix (the paper's "mat" constraint: weights average 1). The phase's loss is then
`sum_k mean_b(w_bk L_bk)`. Every `meta_interval` batches the batch is cut in two halves, each used
once for training and once as meta data (the paper's exchange):

1. a look-ahead step: the net's trainable parameters after one step of the phase's own optimizer
   (its state, its learning rate) on the weighted loss of the training half, kept differentiable
   in the WPN's output;
2. the meta loss of the look-ahead net on the meta half, as samples would exit at test time: they
   are spread over the exits by a target distribution `q_k ∝ target_p^k` (k = 1..E), the most
   confident (max softmax) samples left at each exit taking its share, the last exit the rest;
   the sum over exits of their mean cross-entropy;
3. one Adam step of the WPN on that meta loss (its gradient averaged over DDP ranks; its lr is
   `meta_lr` times the phase's schedule factor at that step);
4. the real step of the net on the training half, weighted by the updated WPN (no gradient to it).

Hyper-parameters (the paper's CIFAR/ImageNet runs): epsilon 0.3, target_p 0.75 (its index 15 of
p/20), WPN one hidden layer of 500, meta Adam lr 1e-4 and weight decay 1e-4, a meta step every
batch. The look-ahead of Adam/AdamW keeps the second moment as a constant preconditioner (its
square root has no finite derivative where a gradient is 0); its first moment carries the WPN's
gradient, as SGD's momentum does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim import Optimizer

from exitflow.stages.core.nets.exit_method import ExitLosses
from exitflow.stages.core.phase_config import L2WSettings


class WeightPredictor(nn.Module):
    """Per-exit losses [B, E] -> tanh outputs [B, E] (the paper's one-hidden-layer MLP)."""

    def __init__(self, num_exits: int, hidden: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(num_exits, hidden)
        self.out = nn.Linear(hidden, num_exits)

    def forward(self, losses: Tensor) -> Tensor:
        return torch.tanh(self.out(torch.relu(self.hidden(losses))))


def centred_weights(raw: Tensor, epsilon: float) -> Tensor:
    """1 + epsilon * (raw - mean(raw)): weights in [1 - 2 eps, 1 + 2 eps] that average exactly 1."""
    return 1.0 + epsilon * (raw - raw.mean())


def exit_distribution(num_exits: int, target_p: float) -> Tensor:
    """The share of samples meant to leave at each exit: q_k ∝ target_p^k, k = 1..E."""
    k = torch.arange(1, num_exits + 1, dtype=torch.float64)
    q = torch.exp(math.log(target_p) * k)
    return (q / q.sum()).float()


def exit_assignment(logits: Sequence[Tensor], shares: Tensor) -> list[Tensor]:
    """Which samples leave at which exit when each exit k takes floor(n * shares[k]) of the samples
    still in the net, its most confident (max softmax) first; the last exit takes all the rest."""
    n = logits[0].shape[0]
    left = torch.ones(n, dtype=torch.bool, device=logits[0].device)
    chosen = []
    for k, z in enumerate(logits):
        if k == len(logits) - 1:
            idx = left.nonzero().flatten()
        else:
            confidence = F.softmax(z.detach().float(), dim=1).amax(dim=1).masked_fill(~left, -1.0)
            take = min(math.floor(n * float(shares[k])), int(left.sum()))
            idx = confidence.argsort(descending=True, stable=True)[:take]
        left[idx] = False
        chosen.append(idx)
    return chosen


def meta_loss(logits: Sequence[Tensor], target: Tensor, shares: Tensor) -> Tensor:
    """The sum over exits of the mean cross-entropy of the samples that exit there."""
    parts = [F.cross_entropy(z[idx], target[idx]) for z, idx in zip(logits, exit_assignment(logits, shares)) if idx.numel()]
    return torch.stack(parts).sum()


def lookahead(optimizer: Optimizer, params: dict[str, Tensor], grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """The parameters after one step of `optimizer` (SGD, Adam or AdamW, with its current state
    and hyper-parameters) with `grads`, differentiable in `grads`; the optimizer is not touched."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = {}
    for name, p in params.items():
        group, state, g = group_of[id(p)], optimizer.state.get(p, {}), grads[name]
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        if isinstance(optimizer, torch.optim.SGD):
            d = g + wd * p.detach() if wd else g
            momentum = float(group["momentum"])
            if momentum:
                buf = state.get("momentum_buffer")
                b = d if buf is None else momentum * buf + (1 - float(group["dampening"])) * d
                d = d + momentum * b if group["nesterov"] else b
            out[name] = p.detach() - lr * d
        elif isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            beta1, beta2 = group["betas"]
            decoupled = isinstance(optimizer, torch.optim.AdamW)
            base = p.detach() * (1 - lr * wd) if decoupled else p.detach()
            if wd and not decoupled:
                g = g + wd * p.detach()
            step = float(state["step"]) + 1 if "step" in state else 1.0
            m = beta1 * state["exp_avg"] + (1 - beta1) * g if "exp_avg" in state else (1 - beta1) * g
            v_prev = state["exp_avg_sq"] if "exp_avg_sq" in state else torch.zeros_like(p)
            v = beta2 * v_prev + (1 - beta2) * g.detach() ** 2
            denom = (v / (1 - beta2**step)).sqrt() + float(group["eps"])
            out[name] = base - lr * (m / (1 - beta1**step)) / denom
        else:
            raise ValueError(f"L2W's look-ahead step knows SGD, Adam and AdamW, not {type(optimizer).__name__}")
    return out


class L2W:
    """The WPN, its optimizer and the meta step of one phase (see the module docstring)."""

    def __init__(self, num_exits: int, settings: L2WSettings, device: torch.device) -> None:
        self.settings = settings
        self.wpn = WeightPredictor(num_exits, settings.hidden).to(device)
        self.optimizer = torch.optim.Adam(self.wpn.parameters(), lr=settings.meta_lr, weight_decay=settings.meta_weight_decay)
        self.shares = exit_distribution(num_exits, settings.target_p)
        self.last_meta_loss = float("nan")

    def weights(self, losses: Tensor) -> Tensor:
        """Per-sample, per-exit weights [B, E] for per-sample losses [B, E] (no gradient to the WPN)."""
        with torch.no_grad():
            return centred_weights(self.wpn(losses.detach().float()), self.settings.epsilon)

    def meta_step(self, model: nn.Module, optimizer: Optimizer, objective: Callable[[list[Tensor], Tensor], Tensor],
                  exit_losses: ExitLosses, loss_fn: Callable[[Tensor, Tensor], Tensor],
                  train: tuple[Tensor, Tensor], meta: tuple[Tensor, Tensor]) -> None:
        """Steps 1-3 of the module docstring: one Adam step of the WPN; `model` (unwrapped from DDP)
        and `optimizer` are left as they were.

        `objective(per-sample losses, weights [B, E]) -> loss` is the phase's weighted sum (which
        exits count, the method's exit weights); `exit_losses` the method's per-exit losses and
        `loss_fn` a per-sample loss."""
        params = dict(model.named_parameters())
        names = {id(p): n for n, p in params.items()}
        trained = {names[id(p)]: p for g in optimizer.param_groups for p in g["params"]}
        # Buffers travel as copies: the look-ahead's forwards must not move BatchNorm's running stats.
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        x, y = train
        losses = exit_losses(functional_call(model, {**params, **buffers}, (x,)), y, loss_fn)
        raw = self.wpn(torch.stack([l.detach() for l in losses], dim=1).float())
        loss = objective(losses, centred_weights(raw, self.settings.epsilon))
        grads = torch.autograd.grad(loss, list(trained.values()), create_graph=True, allow_unused=True)
        ahead = lookahead(optimizer, trained, {n: g if g is not None else torch.zeros_like(p)
                                               for (n, p), g in zip(trained.items(), grads)})
        x_meta, y_meta = meta
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        logits = functional_call(model, {**params, **ahead, **buffers}, (x_meta,))
        value = meta_loss(logits, y_meta, self.shares)
        wpn_params = list(self.wpn.parameters())
        for p, g in zip(wpn_params, torch.autograd.grad(value, wpn_params, allow_unused=True)):
            p.grad = torch.zeros_like(p) if g is None else g.detach()
        if dist.is_available() and dist.is_initialized():
            for p in wpn_params:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        # The meta lr follows the phase's schedule (the paper decays it with the net's cosine lr).
        group = optimizer.param_groups[0]
        factor = float(group["lr"]) / float(group.get("initial_lr", group["lr"]))
        for g in self.optimizer.param_groups:
            g["lr"] = self.settings.meta_lr * factor
        self.optimizer.step()
        self.last_meta_loss = float(value.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"wpn": self.wpn.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wpn.load_state_dict(state["wpn"])
        self.optimizer.load_state_dict(state["optimizer"])
