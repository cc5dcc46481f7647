"""Gradient dominance (paper Fig. 4): the maths, and its measurement inside P2 training."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from exitflow.stages.core.analysis.gradient_dominance import dominance, exit_gradients
from exitflow.stages.core.loop import PhaseConfig, fit_phase
from exitflow.stages.core.nets import NetSpec, create_net
from exitflow.stages.core.regimes import exit_weights, prepare_phase


def _net() -> nn.Module:
    torch.manual_seed(0)
    return create_net(NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exits=(3, 6), width=8))


def _data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_per_exit_gradients_sum_to_the_total_gradient() -> None:
    net = _net()
    params = prepare_phase(net, "P2")
    backbone = [p for p in net.backbone.parameters() if p.requires_grad]
    x, y = _data()
    weights = exit_weights("kaya", net.num_exits, progress=0.5)  # unequal weights: the sum must carry them
    losses = [nn.functional.cross_entropy(z, y) for z in net(x)]
    grads = exit_gradients(losses, weights, backbone)
    total = torch.autograd.grad(sum(w * l for w, l in zip(weights, losses)), backbone)
    torch.testing.assert_close(torch.stack(grads).sum(0), torch.cat([g.reshape(-1) for g in total]), rtol=1e-4, atol=1e-6)  # float32 sums
    assert all(p.grad is None for p in params)  # measuring leaves the optimizer's gradients alone
    assert grads[0].abs().sum() > 0  # an IC reaches the blocks before it


def test_with_one_exit_the_dominance_is_one() -> None:
    g = torch.randn(100)
    assert dominance([g]) == [pytest.approx(1.0)]
    assert dominance([g, -0.5 * g]) == [pytest.approx(1.0), pytest.approx(-1.0)]  # total points along g
    assert dominance([torch.zeros(5), torch.ones(5)]) == [0.0, pytest.approx(1.0)]


def test_p2_training_logs_each_exit_dominance_per_epoch_and_other_phases_do_not() -> None:
    x, y = _data(96)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    cfg = PhaseConfig(optimizer="adam", lr=1e-3, max_epochs=2, patience=3, gradient_dominance_every=2)
    p2 = fit_phase(_net(), "P2", cfg, loader, loader, "cpu")
    for m in p2.history:
        cos = [m[f"grad_cos_{k}"] for k in range(3)]
        assert all(-1.0 <= c <= 1.0 for c in cos) and cos[-1] > 0
    p3 = fit_phase(_net(), "P3", cfg, loader, loader, "cpu")
    assert not any(k.startswith("grad_cos_") for m in p3.history for k in m)


def test_measuring_does_not_change_training() -> None:
    x, y = _data(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    base = PhaseConfig(optimizer="sgd", lr=0.05, max_epochs=1, patience=2)
    plain = fit_phase(_net(), "P2", base, loader, loader, "cpu")
    measured = fit_phase(_net(), "P2", PhaseConfig(**{**base.to_dict(), "gradient_dominance_every": 1}), loader, loader, "cpu")
    for name, t in plain.best_state_dict.items():
        torch.testing.assert_close(measured.best_state_dict[name], t, rtol=0, atol=0)
