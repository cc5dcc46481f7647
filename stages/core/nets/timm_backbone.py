"""Any model with timm's `forward_intermediates` API as an early-exit backbone, and `timm:NAME` nets.

No per-family code: the blocks ICs follow are the intermediate outputs the model's own
`forward_intermediates` exposes (timm: a ResNet's stem and its four stages, a ConvNeXt's four stages,
a ViT's blocks), the ICs read them as that method gives them (NCHW maps for every model, a ViT's
patch tokens as a grid with its class token dropped), and the model's own head
(`forward_head` of the final features) is the final exit.

timm offers no generic way to resume a model from block k's output, so the hidden state between
blocks is a lazy `IntermediatesState`: the input and how far a pass must go. The first reader runs
`forward_intermediates` once, `stop_early` at the furthest block the caller said it needs (a whole
training pass: one run, every intermediate and the final features at once; `forward_until(k)`: the
blocks up to k and no further). A pass asked to go past where its run stopped (dynamic inference:
the samples no IC let leave) runs again from the input, on those samples only: a sample that leaves
at the i-th IC paid the prefix up to each IC on its way (docs/contracts.md, "Any timm model"). The
FLOPs per exit count each block once, as a resumable backbone would run it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from exitflow.stages.core.nets.multi_exit import ExitBackbone, MultiExitNet, exits_every
from exitflow.stages.core.allowed import TIMM_PREFIX
from exitflow.stages.core.nets.spec import NetSpec

INTERMEDIATES_API = ("forward_intermediates", "forward_head")
SUGGESTIONS = 8  # timm names shown beside an unknown one


def _describe(model: nn.Module) -> str:
    return getattr(model, "exitflow_name", None) or type(model).__name__


@dataclass
class _Run:
    """One `forward_intermediates` run over a batch, shared by the states of its blocks."""

    x: Tensor
    until: int  # the furthest block (1-based) a reader said it needs
    intermediates: list[Tensor] = field(default_factory=list)  # blocks 1..len() once run
    final: Tensor | None = None  # the final features (a run through every block)


@dataclass
class IntermediatesState:
    """The hidden state after block `done`: a view of its batch's run, which computes on first read."""

    run: _Run
    done: int

    def map(self, fn: Callable[[Tensor], Tensor]) -> "IntermediatesState":
        """`fn` applied to every tensor of the batch (the input and whatever the run has computed):
        dynamic inference keeps the samples still in this way."""
        run = self.run
        kept = _Run(fn(run.x), run.until, [fn(t) for t in run.intermediates],
                    None if run.final is None else fn(run.final))
        return IntermediatesState(kept, self.done)


class _Step(nn.Module):
    """Block k of an `IntermediatesBackbone`: moves the state on; the run computes when it is read."""

    def forward(self, h: IntermediatesState) -> IntermediatesState:
        return IntermediatesState(h.run, h.done + 1)


class _Prefix(nn.Module):
    """The model up to intermediate `k` (1-based) alone, for fvcore to count."""

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        self.model, self.k = model, k

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_intermediates(x, indices=[self.k - 1], stop_early=True, intermediates_only=True)[0]


class _Whole(nn.Module):
    """The model's whole forward through `forward_intermediates` and `forward_head`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        final, _ = self.model.forward_intermediates(x, indices=[0], stop_early=False)
        return self.model.forward_head(final)


class IntermediatesBackbone(ExitBackbone):
    """An ExitBackbone over any `nn.Module` with timm's `forward_intermediates(x, indices, stop_early,
    intermediates_only)` and `forward_head(features)`: its blocks are the intermediates it exposes.

    `input_size` (channels, height, width) is the probe counting them (default: the model's
    `pretrained_cfg["input_size"]`, else 3 x 224 x 224). The model is held as `model`: every
    parameter and buffer of it is a backbone one (P1 trains it, P3 freezes it).
    """

    supports_gradient_equilibrium = False  # no generic hook between a timm model's blocks

    def __init__(self, model: nn.Module, input_size: Sequence[int] | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"a {type(model).__name__} is no nn.Module: an exitflow backbone is a torch model")
        lacking = [m for m in INTERMEDIATES_API if not callable(getattr(model, m, None))]
        if lacking:
            raise ValueError(f"{_describe(model)} has no {' or '.join(lacking)}: an exitflow backbone needs timm's "
                             "forward_intermediates API to put exits after its blocks")
        self.model = model
        size = tuple(input_size) if input_size is not None else _default_input(model)
        self.input_size = size
        self.steps = nn.ModuleList(_Step() for _ in range(_count_intermediates(model, size)))
        classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        if isinstance(classifier, (tuple, list)):
            classifier = classifier[0]
        self.classifier = f"model.{classifier}" if classifier else "model.head"

    @property
    def blocks(self) -> nn.ModuleList:  # type: ignore[override]
        return self.steps

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def start(self, x: Tensor, until: int) -> IntermediatesState:
        return IntermediatesState(_Run(x, until), 0)

    def forward_stem(self, x: Tensor) -> IntermediatesState:  # type: ignore[override]
        return self.start(x, self.num_blocks)

    def ic_input(self, h: IntermediatesState) -> Tensor:  # type: ignore[override]
        if not 1 <= h.done <= self.num_blocks:
            raise IndexError(f"no intermediate after block {h.done} of {self.num_blocks}")
        if len(h.run.intermediates) < h.done:
            self._run(h.run, max(h.done, h.run.until))
        return h.run.intermediates[h.done - 1]

    def forward_head(self, h: IntermediatesState) -> Tensor:  # type: ignore[override]
        if h.run.final is None:
            self._run(h.run, self.num_blocks)
        return self.model.forward_head(h.run.final)

    def _run(self, run: _Run, until: int) -> None:
        """Run the model from `run.x` up to block `until` (every block: the final features too)."""
        indices = list(range(until))
        if until >= self.num_blocks:
            run.final, run.intermediates = self.model.forward_intermediates(run.x, indices=indices, stop_early=False)
        else:
            run.intermediates = self.model.forward_intermediates(run.x, indices=indices, stop_early=True,
                                                                 intermediates_only=True)
        run.until = max(run.until, until)

    def piece_costs(self, x: Tensor, count: Callable[[nn.Module, tuple[Tensor, ...]], int]) -> tuple[int, tuple[int, ...], int]:
        """(stem, each block, head) multiply-adds, from `count` of the model's prefixes: block k costs
        prefix k less prefix k-1 (what a run resumed at block k-1 would add); the stem is in block 1."""
        prefixes = [count(_Prefix(self.model, k), (x,)) for k in range(1, self.num_blocks + 1)]
        blocks = tuple(b - a for a, b in zip([0, *prefixes], prefixes))
        return 0, blocks, count(_Whole(self.model), (x,)) - prefixes[-1]


def _default_input(model: nn.Module) -> tuple[int, ...]:
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return tuple(size) if size else (3, 224, 224)


def _count_intermediates(model: nn.Module, size: tuple[int, ...]) -> int:
    """How many intermediates the model exposes, from one eval-mode pass on a zero image."""
    import torch

    param = next(model.parameters(), None)
    x = torch.zeros(1, *size, device=None if param is None else param.device,
                    dtype=None if param is None else param.dtype)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = model.forward_intermediates(x, intermediates_only=True)
    except Exception as e:  # noqa: BLE001 - any model's own refusal of this input, passed on with its reason
        raise ValueError(f"{_describe(model)}: forward_intermediates fails on a {'x'.join(map(str, size))} input: "
                         f"{type(e).__name__}: {e}") from None
    finally:
        for module, training in modes.items():
            module.training = training
    if not isinstance(out, (list, tuple)) or len(out) < 2 or not all(isinstance(t, Tensor) for t in out):
        raise ValueError(f"{_describe(model)}: forward_intermediates gave {type(out).__name__}"
                         f"{'' if not isinstance(out, (list, tuple)) else f' of {len(out)}'}; an early-exit backbone "
                         "needs a list of at least 2 tensors (ICs go after all but the last)")
    if any(t.ndim not in (3, 4) for t in out):
        raise ValueError(f"{_describe(model)}: forward_intermediates gave shapes {[tuple(t.shape) for t in out]}; "
                         "an IC reads NCHW maps or (N, L, D) tokens")
    return len(out)


def _create_timm_model(name: str, spec: NetSpec) -> nn.Module:
    import timm

    if not timm.is_model(name):
        like = difflib.get_close_matches(name, timm.list_models(), n=SUGGESTIONS, cutoff=0.75)
        raise ValueError(f"net spec field `backbone`: {TIMM_PREFIX}{name}: timm {timm.__version__} has no model "
                         f"{name!r}" + (f"; similar: {like}" if like else "; `timm.list_models()` lists them"))
    kwargs: dict[str, Any] = dict(pretrained=False, num_classes=spec.num_classes, in_chans=spec.in_chans)
    try:
        try:  # models that take an image size (ViTs, ...) are built for the study's
            return timm.create_model(name, img_size=spec.img_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            return timm.create_model(name, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm's own refusal, passed on with its reason
        raise ValueError(f"net spec field `backbone`: {TIMM_PREFIX}{name}: timm cannot build it for "
                         f"{spec.in_chans}-channel {spec.img_size}x{spec.img_size} images, {spec.num_classes} classes: "
                         f"{type(e).__name__}: {e}") from None


def timm_net(spec: NetSpec) -> MultiExitNet:
    """`timm:NAME`: timm's model NAME (fresh weights, the study's classes, channels and image size)
    with an IC after each intermediate it exposes but the last, unless `exits`/`exit_every` pick."""
    name = spec.backbone.removeprefix(TIMM_PREFIX).strip()
    if not name:
        raise ValueError("net spec field `backbone`: timm: needs a model name, e.g. timm:convnext_atto")
    for attr in ("width", "depth", "small_input"):
        if getattr(spec, attr) is not None:
            raise ValueError(f"net spec field `{attr}`: {spec.backbone} is built as timm defines it; leave {attr} None")
    model = _create_timm_model(name, spec)
    model.exitflow_name = spec.backbone  # named in the adapter's messages
    try:
        backbone = IntermediatesBackbone(model, (spec.in_chans, spec.img_size, spec.img_size))
    except ValueError as e:
        raise ValueError(f"net spec field `backbone`: {e}") from None
    return MultiExitNet(spec, backbone, exits_every(backbone.num_blocks, 1, 1))


def timm_version() -> str:
    """timm's installed version, read without importing it (a cache key holds it for timm backbones)."""
    from importlib.metadata import version

    return version("timm")
