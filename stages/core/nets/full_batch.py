"""Full-batch Adam on a method's own module over cached inputs, summed over DDP ranks.

ZTW's ensemble and JEI-DNN's gates are fitted this way on the frozen net: few parameters, every
cached sample in each step. Every rank holds its own shard; the loss and the gradient are summed
over ranks (`reduce_sum`) and divided by the global sample count, so every rank takes the same
steps from the same start.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def fit_full_batch(module: nn.Module, loss_fn: Callable[[], Tensor], steps: int, lr: float, count: float,
                   reduce_sum: Callable[[Tensor], Tensor]) -> tuple[float, float]:
    """`steps` Adam steps on `module`'s parameters against `loss_fn()` (this rank's summed loss);
    the module is frozen again afterwards. Returns the loss per sample before and after the fit."""
    params = list(module.parameters())
    module.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    try:
        for step in range(steps + 1):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn()
            if step == 0:
                before = reduce_sum(loss.detach().double()).item() / count
            if step == steps:  # the loss the fitted module ends with; no step after it
                after = reduce_sum(loss.detach().double()).item() / count
                break
            loss.backward()
            for p in params:
                p.grad = reduce_sum(p.grad) / count
            optimizer.step()
    finally:
        module.requires_grad_(False)
    return before, after
