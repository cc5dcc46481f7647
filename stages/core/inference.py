"""Dynamic early-exit inference: a batch runs block by block, and a sample leaves once its exit rule fires.

This is the path a deployed early-exit net takes, as opposed to the simulated curve of
`stages.core.evaluation` (every exit's logits cached, exits read off afterwards). After each IC
the samples whose confidence passes the threshold take that IC's prediction and leave the batch
(compaction: the hidden state, the sample indices and the exits' logits so far are indexed down
to the samples that stay), so later blocks run on fewer samples; the rest reach the final head.

Both paths share one definition of confidence (`evaluation.confidence`) and of passing
(`evaluation.passes`): for the same logits, dynamic inference takes the exits and predictions the
simulated curve counts at that threshold (a test checks it on a trained net). A criterion's
confidence at exit i reads exits 0..i and the number of exits E, never a later exit, so it is
computed here before the later exits run: the logits so far are padded to E rows by repeating
the last one, and row i is read. A method with its own curve (JEI-DNN's gates) brings its own
rule for it (`MethodCurve.leaves` of one of its `ExitMethod.curves()`), which reads the IC's logits alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from exitflow.stages.core.evaluation import Criterion, confidence, get_criterion, passes
from exitflow.stages.core.nets.multi_exit import MultiExitNet, map_state


@dataclass(frozen=True)
class ExitDecisions:
    """Per sample: the predicted class and the exit it left at (0-based; E-1 is the final head)."""

    predictions: Tensor  # [N] int64
    exits: Tensor  # [N] int64

    def __len__(self) -> int:
        return int(self.predictions.numel())


def _confidence_at(seen: list[Tensor], num_exits: int, criterion: Criterion) -> Tensor:
    """Confidence [B] of the latest exit in `seen` (each [B, C], exits 0..i) in a net of `num_exits` exits."""
    stack = torch.stack(seen + [seen[-1]] * (num_exits - len(seen)))  # [E, B, C]; rows after i are padding
    return confidence(stack, criterion)[len(seen) - 1]


# (the logits of exits 0..ic so far, each [B, C]; ic) -> which samples leave at IC `ic` [B] bool
ExitRule = Callable[[list[Tensor], int], Tensor]


def exit_rule(net: MultiExitNet, criterion: Criterion, threshold: float) -> ExitRule:
    """The rule that decides who leaves at each IC: a criterion's confidence passing `threshold`, or,
    when `criterion` names the net's method's own curve (JEI-DNN's "gates"), that method's decision
    at the curve's point `threshold` (a lambda): the same rule its curve in curve.parquet simulates."""
    own = {c.name: c for c in net.method.curves()}
    if isinstance(criterion, str) and criterion in own:
        curve = own[criterion]
        return lambda seen, ic: curve.leaves(net, seen[-1], ic, threshold)
    c = get_criterion(criterion)
    return lambda seen, ic: passes(_confidence_at(seen, net.num_exits, c), threshold, c)


@torch.inference_mode()
def early_exit_forward(net: MultiExitNet, x: Tensor, threshold: float, criterion: Criterion = "max_softmax") -> ExitDecisions:
    """Classify a batch with early exits: run only the blocks each sample needs.

    A sample leaves at the first IC whose confidence passes `threshold` (max softmax above it,
    entropy below it, ...; or the method's own rule, see `exit_rule`), else at the final head.
    Call with the net in eval mode.
    """
    leaves = exit_rule(net, criterion, threshold)
    n, device = x.shape[0], x.device
    predictions = torch.empty(n, dtype=torch.long, device=device)
    exits = torch.full((n,), net.num_exits - 1, dtype=torch.long, device=device)
    here = torch.arange(n, device=device)  # original index of every sample still in the batch
    raw: list[Tensor] = []  # the exits' raw outputs so far, for the samples still in (methods combine them)
    seen: list[Tensor] = []  # the exits' logits so far (criteria may read earlier exits)
    # a backbone that cannot resume between blocks runs to the first IC, then on from the input for those still in
    h = net.backbone.start(x, net.exit_blocks[0])
    for number, block in enumerate(net.backbone.blocks, start=1):
        h = block(h)
        ic = net._ic_after.get(number)
        if ic is None:
            continue
        raw.append(net.ic_output(ic, net.backbone.ic_input(h), raw))
        seen.append(net.combine(raw).float())
        leave = leaves(seen, ic).to(device)
        if bool(leave.any()):
            gone = here[leave]
            predictions[gone] = seen[-1][leave].argmax(dim=-1)
            exits[gone] = ic
            stay = ~leave
            if not bool(stay.any()):
                return ExitDecisions(predictions, exits)
            here, h = here[stay], map_state(h, lambda t: t[stay])
            raw = [r[stay] for r in raw]
            seen = [s[stay] for s in seen]
    raw.append(net.backbone.forward_head(h))
    predictions[here] = net.combine(raw).float().argmax(dim=-1)
    return ExitDecisions(predictions, exits)


def early_exit_predict(
    net: MultiExitNet,
    batches: Iterable[tuple[Tensor, Tensor] | Tensor],
    threshold: float,
    criterion: Criterion = "max_softmax",
    device: torch.device | str = "cpu",
) -> ExitDecisions:
    """`early_exit_forward` over a loader ((x, y) batches or bare inputs), in order; results on the CPU.

    Leaves `net` in eval mode."""
    net.eval()
    predictions, exits = [], []
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        out = early_exit_forward(net, x.to(device, non_blocking=True), threshold, criterion)
        predictions.append(out.predictions.cpu())
        exits.append(out.exits.cpu())
    if not predictions:
        raise ValueError("early_exit_predict: the loader yielded no batches")
    return ExitDecisions(torch.cat(predictions), torch.cat(exits))


class EarlyExitClassifier(nn.Module):
    """A trained multi-exit net as a deployable classifier: `forward(x)` returns the predicted class
    of every sample, each computed by the blocks up to the exit it leaves at (`last_exits` holds
    those exits after each call). `threshold` and `criterion` are the exit rule, e.g. the threshold
    the evaluation's curve shows meeting a budget (for JEI-DNN, criterion "gates" and a lambda of its curve)."""

    def __init__(self, net: MultiExitNet, threshold: float, criterion: Criterion = "max_softmax") -> None:
        super().__init__()
        self.net = net.eval()
        self.threshold = float(threshold)
        exit_rule(net, criterion, self.threshold)  # an unknown criterion fails here, not at the first batch
        self.criterion = criterion
        self.last_exits: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        out = early_exit_forward(self.net, x, self.threshold, self.criterion)
        self.last_exits = out.exits
        return out.predictions
