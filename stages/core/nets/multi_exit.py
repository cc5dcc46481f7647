"""MultiExitNet: a backbone cut into stem -> blocks -> head, with internal classifiers (ICs) after chosen blocks."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from exitflow.stages.core.nets.heads import make_head
from exitflow.stages.core.nets.methods import get_method
from exitflow.stages.core.nets.spec import NetSpec


class ExitBackbone(nn.Module, abc.ABC):
    """A classifier cut into `forward_stem` -> `blocks` -> `forward_head`; ICs attach after blocks.

    Subclasses provide `blocks` (an indexable sequence of modules registered under the backbone)
    and the two forwards. Every backbone parameter, the final classifier included, lives here:
    these are the P1 parameters.
    """

    blocks: Sequence[nn.Module]
    # The module path of the final classifier (the Linear giving the logits) inside the backbone:
    # a pretrained start may leave it out, when its classes are not the study's.
    classifier: str = "head.2"

    @abc.abstractmethod
    def forward_stem(self, x: Tensor) -> Tensor:
        """Input images -> the first block's input."""

    @abc.abstractmethod
    def forward_head(self, h: Tensor) -> Tensor:
        """The last block's output -> final logits."""

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def start(self, x: Tensor, until: int) -> Any:
        """The state before block 1 for a pass that goes no further than block `until` (a backbone that
        cannot resume between blocks, `timm_backbone.IntermediatesBackbone`, stops its run there)."""
        return self.forward_stem(x)

    def forward(self, x: Tensor) -> Tensor:
        h = self.forward_stem(x)
        for block in self.blocks:
            h = block(h)
        return self.forward_head(h)

    # The hidden state between blocks is a tensor, or what a family passes instead (MSDNet: a list of
    # scales). An IC, and every reader of a block's output, sees `ic_input` of it.
    def ic_input(self, h: Any) -> Tensor:
        return h

    def ic_head(self, feature_shape: tuple[int, ...], num_classes: int) -> nn.Module | None:
        """The family's own IC head for features of `feature_shape` (MSDNet's classifier), used when
        neither the spec nor the method names a head kind; None: `make_head`'s default."""
        return None


def map_state(h: Any, fn: Any) -> Any:
    """`fn` applied to a hidden state: to the tensor, to each tensor of a list of scales, or through the
    state's own `map` (a lazy state: `timm_backbone.IntermediatesState`)."""
    if isinstance(h, list):
        return [fn(t) for t in h]
    return h.map(fn) if hasattr(h, "map") else fn(h)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by a constant backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        # a view, not x itself: autograd needs a new tensor to attach this node to
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """`x` unchanged forward; its gradient multiplied by `scale` backward."""
    return _ScaleGrad.apply(x, scale)


def exits_every(num_blocks: int, every: int, start: int) -> tuple[int, ...]:
    """IC positions start, start + every, ... strictly before the last block (the final head's place)."""
    return tuple(range(start, num_blocks, every))


def resnet_exits(num_blocks: int) -> tuple[int, ...]:
    """The paper's ResNet placement: every other block from the 5th (appendix D.2).

    Short nets (resnet18: 8 blocks, resnet20: 9) would get only 2 ICs that way, so when that
    rule yields fewer than 3 ICs, ICs go after every other block from the 2nd instead
    (resnet18 -> 2, 4, 6; resnet20 -> 2, 4, 6, 8).
    """
    paper = exits_every(num_blocks, 2, 5)
    return paper if len(paper) >= 3 else exits_every(num_blocks, 2, 2)


def resolve_exits(spec: NetSpec, num_blocks: int, default: Sequence[int]) -> tuple[int, ...]:
    """IC positions (1-based block numbers an IC follows) from the spec, else the family `default`."""
    if spec.exits is not None:
        if spec.exit_every is not None or spec.exit_start is not None:
            raise ValueError("net spec field `exits`: give either `exits` or `exit_every`/`exit_start`, not both")
        positions = tuple(spec.exits)
    elif spec.exit_every is not None or spec.exit_start is not None:
        if spec.exit_every is None:
            raise ValueError("net spec field `exit_every`: required when `exit_start` is given")
        if spec.exit_every < 1:
            raise ValueError(f"net spec field `exit_every`: must be >= 1, got {spec.exit_every}")
        start = spec.exit_every if spec.exit_start is None else spec.exit_start
        if not 1 <= start <= num_blocks - 1:
            raise ValueError(f"net spec field `exit_start`: must lie in [1, {num_blocks - 1}] for {spec.backbone} "
                             f"({num_blocks} blocks), got {start}")
        positions = exits_every(num_blocks, spec.exit_every, start)
    else:
        positions = tuple(default)
    bad = [p for p in positions if not 1 <= p <= num_blocks - 1]
    if bad:
        raise ValueError(f"net spec field `exits`: IC positions {bad} out of range [1, {num_blocks - 1}] for "
                         f"{spec.backbone} ({num_blocks} blocks; the final head follows block {num_blocks})")
    if any(a >= b for a, b in zip(positions, positions[1:])):
        raise ValueError(f"net spec field `exits`: IC positions must be strictly increasing, got {list(positions)}")
    return positions


@torch.no_grad()
def block_shapes(backbone: ExitBackbone, in_chans: int, img_size: int) -> tuple[tuple[int, ...], ...]:
    """Per-sample output shape of every block, from one eval-mode pass on a single zero image."""
    modes = {m: m.training for m in backbone.modules()}
    param = next(backbone.parameters())
    backbone.eval()  # train-mode BatchNorm on one sample at 1x1 would fail, and must not see this pass
    try:
        h = backbone.start(torch.zeros(1, in_chans, img_size, img_size, device=param.device, dtype=param.dtype),
                           backbone.num_blocks)
        shapes = []
        for block in backbone.blocks:
            h = block(h)
            shapes.append(tuple(backbone.ic_input(h).shape[1:]))
    finally:
        for module, training in modes.items():
            module.training = training
    return tuple(shapes)


class MultiExitNet(nn.Module):
    """A backbone with ICs after chosen blocks; `forward` returns every exit's logits, the final one last.

    `backbone` holds every backbone parameter including the final classifier (P1); `ics` holds
    the internal classifiers only. `exit_blocks[k]` is the block exit k follows (1-based); the
    last entry is `num_blocks` (the final head).
    """

    def __init__(self, spec: NetSpec, backbone: ExitBackbone, default_exits: Sequence[int]) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.num_blocks = backbone.num_blocks
        ic_blocks = resolve_exits(spec, self.num_blocks, default_exits)
        self.exit_blocks: tuple[int, ...] = (*ic_blocks, self.num_blocks)
        self.num_exits = len(self.exit_blocks)
        self.feature_shapes = block_shapes(backbone, spec.in_chans, spec.img_size)
        self.method = get_method(spec.method)
        kind = spec.head if spec.head is not None else self.method.head
        shapes = [self.feature_shapes[b - 1] for b in ic_blocks]
        parts = self.method.build(lambda outputs: [self._make_ic(kind, s, outputs) for s in shapes],
                                  self.num_exits, spec.num_classes)
        if len(parts.ics) != len(ic_blocks):
            raise ValueError(f"method {spec.method!r} built {len(parts.ics)} IC heads for {len(ic_blocks)} ICs")
        # The method's modules that train with the ICs (GPF's aggregator) are registered before them, those no
        # phase trains (ZTW's ensemble, JEI-DNN's gates) after: the state-dict and parameter order of every
        # checkpoint and optimizer state written so far.
        self._trained = self._hold(parts.trained)
        self.ics = nn.ModuleList(parts.ics)
        self._fitted = self._hold(parts.fitted)
        self._ic_after = {b: i for i, b in enumerate(ic_blocks)}  # block number -> IC index
        self.gradient_equilibrium = False

    def _make_ic(self, kind: str | None, feature_shape: tuple[int, ...], outputs: int) -> nn.Module:
        spec = self.spec
        own = self.backbone.ic_head(feature_shape, outputs) if kind is None else None
        if own is None:
            return make_head(kind, feature_shape, outputs, spec.head_norm, spec.head_hidden)
        if spec.head_norm or spec.head_hidden:
            raise ValueError(f"net spec field `head_norm`/`head_hidden`: {spec.backbone}'s own IC head takes neither; "
                             "name a head kind in `head` (linear, mlp) to use them")
        return own

    def _hold(self, modules: dict[str, nn.Module]) -> tuple[str, ...]:
        """Register the method's `modules` as attributes of the net (`net.<name>`, `<name>.*` in the state dict)."""
        for name, module in modules.items():
            if hasattr(self, name):  # `ics`, `backbone`, ... or a name the method gave twice
                raise ValueError(f"method {self.spec.method!r}: module name {name!r} is taken in the net")
            setattr(self, name, module)
        return tuple(modules)

    def method_modules(self) -> dict[str, nn.Module]:
        """The method's modules that no phase trains, by attribute name (ZTW's `ensemble`, JEI-DNN's `gates`):
        fitted by the method's `finish` step, no unit of the backbone in them."""
        return {name: getattr(self, name) for name in self._fitted}

    def own_modules(self) -> dict[str, nn.Module]:
        """Every module the method adds beside the IC heads, by attribute name: those that train with the ICs
        (GPF's `aggregator`), then `method_modules()`."""
        return {name: getattr(self, name) for name in (*self._trained, *self._fitted)}

    @property
    def ic_blocks(self) -> tuple[int, ...]:
        """Blocks the ICs follow (every exit but the final one)."""
        return self.exit_blocks[:-1]

    def set_gradient_equilibrium(self, enabled: bool) -> None:
        """Gradient equilibrium (Li et al. 2019, "Improved techniques for training adaptive deep networks").

        At the branch point of IC i (0-based) of n exits, with r = n - i exits from there on:
        the IC branch's gradient is scaled by 1 / r and the deeper path's by (r - 1) / r, exactly
        as in the authors' MSDNet code (rescale by 1 / (n - i) before the classifier, then by
        (n - i - 1) on the way on). Forward values are unchanged.
        """
        if enabled and not getattr(self.backbone, "supports_gradient_equilibrium", True):
            raise ValueError(f"loss_weighting gradient_equilibrium rescales gradients between blocks, which "
                             f"{self.spec.backbone} does not expose (it runs through forward_intermediates); "
                             "pick another loss_weighting")
        self.gradient_equilibrium = bool(enabled)

    def _branch(self, h: Any, ic: int) -> tuple[Any, Tensor]:
        """(deeper path, IC input) at IC `ic`'s branch point."""
        if not self.gradient_equilibrium:
            return h, self.backbone.ic_input(h)
        remaining = self.num_exits - ic
        deeper = map_state(h, lambda t: scale_grad(t, (remaining - 1) / remaining))
        return deeper, self.backbone.ic_input(map_state(h, lambda t: scale_grad(t, 1.0 / remaining)))

    def ic_output(self, ic: int, h: Tensor, raw: Sequence[Tensor]) -> Tensor:
        """IC `ic`'s raw output on its block's features `h`; `raw` holds the raw outputs of ICs 0..ic-1
        (a cascading method's IC reads the last of them)."""
        return self.method.ic_forward(self, ic, h, raw)

    def ic_modules(self) -> list[nn.Module]:
        """What the phases that train the ICs (P2, P3) train: the ICs, and the method's modules that train
        with them (GPF's aggregator)."""
        return [self.ics, *(getattr(self, name) for name in self._trained)]

    def combine(self, raw: Sequence[Tensor]) -> Tensor:
        """Exit k's logits from the raw outputs of exits 0..k, as the method combines them."""
        return self.method.combine(self, raw)

    def raw_exits(self, x: Tensor) -> list[Tensor]:
        """Every exit's raw output (each IC's, then the final head's), before the method combines them."""
        h = self.backbone.start(x, self.num_blocks)
        raw: list[Tensor] = []
        for number, block in enumerate(self.backbone.blocks, start=1):
            h = block(h)
            ic = self._ic_after.get(number)
            if ic is not None:
                h, branch = self._branch(h, ic)
                raw.append(self.ic_output(ic, branch, raw))
        raw.append(self.backbone.forward_head(h))
        return raw

    def forward(self, x: Tensor) -> list[Tensor]:
        """Every exit's logits, the final one last, as the method forms them from the raw outputs
        (`ExitMethod.exit_logits`: in train mode ZTW's are the raw outputs its ICs train on)."""
        return self.method.exit_logits(self, self.raw_exits(x))

    def forward_until(self, x: Tensor, k: int) -> Tensor:
        """Logits of exit `k` (0-based; negative counts from the end), running only the blocks it needs."""
        if not -self.num_exits <= k < self.num_exits:
            raise IndexError(f"exit {k} out of range for {self.num_exits} exits")
        k %= self.num_exits
        h = self.backbone.start(x, self.exit_blocks[k])
        raw: list[Tensor] = []  # every exit up to k when the method combines them, else exit k alone
        for number in range(1, self.exit_blocks[k] + 1):
            h = self.backbone.blocks[number - 1](h)
            ic = self._ic_after.get(number)
            if ic is not None and (ic == k or not self.method.independent):
                raw.append(self.ic_output(ic, self.backbone.ic_input(h), raw))
        if k == self.num_exits - 1:
            raw.append(self.backbone.forward_head(h))
        return self.combine(raw)

    def forward_intermediates(self, x: Tensor, blocks: Sequence[int] | None = None) -> list[Tensor]:
        """Outputs of the given 1-based blocks (default: every block) as the ICs read them, running only as far as needed."""
        return [self.backbone.ic_input(h) for h in self.block_states(x, blocks)]

    def block_states(self, x: Tensor, blocks: Sequence[int] | None = None) -> list[Any]:
        """The hidden states after the given 1-based blocks (default: every block), as the next block reads them."""
        wanted = tuple(range(1, self.num_blocks + 1)) if blocks is None else tuple(blocks)
        bad = [b for b in wanted if not 1 <= b <= self.num_blocks]
        if bad:
            raise IndexError(f"blocks {bad} out of range [1, {self.num_blocks}]")
        found: dict[int, Any] = {}
        h = self.backbone.start(x, max(wanted, default=0))
        for number in range(1, max(wanted, default=0) + 1):
            h = self.backbone.blocks[number - 1](h)
            if number in wanted:
                found[number] = h
        return [found[b] for b in wanted]
