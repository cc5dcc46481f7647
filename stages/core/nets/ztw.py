"""Zero Time Waste (Wołczyk et al., NeurIPS 2021): internal classifiers that reuse their predecessors' answers.

Two parts, registered together as the method `ztw` (`stages.core.nets.methods`):

- **Cascading connections.** IC k > 0 reads, besides its block's features, the output logits of
  IC k - 1, detached (no gradient flows back into an earlier IC through the connection), then
  layer-normalized over the classes by a LayerNorm of the IC's own (learned scale and shift), as
  the authors' code does ("from ZTW appendix"; `ZTWCascading` with `layer_norm=True,
  detach=True`). A linear map of the normalized logits is added to the IC's own output, which is
  the same as appending them to the input of the head's last linear layer (every IC head ends in
  one). The final exit is the backbone's own head: P1 trains the plain backbone whatever the method.
- **Geometric ensembling.** IC m answers with q_m ∝ exp(beta_m) * prod_{i<=m} p_i ** w_mi, where
  p_i is the softmax of IC i's output and w_mi = exp(omega_mi) >= 0: the paper's
  prod_i (b_i p_i) ** w_i, whose per-class factors fold into the one vector beta_m. The weights
  start at 1 (the plain product of the ICs' probabilities) and beta at 0. They are fitted as a step
  of their own once a phase that trains the ICs (P2, P3) has its best state, on the frozen net:
  the summed negative log-likelihood of every IC's ensemble on the training split, by full-batch
  Adam on the ICs' cached log-probabilities (`fit_ensemble`).

Of the rest of exitflow this imports only the method protocol and the full-batch fit;
`stages.core.nets.methods` registers `ZTW`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exitflow.stages.core.nets.exit_method import ExitMethod, ExitNet, MakeICs, MethodParts
from exitflow.stages.core.nets.full_batch import fit_full_batch

ENSEMBLE_STEPS = 300  # full-batch Adam steps: the ensemble has (E - 1) * (E + C) parameters
ENSEMBLE_LR = 0.05
# The ICs' log-probabilities cached per DDP rank, in floats (256 MiB): up to 2**26 / (ICs x classes)
# training samples, all of CIFAR's, ~9,000 of ImageNet's with seven ICs: plenty for that few parameters.
MAX_CACHED_FLOATS = 2**26


class CascadeHead(nn.Module):
    """An IC head that also reads the previous IC's output logits (detached), layer-normalized over
    the classes, through a linear map: head(h) + cascade(norm(previous.detach()))."""

    def __init__(self, head: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.head = head
        # the earlier IC's logits grow as it trains: normalized, the map reads a steady scale. Its
        # affine parameters belong to this IC (the detach comes first, so they train with it).
        self.norm = nn.LayerNorm(num_classes)
        # PyTorch's default init: the same as the extra inputs of a widened last layer
        self.cascade = nn.Linear(num_classes, num_classes, bias=False)

    def forward(self, h: Tensor, previous: Tensor) -> Tensor:
        return self.head(h) + self.cascade(self.norm(previous.detach()))


def log_probs_of(raw: Sequence[Tensor]) -> Tensor:
    """The ICs' raw outputs [B, C] each -> their log-probabilities [B, ICs, C], in float32."""
    return torch.stack([F.log_softmax(r.float(), dim=-1) for r in raw], dim=1)


class GeometricEnsemble(nn.Module):
    """Exit m's logits from the raw outputs of exits 0..m: the weighted geometric ensemble of the ICs
    (see the module docstring); the final exit (m = E - 1) is the backbone's head alone."""

    def __init__(self, num_exits: int, num_classes: int) -> None:
        super().__init__()
        self.num_exits = num_exits
        ics = num_exits - 1
        self.log_weights = nn.Parameter(torch.zeros(ics, ics))  # [m, i]: omega_mi, read for i <= m only
        self.bias = nn.Parameter(torch.zeros(ics, num_classes))  # [m]: beta_m

    def forward(self, raw: Sequence[Tensor]) -> Tensor:
        if len(raw) == self.num_exits:
            return raw[-1]
        return self.mix(log_probs_of(raw))

    def mix(self, log_probs: Tensor) -> Tensor:
        """IC m's ensemble logits (log q_m up to a constant) from log_probs [B, m + 1, C] of ICs 0..m."""
        m = log_probs.shape[1] - 1
        weights = self.log_weights[m, : m + 1].exp()
        return (log_probs * weights[None, :, None]).sum(dim=1) + self.bias[m]


def _cache(model: Any, batches: Iterable[tuple[Tensor, Tensor]], limit: int) -> tuple[Tensor, Tensor]:
    """The ICs' log-probabilities [N, E - 1, C] and labels [N] of up to `limit` training samples."""
    log_probs, labels, n = [], [], 0
    with torch.no_grad():
        for x, y in batches:
            log_probs.append(log_probs_of(model.raw_exits(x)[:-1]))
            labels.append(y)
            n += y.shape[0]
            if n >= limit:
                break
    if not labels:
        raise ValueError("ztw: the training loader yielded no samples to fit the ensemble on")
    return torch.cat(log_probs)[:limit], torch.cat(labels)[:limit]


def ensemble_nll(ensemble: GeometricEnsemble, log_probs: Tensor, labels: Tensor) -> Tensor:
    """The summed negative log-likelihood of every IC's ensemble over the samples given."""
    return sum(F.cross_entropy(ensemble.mix(log_probs[:, : m + 1]), labels, reduction="sum")
               for m in range(log_probs.shape[1]))  # type: ignore[return-value]


def fit_ensemble(model: Any, batches: Iterable[tuple[Tensor, Tensor]], reduce_sum: Callable[[Tensor], Tensor]) -> str:
    """Fit `model.ensemble` on the frozen net (eval mode: BatchNorm statistics stay as trained), by
    full-batch Adam over every DDP rank's cached shard (`stages.core.nets.full_batch`)."""
    ensemble: GeometricEnsemble = model.ensemble
    model.eval()
    limit = max(1, MAX_CACHED_FLOATS // max(1, (model.num_exits - 1) * model.spec.num_classes))
    log_probs, labels = _cache(model, batches, limit)
    count = reduce_sum(torch.tensor(float(labels.shape[0]), dtype=torch.float64, device=labels.device)).item()
    before, after = fit_full_batch(ensemble, lambda: ensemble_nll(ensemble, log_probs, labels), ENSEMBLE_STEPS, ENSEMBLE_LR,
                                   count, reduce_sum)
    ics = log_probs.shape[1]
    return (f"ztw ensemble fitted on {int(count)} training samples: summed NLL of its {ics} ICs "
            f"{before:.4f} -> {after:.4f} per sample")


class ZTW(ExitMethod):
    """Cascading ICs (IC k > 0 wrapped in `CascadeHead`) and the geometric ensemble (`net.ensemble`,
    trained by no phase), fitted on the frozen net once the ICs are trained; exit k needs every IC before it."""

    name = "ztw"
    independent = False

    def build(self, make_ics: MakeICs, num_exits: int, num_classes: int) -> MethodParts:
        heads = make_ics(num_classes)
        cascading = heads[:1] + [CascadeHead(h, num_classes) for h in heads[1:]]  # IC 0 has no predecessor
        return MethodParts(cascading, fitted={"ensemble": GeometricEnsemble(num_exits, num_classes)})

    def ic_forward(self, net: ExitNet, ic: int, h: Tensor, raw: Sequence[Tensor]) -> Tensor:
        return net.ics[ic](h, raw[-1]) if ic > 0 else net.ics[ic](h)

    def combine(self, net: ExitNet, raw: Sequence[Tensor]) -> Tensor:
        return net.ensemble(raw)

    def exit_logits(self, net: ExitNet, raw: list[Tensor]) -> list[Tensor]:
        # in train mode the ICs train on their own answers: the ensemble is fitted afterwards (`finish`)
        return raw if net.training else super().exit_logits(net, raw)

    def finish(self, net: ExitNet, batches: Iterable[tuple[Tensor, Tensor]],
               reduce_sum: Callable[[Tensor], Tensor]) -> str:
        return fit_ensemble(net, batches, reduce_sum)
