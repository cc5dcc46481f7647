"""The early-exit methods' one registry: `net.method` names one of them.

A method is a subclass of `ExitMethod` (`stages.core.nets.exit_method`: the protocol, SDN's
behaviour by default) in a module of its own, registered here once: `sdn`, `pabee` (depth-weighted
loss), `gpf` (the past-future aggregator and its imitation loss), `ztw` (cascading ICs and the
fitted geometric ensemble), `jei_dnn` (fitted exit gates and their curve). docs/methods.md says what
each trains in which phase, and how to add one.
"""

from __future__ import annotations

from collections.abc import Iterable

from exitflow.stages.core.nets.exit_method import ExitLosses, ExitMethod, MethodCurve, MethodParts, depth_weights, each_exit_alone
from exitflow.stages.core.nets.gpf import GPF
from exitflow.stages.core.nets.jei_dnn import JEIDNN
from exitflow.stages.core.nets.pabee import PABEE
from exitflow.stages.core.nets.sdn import SDN
from exitflow.stages.core.nets.ztw import ZTW
from exitflow.stages.core.registry import Registry

__all__ = ["METHODS", "ExitLosses", "ExitMethod", "MethodCurve", "MethodParts", "depth_weights", "each_exit_alone",
           "get_method", "method_curves", "register_method"]

METHODS: Registry[ExitMethod] = Registry("method")


def register_method(method: ExitMethod) -> ExitMethod:
    """Register one instance of a method under its `name` (a name may be registered once)."""
    return METHODS.register(method.name, method)


def get_method(name: str) -> ExitMethod:
    try:
        return METHODS.get(name)
    except ValueError as e:
        raise ValueError(f"net spec field `method`: {e}") from None


for _method in (SDN(), PABEE(), GPF(), ZTW(), JEIDNN()):
    register_method(_method)


def method_curves(names: Iterable[str]) -> tuple[str, ...]:
    """The names of the methods' own curves (JEI-DNN's "gates"), in order, for the methods named."""
    return tuple(dict.fromkeys(c.name for m in map(get_method, names) for c in m.curves()))
