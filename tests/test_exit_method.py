"""The early-exit method protocol (`stages.core.nets.exit_method`): SDN's defaults, what each registered
method adds to the net and which phase trains it, and the state-dict keys checkpoints were written with."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from exitflow.stages.core.nets import NetSpec, create_net
from exitflow.stages.core.nets.exit_method import ExitMethod, MethodParts
from exitflow.stages.core.nets.methods import METHODS, get_method, method_curves, register_method
from exitflow.stages.core.regimes import exit_weights, prepare_phase

SPEC = NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exits=(2, 4, 6), width=8)

# Recorded from the nets as the dataclass `ExitMethod` built them, before the protocol (resnet20, width 8,
# ICs after blocks 2, 4 and 6, 10 classes): the sha256 of the ordered state-dict keys (one per line), and
# the keys outside the backbone, in order. A checkpoint loads only into a net with the same keys, and the
# order is that of the parameters in every optimizer state written so far.
KEYS_SHA256 = {
    "sdn": "e9a7d2522079dd36196497a2214b5593b8ca8a050e4b72590168876e2c638551",
    "pabee": "e9a7d2522079dd36196497a2214b5593b8ca8a050e4b72590168876e2c638551",
    "gpf": "7eb60eb88ae9c371ce5acf8f434d16385e809136d18607e8fb99c90ea3f9bcce",
    "ztw": "9beb0aef7e8d5d42e4f5de70e1e60556fb9446c83d4fd0af6c7e21691da89c51",
    "jei_dnn": "497356fb9ffa32c9c5ffffc5bfdbfc01880174532648635bfe97fae4bb33c49f",
}

_SDN_ICS = [f"ics.{i}.{w}" for i in range(3) for w in ("mix", "fc.weight", "fc.bias")]  # SDN's head: a pooling mix, a linear map
OUTSIDE_BACKBONE = {
    "sdn": _SDN_ICS,
    "pabee": _SDN_ICS,
    "gpf": [*(f"aggregator.{w}" for w in ("project_weight", "project_bias", "gate_weight", "gate_bias", "imitators.0.0.weight",
                                          "imitators.0.0.bias", "imitators.1.0.weight", "imitators.1.0.bias", "balance.weight",
                                          "balance.bias")),
            *(f"ics.{i}.head.{w}" for i in range(3) for w in ("mix", "fc.weight", "fc.bias"))],
    "ztw": [*_SDN_ICS[:3], *(f"ics.{i}.{w}" for i in (1, 2) for w in ("head.mix", "head.fc.weight", "head.fc.bias", "norm.weight",
                                                                    "norm.bias", "cascade.weight")),
            "ensemble.log_weights", "ensemble.bias"],
    "jei_dnn": [*_SDN_ICS, *(f"gates.{w}" for w in ("weight", "bias", "lambdas", "feature_mean", "feature_std"))],
}


def _keys_sha256(keys: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


@pytest.mark.parametrize("method", sorted(KEYS_SHA256))
def test_every_method_builds_the_state_dict_keys_its_checkpoints_hold(method: str) -> None:
    net = create_net(replace(SPEC, method=method))
    keys = list(net.state_dict())
    assert [k for k in keys if not k.startswith("backbone.")] == OUTSIDE_BACKBONE[method]
    assert _keys_sha256(keys) == KEYS_SHA256[method]
    # the parameters in the same order (the optimizer's), buffers left out
    assert [n for n, _ in net.named_parameters()] == [k for k in keys if k in dict(net.named_parameters())]


def test_the_registry_holds_one_subclass_instance_per_method() -> None:
    assert {"sdn", "pabee", "gpf", "ztw", "jei_dnn"} <= set(METHODS.names())
    for name in ("sdn", "pabee", "gpf", "ztw", "jei_dnn"):
        method = get_method(name)
        assert isinstance(method, ExitMethod) and method.name == name
        assert type(method) is not ExitMethod  # one subclass each
    with pytest.raises(ValueError, match="net spec field `method`: unknown method 'nope'"):
        get_method("nope")


@pytest.mark.parametrize("name, finishes, curves, independent, trained, fitted", [
    ("sdn", False, (), True, (), ()),
    ("pabee", False, (), True, (), ()),
    ("gpf", False, (), False, ("aggregator",), ()),
    ("ztw", True, (), False, (), ("ensemble",)),
    ("jei_dnn", True, ("gates",), True, (), ("gates",)),
])
def test_what_each_method_adds_and_which_phase_trains_it(name: str, finishes: bool, curves: tuple[str, ...],
                                                         independent: bool, trained: tuple[str, ...],
                                                         fitted: tuple[str, ...]) -> None:
    method = get_method(name)
    assert method.finishes is finishes
    assert tuple(c.name for c in method.curves()) == curves == method_curves([name])
    assert method.independent is independent
    net = create_net(replace(SPEC, method=name))
    assert tuple(net.own_modules()) == trained + fitted and tuple(net.method_modules()) == fitted
    assert net.ic_modules() == [net.ics, *(getattr(net, n) for n in trained)]
    ids = {n: {id(p) for p in getattr(net, n).parameters()} for n in trained + fitted}
    for phase in ("P1", "P2", "P3"):
        params = {id(p) for p in prepare_phase(net, phase)}
        for n in trained:  # with the ICs: P2 and P3
            assert (ids[n] <= params) is (phase != "P1"), (n, phase)
        for n in fitted:  # by no phase: the method's `finish` fits them
            assert not ids[n] & params, (n, phase)
    for other in {"aggregator", "ensemble", "gates"} - set(trained + fitted):
        assert not hasattr(net, other)  # a net holds only what its method builds


def test_the_defaults_are_sdns() -> None:
    class Plain(ExitMethod):
        name = "toy_plain"

    plain, sdn = Plain(), get_method("sdn")
    assert plain.head is None and plain.independent and not plain.finishes and plain.curves() == ()
    assert plain.loss_weights(4).tolist() == [1.0] * 4 and exit_weights("han", 4, method=plain).equal(exit_weights("han", 4))
    register_method(plain)
    try:
        torch.manual_seed(0)
        a = create_net(replace(SPEC, method="toy_plain"))
        torch.manual_seed(0)
        b = create_net(SPEC)
        assert list(a.state_dict()) == list(b.state_dict())
        x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
        with torch.no_grad():
            for za, zb in zip(a.eval()(x), b.eval()(x)):
                assert torch.equal(za, zb)
            losses = [l.item() for l in plain.losses(a(x), y, nn.CrossEntropyLoss())]
            assert losses == [l.item() for l in sdn.losses(b(x), y, nn.CrossEntropyLoss())]
        assert plain.aux_loss(a) is None
        with pytest.raises(NotImplementedError):
            plain.finish(a, [], lambda t: t)
    finally:
        METHODS.unregister("toy_plain")


def test_a_method_builds_its_heads_and_names_its_modules() -> None:
    """`build` gets a maker of the study's heads; a module name the net uses already, or a wrong
    number of heads, is refused."""
    class Doubled(ExitMethod):
        name = "toy_doubled"
        independent = False

        def build(self, make_ics: Any, num_exits: int, num_classes: int) -> MethodParts:
            return MethodParts(make_ics(2 * num_classes), trained={"fold": nn.Linear(2 * num_classes, num_classes)})

        def combine(self, net: Any, raw: Sequence[Tensor]) -> Tensor:
            return raw[-1] if len(raw) == net.num_exits else net.fold(raw[-1])

    class Clash(ExitMethod):
        name = "toy_clash"

        def build(self, make_ics: Any, num_exits: int, num_classes: int) -> MethodParts:
            return MethodParts(make_ics(num_classes), fitted={"backbone": nn.Linear(1, 1)})

    class Short(ExitMethod):
        name = "toy_short"

        def build(self, make_ics: Any, num_exits: int, num_classes: int) -> MethodParts:
            return MethodParts(make_ics(num_classes)[1:])

    for method in (Doubled(), Clash(), Short()):
        register_method(method)
    try:
        net = create_net(replace(SPEC, method="toy_doubled")).eval()
        with torch.no_grad():
            x = torch.randn(3, 1, 8, 8)
            assert [tuple(r.shape) for r in net.raw_exits(x)] == [(3, 20)] * 3 + [(3, 10)]
            assert [tuple(z.shape) for z in net(x)] == [(3, 10)] * 4
            assert torch.equal(net.forward_until(x, 1), net(x)[1])
        assert list(net.own_modules()) == ["fold"] and any(m is net.fold for m in net.ic_modules())
        assert [k for k in net.state_dict() if not k.startswith("backbone.")][:2] == ["fold.weight", "fold.bias"]
        with pytest.raises(ValueError, match="module name 'backbone' is taken"):
            create_net(replace(SPEC, method="toy_clash"))
        with pytest.raises(ValueError, match="built 2 IC heads for 3 ICs"):
            create_net(replace(SPEC, method="toy_short"))
    finally:
        for name in ("toy_doubled", "toy_clash", "toy_short"):
            METHODS.unregister(name)


def test_a_copied_net_keeps_the_registered_method() -> None:
    net = create_net(replace(SPEC, method="ztw"))
    assert copy.deepcopy(net).method is get_method("ztw")
