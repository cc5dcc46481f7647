"""The phase loop: config, optimizer and schedule, early stopping, exact resume, DDP, learning."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from helpers import digits_net
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from exitflow.stages.core.data import Splits, make_loader
from exitflow.stages.core.faults import hit, make_nonfinite, parse_plan
from exitflow.stages.core.loop import (
    EarlyStopping,
    EpochReport,
    PhaseConfig,
    PhaseResult,
    build_optimizer,
    build_scheduler,
    evaluate_exits,
    fit_phase,
    lr_factor,
    unwrap,
)
from exitflow.stages.core.regimes import REGIME_PHASES, prepare_phase

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CPU = torch.device("cpu")
TIMING_KEYS = {"epoch_time", "samples_per_s"}


def _train_loader(splits: Splits, batch_size: int, size: int | None = None) -> DataLoader:
    data = splits.train if size is None else Subset(splits.train, range(size))
    return make_loader(data, batch_size=batch_size, shuffle=True, seed=0)


def _eval_loader(data: torch.utils.data.Dataset) -> DataLoader:
    return make_loader(data, batch_size=512, shuffle=False, seed=0)


def _test_accuracy(net: nn.Module, splits: Splits) -> list[float]:
    return evaluate_exits(net, _eval_loader(splits.test), CPU, PhaseConfig())["accuracy"]


def _untimed(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in history]


# --- config, optimizer, schedule ------------------------------------------------------------


def test_phase_config_validates_and_round_trips() -> None:
    cfg = PhaseConfig(optimizer="adamw", lr=1e-3, grad_clip=1.0, loss_weighting="han")
    assert PhaseConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="optimizer"):
        PhaseConfig(optimizer="lion")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="selection"):
        PhaseConfig(selection="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr"):
        PhaseConfig(lr=0.0)
    with pytest.raises(ValueError, match="unknown field"):
        PhaseConfig.from_dict({"lr": 0.1, "epochs": 3})


@pytest.mark.parametrize("name", ["sgd", "adamw", "adam"])
def test_build_optimizer_decays_only_matrices(name: str) -> None:
    net = digits_net(0)
    params = list(net.parameters())
    opt = build_optimizer(params, PhaseConfig(optimizer=name, lr=0.01, weight_decay=0.1))
    assert type(opt).__name__.lower() == name
    seen = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in seen} == {id(p) for p in params} and len(seen) == len(params)
    for group in opt.param_groups:
        assert all((p.ndim >= 2) == (group["weight_decay"] == 0.1) for p in group["params"])
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer([], PhaseConfig())


def test_lr_factor_warmup_cosine_and_step() -> None:
    cos = PhaseConfig(schedule="cosine", warmup_epochs=1, max_epochs=5)
    assert lr_factor(0, cos, 10) == pytest.approx(0.1)
    assert lr_factor(9, cos, 10) == pytest.approx(1.0)
    assert lr_factor(10, cos, 10) == pytest.approx(1.0)
    assert lr_factor(30, cos, 10) == pytest.approx(0.5)
    assert lr_factor(50, cos, 10) == pytest.approx(0.0, abs=1e-12)
    step = PhaseConfig(schedule="step", step_epochs=2, step_gamma=0.5)
    assert [lr_factor(s, step, 10) for s in (0, 19, 20, 40)] == pytest.approx([1.0, 1.0, 0.5, 0.25])
    assert lr_factor(1000, PhaseConfig(schedule="none"), 10) == 1.0


def test_scheduler_steps_per_optimizer_step_and_resumes() -> None:
    cfg = PhaseConfig(lr=1.0, schedule="cosine", max_epochs=2)
    param = nn.Parameter(torch.zeros(2, 2))
    opt = build_optimizer([param], cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=4)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    opt2 = build_optimizer([param], cfg)
    sched2 = build_scheduler(opt2, cfg, steps_per_epoch=4)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 8)))


# --- early stopping -------------------------------------------------------------------------


def test_early_stopping_waits_for_no_exit_improving() -> None:
    stopper = EarlyStopping(patience=2)
    # (accuracies of two exits, selection score) per epoch -> (score improved, stop)
    script = [
        ((0.5, 0.5), 0.5, True, False),  # first epoch: everything is an improvement
        ((0.6, 0.4), 0.4, False, False),  # exit 0 improves: patience resets, score does not
        ((0.55, 0.45), 0.45, False, False),  # no exit beats its best: 1 bad epoch
        ((0.6, 0.5), 0.55, True, True),  # ties are not improvements: 2 bad epochs -> stop
    ]
    for epoch, (accs, score, improved, stop) in enumerate(script):
        assert stopper.update(epoch, accs, score) is improved, epoch
        assert stopper.stop is stop, epoch
    assert stopper.best_accuracies == [0.6, 0.5] and stopper.best_epoch == 3


def test_early_stopping_resets_and_resumes_from_state() -> None:
    stopper = EarlyStopping(patience=3)
    for epoch, acc in enumerate([0.3, 0.2, 0.2, 0.4, 0.1]):
        stopper.update(epoch, [acc], acc)
    assert stopper.epochs_without_improvement == 1 and not stopper.stop
    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(stopper.state_dict())
    for epoch, acc in enumerate([0.35, 0.39], start=5):
        assert resumed.update(epoch, [acc], acc) is False
    assert resumed.stop and resumed.best_epoch == 3 and resumed.best_score == 0.4
    with pytest.raises(ValueError, match="expected 1"):
        resumed.update(7, [0.1, 0.2], 0.1)


# --- evaluation -----------------------------------------------------------------------------


class _FixedLogits(nn.Module):
    """Two exits whose logits are fixed functions of the input (for exact accuracy checks)."""

    num_exits = 2

    def forward(self, x: Tensor) -> list[Tensor]:
        return [x, -x]


def test_evaluate_exits_counts_per_exit() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0, 0])
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    out = evaluate_exits(_FixedLogits(), loader, CPU, PhaseConfig())
    assert out["accuracy"] == pytest.approx([3 / 5, 2 / 5])
    expected = [nn.functional.cross_entropy(z, y).item() for z in (x, -x)]
    assert out["loss"] == pytest.approx(expected) and out["num_samples"] == 5


# --- fit_phase: resume, early stopping, DDP -------------------------------------------------


def _fit(
    net: nn.Module, phase: str, cfg: PhaseConfig, splits: Splits, size: int | None = None, **kwargs: object
) -> tuple[PhaseResult, list[EpochReport]]:
    reports: list[EpochReport] = []
    result = fit_phase(net, phase, cfg, _train_loader(splits, cfg.batch_size, size), _eval_loader(splits.val),
                       CPU, on_epoch=reports.append, **kwargs)
    return result, reports


def test_resume_matches_an_uninterrupted_run(digits: Splits) -> None:
    cfg = PhaseConfig(optimizer="sgd", lr=0.05, weight_decay=5e-4, batch_size=64, max_epochs=4, patience=10,
                      schedule="cosine", warmup_epochs=1, grad_clip=1.0, loss_weighting="kaya", label_smoothing=0.1)
    full, full_reports = _fit(digits_net(0), "P2", cfg, digits, size=384)

    buffer = io.BytesIO()
    torch.save(full_reports[1].state, buffer)  # what a checkpoint would hold
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["net"])
    assert state["epoch"] == 1 and len(state["history"]) == 2

    resumed_net = digits_net(123)  # different init and RNG: everything must come from `state`
    resumed, resumed_reports = _fit(resumed_net, "P2", cfg, digits, size=384, resume=state)
    assert [r.epoch for r in resumed_reports] == [2, 3]
    for key, value in full_reports[-1].state["net"].items():
        assert torch.equal(value, resumed_reports[-1].state["net"][key]), key
    for key, value in full.best_state_dict.items():
        assert torch.allclose(value.float(), resumed.best_state_dict[key].float(), rtol=0, atol=1e-7), key
        assert torch.allclose(value.float(), resumed_net.state_dict()[key].float(), rtol=0, atol=1e-7), key
    assert _untimed(resumed.history) == _untimed(full.history)
    assert (resumed.best_epoch, resumed.epochs_run) == (full.best_epoch, full.epochs_run) == (full.best_epoch, 4)
    assert resumed.best_val == full.best_val and "val_acc_final" in full.best_val


def test_fit_phase_stops_early_and_restores_the_best_state(digits: Splits) -> None:
    # P3 with a negligible lr: the ICs' accuracy cannot improve after the first epoch.
    cfg = PhaseConfig(optimizer="sgd", lr=1e-12, batch_size=64, max_epochs=10, patience=2)
    net = digits_net(0)
    backbone_before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    result, reports = _fit(net, "P3", cfg, digits, size=128)
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 0
    assert [r.stop for r in reports] == [False, False, True] and reports[0].improved
    assert {"val_acc_0", "val_acc_1", "val_acc_2", "val_acc_mean", "val_acc_final", "lr", "train_loss",
            "epoch_time"} <= set(reports[0].metrics)
    # The final head is frozen in P3: early stopping watches the ICs alone, and the epoch is scored by
    # the one selection scorer (stages.core.selection), as a search ranks it: `mean` over every exit,
    # the frozen exit's constant accuracy included (it never changes which epoch is best).
    m = reports[0].metrics
    assert m["val_score"] == pytest.approx((m["val_acc_0"] + m["val_acc_1"] + m["val_acc_2"]) / 3)
    for key, value in net.state_dict().items():
        assert torch.equal(value, result.best_state_dict[key]), key
    for key, value in net.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key


@pytest.mark.parametrize(("phase", "enabled"), [("P1", False), ("P2", True), ("P3", False)])
def test_gradient_equilibrium_is_switched_on_for_p2_only(digits: Splits, phase: str, enabled: bool) -> None:
    net = digits_net(0)
    net.set_gradient_equilibrium(not enabled)  # a stale setting from an earlier phase
    cfg = PhaseConfig(lr=0.01, batch_size=64, max_epochs=1, loss_weighting="gradient_equilibrium")
    _fit(net, phase, cfg, digits, size=64)
    assert net.gradient_equilibrium is enabled


def test_bf16_and_channels_last_are_no_ops_on_cpu(digits: Splits) -> None:
    plain = PhaseConfig(lr=0.01, batch_size=64, max_epochs=1)
    fast = PhaseConfig(lr=0.01, batch_size=64, max_epochs=1, bf16=True, channels_last=True)
    a, b = digits_net(0), digits_net(0)
    _fit(a, "P2", plain, digits, size=64)
    _fit(b, "P2", fast, digits, size=64)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_fit_phase_under_ddp(digits: Splits, process_group: None) -> None:
    cfg = PhaseConfig(optimizer="sgd", lr=0.05, batch_size=64, max_epochs=1, patience=5)
    net = digits_net(0)
    backbone_before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    prepare_phase(net, "P3")  # before the wrap: DDP must only see the ICs
    ddp = nn.parallel.DistributedDataParallel(net)
    result, reports = _fit(ddp, "P3", cfg, digits, size=128)
    assert unwrap(ddp) is net and result.epochs_run == 1
    assert set(reports[0].state["net"]) == set(net.state_dict())
    for key, value in net.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key

    wrapped_too_early = nn.parallel.DistributedDataParallel(digits_net(1))
    with pytest.raises(RuntimeError, match="before wrapping"):
        fit_phase(wrapped_too_early, "P3", cfg, [], [], CPU)


# --- learning: every regime reaches > 90% on digits at its final exit ------------------------

# Adam, cosine, 6 epochs per phase: ~0.3 s/epoch uncontended on 2 cores; final-exit test
# accuracy 0.950-0.989 over seeds 0-2 in every regime, so 0.9 leaves a wide margin.
LEARN = PhaseConfig(optimizer="adam", lr=5e-3, batch_size=64, max_epochs=6, patience=6, schedule="cosine")


def _train(net: nn.Module, phase: str, splits: Splits) -> PhaseResult:
    return fit_phase(net, phase, LEARN, _train_loader(splits, LEARN.batch_size), _eval_loader(splits.val), CPU)


@pytest.fixture(scope="module")
def p1_state(digits: Splits) -> dict[str, Tensor]:
    """The P1 backbone that disjoint and mixed share (trained once, as in the DAG)."""
    net = digits_net(0)
    result = _train(net, "P1", digits)
    assert result.best_val["val_acc_final"] > 0.9
    return result.best_state_dict


@pytest.mark.parametrize("regime", ["joint", "disjoint", "mixed"])
def test_regime_learns_digits(regime: str, digits: Splits, p1_state: dict[str, Tensor]) -> None:
    phases = REGIME_PHASES[regime]
    net = digits_net(0)
    if phases[0] == "P1":
        net.load_state_dict(p1_state)
        p1_accuracy = _test_accuracy(net, digits)
        phases = phases[1:]
    for phase in phases:
        _train(net, phase, digits)
    accuracy = _test_accuracy(net, digits)
    assert accuracy[-1] > 0.9, accuracy
    assert min(accuracy) > 0.8, accuracy  # the ICs learned too
    if regime == "disjoint":
        assert accuracy[-1] == p1_accuracy[-1]  # P3 cannot touch the final exit


def test_a_non_finite_loss_stops_the_phase_and_says_where(digits: Splits, tmp_path: Path) -> None:
    # The fault hook's `nonfinite` action spoils the weights after epoch 1's step 2 (of 4: 256 samples),
    # so step 3's loss is NaN on every machine: no reliance on when a huge lr happens to blow up.
    plan = parse_plan(f"point=train.mid_epoch,action=nonfinite,epoch=1,marker={tmp_path / 'fired'}")
    net = digits_net(0)

    def on_step(epoch: int, step: int, steps: int) -> None:
        if step == steps // 2 and hit(plan, "train.mid_epoch", epoch=epoch):
            make_nonfinite(net)

    cfg = PhaseConfig(optimizer="sgd", lr=0.05, batch_size=64, max_epochs=5, patience=6, schedule="none")
    result, reports = _fit(net, "P2", cfg, digits, size=256, on_step=on_step)
    last = reports[-1].metrics
    epoch, step = int(last["epoch"]), int(last["nonfinite_step"])
    assert (epoch, step) == (1, 3)
    assert result.diverged == "non-finite loss at epoch 1, step 3"
    assert [r.metrics["nonfinite_step"] for r in reports[:-1]] == [-1.0] * epoch  # the epochs before were finite
    assert result.epochs_run == epoch + 1 and reports[-1].stop and not reports[-1].improved  # stopped, never "best"
    assert last["val_score"] == -1.0
    # A resumed diverged phase stays stopped: nothing trains on from garbage weights.
    resumed, more = _fit(digits_net(0), "P2", cfg, digits, size=256, resume=reports[-1].state)
    assert more == [] and resumed.diverged == result.diverged


def test_every_epoch_is_scored_by_the_one_selection_scorer(digits: Splits) -> None:
    from exitflow.stages.core.loop import exit_fractions
    from exitflow.stages.core.selection import selection_score

    net = digits_net(0)
    fractions = exit_fractions(net)
    assert len(fractions) == 3 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    for selection in ("auc", "final"):
        result, reports = _fit(digits_net(0), "P2", PhaseConfig(lr=3e-3, batch_size=64, max_epochs=2, selection=selection),
                               digits, size=128)
        for r in reports:
            accuracies = [r.metrics[f"val_acc_{k}"] for k in range(3)]
            assert r.metrics["val_score"] == pytest.approx(selection_score(accuracies, selection, "P2", fractions))
        scores = [r.metrics["val_score"] for r in reports]
        assert result.best_epoch == scores.index(max(scores))


def test_a_healthy_phase_records_no_divergence(digits: Splits) -> None:
    result, reports = _fit(digits_net(0), "P1", PhaseConfig(lr=3e-3, batch_size=64, max_epochs=1), digits, size=128)
    assert result.diverged == "" and reports[0].metrics["nonfinite_step"] == -1
