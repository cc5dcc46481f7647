"""A backbone of the user's own as a multi-exit net: `net.backbone: module.path:builder` or an entry point
of the group `exitflow.backbones` (`stages.core.user_backbone` finds and imports the builder).

The builder is called with keyword arguments: `num_classes`, `in_chans` and `img_size` (those its
signature names, `num_classes` always), and `width` / `depth` when the spec sets them. It returns either
an `ExitBackbone` (forward_stem -> blocks -> forward_head, the protocol the built-in families follow:
docs/contracts.md) or a timm-style model with `forward_intermediates`, which
`stages.core.nets.timm_backbone.IntermediatesBackbone` cuts into blocks. ICs, heads and the method are
then placed exactly as on a built-in net. Anything the builder gets wrong is a ValueError naming
`net.backbone` and what is wrong, so the pre-flight refuses it before Ray starts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from exitflow.stages.core.nets.multi_exit import ExitBackbone, MultiExitNet, exits_every
from exitflow.stages.core.nets.spec import NetSpec
from exitflow.stages.core.user_backbone import load_builder

SIZED_BY_DATA = ("num_classes", "in_chans", "img_size")  # what every builder may take from the data set
SIZED_BY_SPEC = ("width", "depth")  # passed only when the spec sets them (`net.width`, `net.depth`)
PROTOCOL = ("forward_stem", "blocks", "forward_head")
NEEDS = ("an ExitBackbone (subclass exitflow.stages.core.nets.ExitBackbone: forward_stem, blocks, forward_head) "
         "or a timm-style model with forward_intermediates (docs/contracts.md, 'A backbone of your own')")
MAX_MESSAGE = 400  # characters of a user's exception message a refusal repeats


def custom_net(spec: NetSpec) -> MultiExitNet:
    """The multi-exit net on the backbone the user's builder returns; ICs after every block but the last
    unless the backbone names its own `default_exits` (or the spec `net.exits` / `net.exit_every`)."""
    builder = load_builder(spec.backbone)
    made = _call(builder, builder_arguments(builder, spec), spec.backbone)
    backbone = as_backbone(made, spec)
    check_backbone(backbone, spec)
    default = getattr(backbone, "default_exits", None)
    return MultiExitNet(spec, backbone, exits_every(backbone.num_blocks, 1, 1) if default is None else tuple(default))


def builder_arguments(builder: Callable[..., Any], spec: NetSpec) -> dict[str, Any]:
    """The keyword arguments `builder` is called with: the data set's sizes its signature takes (num_classes
    always), and the spec's `width` / `depth` when set (refused when the builder takes none)."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # a callable without a signature (a C function): it gets them all
        params = {}
    open_ended = not params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def takes(name: str) -> bool:
        p = params.get(name)
        return open_ended or (p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))

    if not takes("num_classes"):
        raise ValueError(f"net spec field `backbone`: {spec.backbone!r} takes no `num_classes` argument: the builder is "
                         f"called as build(num_classes=..., in_chans=..., img_size=...) and sizes the final head for the data set")
    args = {name: getattr(spec, name) for name in SIZED_BY_DATA if takes(name)}
    for name in SIZED_BY_SPEC:
        value = getattr(spec, name)
        if value is not None:
            if not takes(name):
                raise ValueError(f"net spec field `{name}`: {spec.backbone!r} takes no `{name}` argument (set net.{name} only "
                                 "for a builder that has one)")
            args[name] = value
    missing = [n for n, p in params.items() if p.default is p.empty and n not in args
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        raise ValueError(f"net spec field `backbone`: {spec.backbone!r} requires {missing}, which exitflow does not pass: it "
                         f"calls the builder with {sorted(args)} (give the others defaults)")
    return args


def _call(builder: Callable[..., Any], args: dict[str, Any], backbone: str) -> Any:
    try:
        return builder(**args)
    except Exception as e:  # noqa: BLE001 - the user's code may raise anything; its message is the reason
        raise ValueError(f"net spec field `backbone`: {backbone!r} raised {type(e).__name__} when called with "
                         f"{_arguments(args)}: {_message(e)}") from None


def as_backbone(made: Any, spec: NetSpec) -> ExitBackbone:
    """What the builder returned as an ExitBackbone: itself, or a timm-style model wrapped (its blocks the
    intermediates it exposes for the data set's images); else a ValueError saying what it returned and
    what the protocol needs."""
    if isinstance(made, ExitBackbone):
        return made
    if isinstance(made, nn.Module) and callable(getattr(made, "forward_intermediates", None)):
        from exitflow.stages.core.nets.timm_backbone import IntermediatesBackbone

        try:
            return IntermediatesBackbone(made, (spec.in_chans, spec.img_size, spec.img_size))
        except ValueError as e:
            raise ValueError(f"net spec field `backbone`: {spec.backbone!r} returned a model with forward_intermediates, "
                             f"which exitflow cannot cut into blocks: {e}") from None
    raise ValueError(f"net spec field `backbone`: {spec.backbone!r} returned {_described(made)}; it must return {NEEDS}")


def _described(made: Any) -> str:
    kind = type(made)
    name = f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__qualname__
    if not isinstance(made, nn.Module):
        return f"{_short(repr(made))} (of type {name}), not a torch module"
    has = [a for a in PROTOCOL if hasattr(made, a)]
    if len(has) == len(PROTOCOL):
        return f"a {name}, which has {', '.join(PROTOCOL)} but is not an ExitBackbone subclass"
    lacks = [a for a in PROTOCOL if a not in has]
    return f"a {name} (a torch module without {', '.join(lacks)}, and no forward_intermediates)"


def check_backbone(backbone: ExitBackbone, spec: NetSpec) -> None:
    """The protocol, checked on what the builder made: at least two registered blocks, parameters, and one
    eval-mode pass on a single blank input ending in logits for the data set's classes."""
    name = spec.backbone
    try:
        blocks = list(backbone.blocks)
    except Exception as e:  # noqa: BLE001 - `blocks` is the user's: a property may raise anything
        raise ValueError(f"net spec field `backbone`: {name!r}: `blocks` is not a sequence of modules ({_message(e)})") from None
    if len(blocks) < 2 or not all(isinstance(b, nn.Module) for b in blocks):
        raise ValueError(f"net spec field `backbone`: {name!r}: `blocks` must hold at least 2 modules (an IC follows a block "
                         f"before the last), got {len(blocks)} {'modules' if all(isinstance(b, nn.Module) for b in blocks) else 'items, not all modules'}")
    registered = {id(m) for m in backbone.modules()}
    if not all(id(b) in registered for b in blocks):
        raise ValueError(f"net spec field `backbone`: {name!r}: its blocks are not registered in the backbone (hold them "
                         "in an nn.ModuleList or nn.Sequential attribute), so their weights would be neither trained nor saved")
    if next(backbone.parameters(), None) is None:
        raise ValueError(f"net spec field `backbone`: {name!r}: the backbone has no parameters")
    logits = _one_pass(backbone, spec)
    if tuple(logits.shape) != (1, spec.num_classes):
        raise ValueError(f"net spec field `backbone`: {name!r}: forward_head gives logits of shape {tuple(logits.shape)} for one "
                         f"input; the data set has {spec.num_classes} classes: expected (1, {spec.num_classes})")


@torch.no_grad()
def _one_pass(backbone: ExitBackbone, spec: NetSpec) -> Tensor:
    """stem -> every block -> head on one blank (in_chans, img_size, img_size) input, in eval mode (the
    modules' modes restored after), naming the part that fails."""
    modes = {m: m.training for m in backbone.modules()}
    param = next(backbone.parameters())
    backbone.eval()
    part = "forward_stem"
    try:
        h = backbone.start(torch.zeros(1, spec.in_chans, spec.img_size, spec.img_size, device=param.device, dtype=param.dtype),
                           backbone.num_blocks)
        for number, block in enumerate(backbone.blocks, start=1):
            part = f"block {number}"
            h = block(h)
            backbone.ic_input(h)
        part = "forward_head"
        out = backbone.forward_head(h)
    except Exception as e:  # noqa: BLE001 - the user's forward may raise anything
        raise ValueError(f"net spec field `backbone`: {spec.backbone!r}: {part} fails on one {spec.in_chans}x{spec.img_size}x"
                         f"{spec.img_size} input (the data set's): {type(e).__name__}: {_message(e)}") from None
    finally:
        for module, training in modes.items():
            module.training = training
    if not isinstance(out, Tensor):
        raise ValueError(f"net spec field `backbone`: {spec.backbone!r}: forward_head returned a {type(out).__name__}, "
                         "not a tensor of logits")
    return out


def _message(e: BaseException) -> str:
    """The exception's message on one line (a refusal is one line), cut at MAX_MESSAGE characters."""
    return _short(" ".join(str(e).split()) or type(e).__name__, MAX_MESSAGE)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _arguments(args: dict[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"
