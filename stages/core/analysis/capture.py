"""Forward hooks that record modules' outputs while a batch goes through a net (the analyses' probe)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from torch import Tensor, nn

K = TypeVar("K", bound=Hashable)


@contextmanager
def capture_outputs(modules: Iterable[tuple[K, nn.Module]], view: Callable[[Any], Tensor] = lambda out: out) -> Iterator[dict[K, Tensor]]:
    """While inside, each (key, module) records its output (`view` of it: a backbone's `ic_input` for
    a block whose output is not one tensor), flattened per sample, on CPU, in call order."""
    outputs: dict[K, Tensor] = {}
    handles = []
    for key, module in modules:
        def hook(_: nn.Module, __: tuple[Tensor, ...], out: Any, key: K = key) -> None:
            outputs[key] = view(out).detach().flatten(1).float().cpu()
        handles.append(module.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
