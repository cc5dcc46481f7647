"""L2W (stages.core.l2w): its pieces against hand computations and the optimizers it mimics, and
phases that train with it (learning, resume, DDP, BatchNorm statistics untouched by the meta step)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from helpers import digits_net
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Subset

from exitflow.stages.core.data import Splits, make_loader
from exitflow.stages.core.l2w import (L2W, WeightPredictor, centred_weights, exit_assignment, exit_distribution,
                             lookahead, meta_loss)
from exitflow.stages.core.loop import EpochReport, PhaseConfig, PhaseResult, evaluate_exits, fit_phase
from exitflow.stages.core.phase_config import L2WSettings
from exitflow.stages.core.regimes import per_sample_weighted, phase_objective, prepare_phase

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
L2W_CFG = PhaseConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=64, max_epochs=3, patience=10,
                      loss_weighting="l2w", l2w_hidden=32, l2w_meta_lr=1e-3)


def _fit(net: nn.Module, phase: str, cfg: PhaseConfig, splits: Splits, size: int | None = None,
         **kwargs: object) -> tuple[PhaseResult, list[EpochReport]]:
    reports: list[EpochReport] = []
    data = splits.train if size is None else Subset(splits.train, range(size))
    train = make_loader(data, batch_size=cfg.batch_size, shuffle=True, seed=0)
    val = make_loader(splits.val, batch_size=512, shuffle=False, seed=0)
    return fit_phase(net, phase, cfg, train, val, CPU, on_epoch=reports.append, **kwargs), reports


# --- the pieces ---------------------------------------------------------------------------------


def test_exit_distribution_is_the_papers_geometric_target() -> None:
    q = exit_distribution(4, 0.75)
    expected = torch.tensor([0.75 ** k for k in range(1, 5)])
    assert torch.allclose(q, expected / expected.sum())
    assert math.isclose(float(q.sum()), 1.0, rel_tol=1e-6) and bool((q[:-1] > q[1:]).all())


def test_centred_weights_average_one_and_stay_within_two_epsilon() -> None:
    raw = torch.tanh(torch.randn(32, 4, generator=torch.Generator().manual_seed(0)) * 3)
    w = centred_weights(raw, 0.3)
    assert math.isclose(float(w.mean()), 1.0, abs_tol=1e-6)
    assert float(w.min()) >= 1 - 0.6 - 1e-6 and float(w.max()) <= 1 + 0.6 + 1e-6
    assert torch.allclose(w - w.mean(), 0.3 * (raw - raw.mean()))


def _reference_assignment(logits: list[Tensor], shares: Tensor) -> list[list[int]]:
    """One sample at a time, as the paper describes it: each exit ranks the samples still in the
    net by confidence and keeps floor(n * q_k) of them; the last exit keeps the rest."""
    n, left, out = logits[0].shape[0], list(range(logits[0].shape[0])), []
    for k, z in enumerate(logits):
        if k == len(logits) - 1:
            out.append(sorted(left))
            break
        conf = {i: max(F.softmax(z[i], dim=0).tolist()) for i in left}
        ranked = sorted(left, key=lambda i: (-conf[i], i))
        take = ranked[: math.floor(n * float(shares[k]))]
        out.append(sorted(take))
        left = [i for i in left if i not in take]
    return out


@pytest.mark.parametrize("seed", range(5))
def test_exit_assignment_equals_a_per_sample_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = [torch.randn(37, 10, generator=gen) * 2 for _ in range(4)]
    shares = exit_distribution(4, 0.75)
    got = [sorted(idx.tolist()) for idx in exit_assignment(logits, shares)]
    assert got == _reference_assignment(logits, shares)
    assert sorted(i for part in got for i in part) == list(range(37))  # every sample exits exactly once


def test_meta_loss_sums_each_exits_mean_cross_entropy_over_its_samples() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = [torch.randn(20, 10, generator=gen) for _ in range(3)]
    y = torch.randint(0, 10, (20,), generator=gen)
    shares = exit_distribution(3, 0.75)
    parts = _reference_assignment(logits, shares)
    expected = sum(F.cross_entropy(z[idx], y[idx]) for z, idx in zip(logits, parts) if idx)
    assert torch.allclose(meta_loss(logits, y, shares), expected)


def _stepped(make: type[torch.optim.Optimizer], **kwargs: object) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small module whose optimizer has taken two steps already (momentum and moments in its state)."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    decay = [p for p in module.parameters() if p.ndim >= 2]
    rest = [p for p in module.parameters() if p.ndim < 2]
    opt = make([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=0.1, **kwargs)
    for _ in range(2):
        opt.zero_grad()
        module(torch.randn(8, 5)).pow(2).mean().backward()
        opt.step()
    return module, opt


@pytest.mark.parametrize(("make", "kwargs"), [
    (torch.optim.SGD, {"momentum": 0.9}), (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    (torch.optim.SGD, {}), (torch.optim.Adam, {}), (torch.optim.AdamW, {}),
])
def test_the_lookahead_step_equals_the_optimizers_own_step(make: type[torch.optim.Optimizer], kwargs: dict) -> None:
    module, opt = _stepped(make, **kwargs)
    x = torch.randn(8, 5)
    opt.zero_grad()
    module(x).pow(2).mean().backward()
    params = dict(module.named_parameters())
    ahead = lookahead(opt, params, {n: p.grad.clone() for n, p in params.items()})
    before = {n: p.detach().clone() for n, p in params.items()}
    opt.step()
    for name, p in params.items():
        assert torch.allclose(ahead[name], p.detach(), rtol=1e-5, atol=1e-7), name
        assert not torch.equal(p.detach(), before[name]), name


def test_the_meta_step_trains_the_predictor_and_leaves_the_net_alone(digits: Splits) -> None:
    net = digits_net(0)
    params = prepare_phase(net, "P2")
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    x, y = next(iter(make_loader(digits.train, batch_size=64, shuffle=True, seed=0)))
    state_before = {k: v.clone() for k, v in net.state_dict().items()}  # BatchNorm's running stats too
    torch.manual_seed(0)
    l2w = L2W(net.num_exits, L2WSettings(hidden=16, meta_lr=1e-2), CPU)
    wpn_before = {k: v.clone() for k, v in l2w.wpn.state_dict().items()}
    weights = torch.ones(net.num_exits)
    objective = lambda ls, w: phase_objective(per_sample_weighted(ls, w), "P2", weights)  # noqa: E731
    l2w.meta_step(net, opt, objective, net.method.losses, nn.CrossEntropyLoss(reduction="none"),
                  (x[:32], y[:32]), (x[32:], y[32:]))
    for k, v in net.state_dict().items():
        assert torch.equal(v, state_before[k]), k
    assert all(p.grad is None for p in net.parameters())
    assert opt.state == {}  # the look-ahead read the optimizer, it did not step it
    changed = [k for k, v in l2w.wpn.state_dict().items() if not torch.equal(v, wpn_before[k])]
    assert changed == list(wpn_before)  # a gradient reached every WPN tensor
    assert math.isfinite(l2w.last_meta_loss) and l2w.last_meta_loss > 0


def test_the_predictor_weighs_per_sample_and_per_exit() -> None:
    torch.manual_seed(0)
    wpn = WeightPredictor(3, 8)
    losses = torch.rand(6, 3) * 3
    w = centred_weights(wpn(losses), 0.3)
    assert w.shape == (6, 3)
    assert len({round(v, 6) for v in w.flatten().tolist()}) > 3  # not one constant per exit


# --- phases that train with it --------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["P2", "P3"])
def test_a_phase_with_l2w_learns_and_logs_its_meta_loss(digits: Splits, phase: str) -> None:
    net = digits_net(0)
    cfg = PhaseConfig(optimizer="adam", lr=5e-3, batch_size=64, max_epochs=3, patience=5, loss_weighting="l2w",
                      l2w_hidden=32)
    result, reports = _fit(net, phase, cfg, digits)
    accuracy = evaluate_exits(net, make_loader(digits.test, batch_size=512, shuffle=False, seed=0), CPU, cfg)["accuracy"]
    assert accuracy[0] > 0.5, accuracy  # the first IC learns (chance is 0.1)
    assert all(math.isfinite(m["l2w_meta_loss"]) for m in result.history)
    assert "wpn" in reports[-1].state["l2w"] and "optimizer" in reports[-1].state["l2w"]


def test_the_meta_lr_follows_the_phase_schedule(digits: Splits) -> None:
    cfg = PhaseConfig(**{**L2W_CFG.to_dict(), "schedule": "cosine", "max_epochs": 2})
    result, reports = _fit(digits_net(0), "P2", cfg, digits, size=128)
    meta_lr = reports[-1].state["l2w"]["optimizer"]["param_groups"][0]["lr"]
    factor = result.history[-1]["lr"] / cfg.lr  # the lr of the last epoch's first step
    assert 0 < meta_lr < cfg.l2w_meta_lr * factor  # cosine: the last step's factor is below the epoch's first


def test_p1_ignores_l2w(digits: Splits) -> None:
    cfg = PhaseConfig(optimizer="adam", lr=5e-3, batch_size=64, max_epochs=1, loss_weighting="l2w")
    result, reports = _fit(digits_net(0), "P1", cfg, digits, size=128)
    assert "l2w" not in reports[0].state and "l2w_meta_loss" not in result.history[0]


def test_l2w_changes_training_against_uniform(digits: Splits) -> None:
    uniform = PhaseConfig(**{**L2W_CFG.to_dict(), "loss_weighting": "uniform"})
    a, _ = _fit(digits_net(0), "P2", L2W_CFG, digits, size=256)
    b, _ = _fit(digits_net(0), "P2", uniform, digits, size=256)
    assert a.history[-1]["train_loss"] != b.history[-1]["train_loss"]


def test_resume_with_l2w_matches_an_uninterrupted_run(digits: Splits) -> None:
    full, full_reports = _fit(digits_net(0), "P2", L2W_CFG, digits, size=256)
    buffer = io.BytesIO()
    torch.save(full_reports[0].state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed, resumed_reports = _fit(digits_net(7), "P2", L2W_CFG, digits, size=256, resume=state)
    assert [r.epoch for r in resumed_reports] == [1, 2]
    for key, value in full_reports[-1].state["net"].items():
        assert torch.equal(value, resumed_reports[-1].state["net"][key]), key
    for key, value in full_reports[-1].state["l2w"]["wpn"].items():
        assert torch.equal(value, resumed_reports[-1].state["l2w"]["wpn"][key]), key
    drop = {"epoch_time", "samples_per_s"}
    assert [{k: v for k, v in m.items() if k not in drop} for m in resumed.history] == \
        [{k: v for k, v in m.items() if k not in drop} for m in full.history]


def test_resume_from_a_state_without_l2w_is_refused(digits: Splits) -> None:
    uniform = PhaseConfig(**{**L2W_CFG.to_dict(), "loss_weighting": "uniform", "max_epochs": 1})
    _, reports = _fit(digits_net(0), "P2", uniform, digits, size=64)
    with pytest.raises(ValueError, match="no L2W weight predictor"):
        _fit(digits_net(0), "P2", L2W_CFG, digits, size=64, resume=reports[0].state)


def test_l2w_under_ddp_trains_the_net_and_the_predictor(digits: Splits, process_group: None) -> None:
    net = digits_net(0)
    prepare_phase(net, "P2")
    ddp = nn.parallel.DistributedDataParallel(net)
    cfg = PhaseConfig(**{**L2W_CFG.to_dict(), "max_epochs": 1})
    result, reports = _fit(ddp, "P2", cfg, digits, size=128)
    assert result.epochs_run == 1 and math.isfinite(result.history[0]["l2w_meta_loss"])
    assert not any(k.startswith("module.") for k in reports[0].state["net"])


def test_spec_takes_l2w_settings_and_rejects_bad_ones() -> None:
    from exitflow.pipeline.spec_sections import PhaseConfig as SpecPhase

    assert SpecPhase(loss_weighting="l2w", l2w_epsilon=0.2).l2w_epsilon == 0.2
    with pytest.raises(ValueError, match="l2w_epsilon"):
        SpecPhase(l2w_epsilon=0.7)
    with pytest.raises(ValueError, match="l2w_meta_interval"):
        SpecPhase(l2w_meta_interval=0)
    with pytest.raises(ValueError, match="l2w_epsilon"):
        PhaseConfig(l2w_epsilon=0.0)
