"""FLOPs of every exit: fvcore multiply-adds for one sample, attention included.

One trace of the whole multi-exit forward gives each block's and each IC's cost (fvcore
attributes ops to modules by name); one small trace of the final head splits the remainder into
stem and head. A method that combines the exits' raw outputs (GPF's aggregator, ZTW's ensemble)
has each exit's combining traced alone. Exit k costs stem + blocks up to IC k + ICs 0..k + the
combining of exits 0..k (early-exit inference forms every exit's logits on the way); the final exit
costs the whole backbone + every IC + every combining. fvcore skips fused attention (`aten::scaled_dot_product_attention`);
`sdpa_flop_jit` counts it, the same as fvcore counts timm's unfused (matmul) path.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

with warnings.catch_warnings():  # fvcore.nn scripts its focal loss at import: torch calls that deprecated
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

# A stages.core.nets.multi_exit.MultiExitNet, read by its attributes: the net's methods (JEI-DNN's cost
# targets) count FLOPs, so importing the net here would close an import circle.
MultiExitNet = Any


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """Multiply-adds of scaled_dot_product_attention: Q K^T plus attn V.

    For q [..., N, d], k [..., M, d], v [..., M, dv]: prod(...) * N * M * (d + dv), i.e.
    B * H * N^2 * 2d for self-attention (softmax and scaling are not counted, as fvcore does not
    count elementwise ops).
    """
    q, k, v = (get_shape(t) for t in inputs[:3])
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


# Fused attention counted; BatchNorm not: at inference it is a per-channel affine map that folds into
# the conv before it (as deployed nets do), an elementwise op like the others fvcore leaves out.
# What remains matches torch's FlopCounterMode (convs and matmuls) up to pooling and LayerNorm.
def folded_batch_norm(inputs: list[Any], outputs: list[Any]) -> int:
    return 0


EXTRA_OP_HANDLES = {"aten::scaled_dot_product_attention": sdpa_flop_jit, "aten::batch_norm": folded_batch_norm}


def flop_analysis(module: nn.Module, inputs: Tensor | tuple[Tensor, ...]) -> FlopCountAnalysis:
    """fvcore's FlopCountAnalysis with fused attention counted, BatchNorm not, and its warnings off.

    Lazy, like fvcore: call it under torch.no_grad() with the module in eval mode.
    """
    analysis = FlopCountAnalysis(module, inputs).set_op_handle(**EXTRA_OP_HANDLES)
    # Elementwise ops (add, relu, softmax, ...) are knowingly uncounted, and pieces traced alone
    # leave sibling modules uncalled: neither is worth a warning.
    return analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")


class _Method(nn.Module):
    """One method of a module as a module of its own, so fvcore can trace that piece alone."""

    def __init__(self, owner: nn.Module, method: str) -> None:
        super().__init__()
        self.owner = owner
        self.method = method

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.owner, self.method)(x)


@dataclass(frozen=True)
class PieceFlops:
    """Multiply-adds of each piece of a multi-exit net, for one sample."""

    stem: int  # input -> first block's input
    blocks: tuple[int, ...]  # each backbone block
    ics: tuple[int, ...]  # each internal classifier
    head: int  # last block's output -> final logits
    combine: tuple[int, ...] = ()  # each exit's logits from the raw outputs so far (empty: the method has no combining cost)

    @property
    def backbone(self) -> int:
        return self.stem + sum(self.blocks) + self.head


@contextlib.contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    """Eval mode inside; every submodule's own mode restored after (a P3 net mixes both)."""
    modes = {m: m.training for m in net.modules()}
    net.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def piece_flops(net: MultiExitNet) -> PieceFlops:
    """Multiply-adds of every piece of `net` for one zero image of the spec's shape (batch 1)."""
    backbone, spec = net.backbone, net.spec
    param = next(net.parameters())
    x = torch.zeros(1, spec.in_chans, spec.img_size, spec.img_size, device=param.device, dtype=param.dtype)
    names = {id(m): name for name, m in net.named_modules()}
    with torch.no_grad(), _eval_mode(net):
        analysis = flop_analysis(net, (x,))
        by_module = analysis.by_module()
        ics = tuple(int(by_module[names[id(ic)]]) for ic in net.ics)
        own = getattr(backbone, "piece_costs", None)  # a backbone whose blocks fvcore cannot see one by one
        if own is not None:
            own_stem, blocks, head = own(x, lambda module, inputs: int(flop_analysis(module, inputs).total()))
        else:
            blocks = tuple(int(by_module[names[id(b)]]) for b in backbone.blocks)
            last = net.block_states(x, [net.num_blocks])[0]
            head = int(flop_analysis(_Method(backbone, "forward_head"), (last,)).total())
        # the method's own modules run in the forward only to combine the exits (GPF's aggregator)
        in_forward = sum(int(by_module.get(name, 0)) for name in net.own_modules())
        # an independent method's exit k is IC k's raw output: nothing to combine, nothing to trace
        combine = () if net.method.independent else _combine_flops(net, x)
    # the stem is the rest: whatever is counted outside blocks, ICs, head and combining (so nothing is lost)
    stem = int(analysis.total()) - sum(blocks) - sum(ics) - head - in_forward
    if own is not None:  # its pieces were counted alone; the whole trace gave the ICs' and the method's
        stem = own_stem
    return PieceFlops(stem=stem, blocks=blocks, ics=ics, head=head, combine=combine)


class _Combine(nn.Module):
    """`net.combine` on the raw outputs given as arguments, for fvcore to trace one exit's combining alone."""

    def __init__(self, net: MultiExitNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, *raw: Tensor) -> Tensor:
        return self.net.combine(list(raw))


def _combine_flops(net: MultiExitNet, x: Tensor) -> tuple[int, ...]:
    """Each exit's combining cost: `net.combine` traced on the raw outputs of exits 0..k."""
    raw = net.raw_exits(x)
    return tuple(int(flop_analysis(_Combine(net), tuple(raw[: k + 1])).total()) for k in range(net.num_exits))


def exit_flops(net: MultiExitNet) -> list[int]:
    """Multiply-adds of every exit for one sample: backbone up to exit k + every IC up to and including k
    + the method's combining of exits 0..k.

    The final exit (last) costs the whole backbone, its classifier, every IC and every combining.
    """
    p = piece_flops(net)
    combine = p.combine or (0,) * net.num_exits
    costs = [p.stem + sum(p.blocks[:b]) + sum(p.ics[: k + 1]) + sum(combine[: k + 1]) for k, b in enumerate(net.ic_blocks)]
    costs.append(p.backbone + sum(p.ics) + sum(combine))
    return costs


def backbone_flops(net: MultiExitNet) -> int:
    """Multiply-adds of the plain backbone (final classifier included, no ICs) for one sample."""
    return piece_flops(net).backbone
