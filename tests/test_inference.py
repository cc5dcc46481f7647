"""Dynamic early-exit inference (`stages.core.inference`) on a trained digits net: it takes the exits
and predictions the simulated curve counts, and later blocks run only on the samples still in."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import torch
from torch import Tensor

from exitflow.stages.core.data import DataSpec, load_splits, make_loader
from exitflow.stages.core.evaluation import collect_logits, exit_criterion, exit_indices, threshold_curve, threshold_grid
from exitflow.stages.core.flops import exit_flops
from exitflow.stages.core.inference import EarlyExitClassifier, early_exit_forward, early_exit_predict
from exitflow.stages.core.loop import PhaseConfig, fit_phase, seed_everything
from exitflow.stages.core.nets import create_net
from exitflow.stages.core.nets.methods import METHODS, ExitMethod, register_method
from exitflow.stages.core.nets.multi_exit import MultiExitNet
from exitflow.stages.core.nets.spec import NetSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exits=(2, 4, 6), width=8)
CRITERIA = ["max_softmax", "entropy", "patience"]


@pytest.fixture(scope="module")
def running_mean() -> Iterator[ExitMethod]:
    """A toy ensembling method, registered for this module: exit k answers with the mean of exits 0..k."""
    class RunningMean(ExitMethod):
        name = "toy_running_mean"
        independent = False

        def combine(self, net: MultiExitNet, raw: Sequence[Tensor]) -> Tensor:
            return torch.stack(list(raw)).mean(dim=0)

    method = register_method(RunningMean())
    yield method
    METHODS.unregister(method.name)


@pytest.fixture(scope="module")
def splits():  # noqa: ANN201
    return load_splits(DataSpec(name="digits", augment=False), seed=0)


def _trained(method: str, splits) -> MultiExitNet:  # noqa: ANN001
    """A net trained jointly for a few epochs: confident enough that thresholds spread its samples."""
    seed_everything(0)
    net = create_net(dataclasses.replace(SPEC, method=method))
    cfg = PhaseConfig(optimizer="adam", lr=3e-3, batch_size=64, max_epochs=4, patience=5, selection="mean")
    train = make_loader(splits.train, batch_size=64, shuffle=True, seed=0)
    fit_phase(net, "P2", cfg, train, make_loader(splits.val, 512, shuffle=False, seed=0), "cpu")
    return net.eval()


@pytest.fixture(scope="module")
def nets(splits, running_mean: ExitMethod) -> dict[str, MultiExitNet]:  # noqa: ANN001
    return {m: _trained(m, splits) for m in ("sdn", running_mean.name, "ztw")}


def _test_batches(splits, batch_size: int = 128):  # noqa: ANN001, ANN202
    return make_loader(splits.test, batch_size=batch_size, shuffle=False, seed=0)


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("method", ["sdn", "toy_running_mean", "ztw"])
def test_dynamic_inference_takes_the_simulated_exits_and_predictions(nets, splits, method: str, criterion: str) -> None:  # noqa: ANN001
    net = nets[method]
    logits, labels = collect_logits(net, _test_batches(splits), "cpu")
    conf = exit_criterion(logits, criterion)
    thresholds = threshold_grid(criterion, logits.shape[-1], 12, "quantile", conf)
    simulated_exits = exit_indices(conf, thresholds, criterion)  # [T, N]
    curve = threshold_curve(logits, labels, exit_flops(net), criterion, 12, "quantile")
    spread = set()
    for t, threshold in enumerate(thresholds):
        dynamic = early_exit_predict(net, _test_batches(splits), float(threshold), criterion)
        expected_exits = torch.as_tensor(simulated_exits[t])
        assert torch.equal(dynamic.exits, expected_exits), f"threshold {threshold}"
        expected_pred = logits.argmax(dim=-1).gather(0, expected_exits[None]).squeeze(0)
        assert torch.equal(dynamic.predictions, expected_pred), f"threshold {threshold}"
        # the curve's accuracy and cost, from the exits the dynamic path took
        assert (dynamic.predictions == labels).double().mean().item() == curve["accuracy"][t]
        assert np.asarray(exit_flops(net), dtype=np.float64)[dynamic.exits.numpy()].mean() == pytest.approx(curve["flops"][t], rel=1e-12)
        spread.update(dynamic.exits.tolist())
    assert spread == set(range(net.num_exits))  # not vacuous: the thresholds send samples to every exit


def test_later_blocks_run_only_on_the_samples_still_in(nets, splits) -> None:  # noqa: ANN001
    net = nets["sdn"]
    x = torch.stack([splits.test[i][0] for i in range(200)])
    entering: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: entering.append(args[0].shape[0])) for b in net.backbone.blocks]
    try:
        out = early_exit_forward(net, x, 0.9, "max_softmax")
    finally:
        for h in hooks:
            h.remove()
    # block b (1-based) sees the samples that did not leave at an IC after blocks < b
    expected = [int((out.exits >= sum(ic < b for ic in net.ic_blocks)).sum()) for b in range(1, net.num_blocks + 1)]
    assert entering == expected[: len(entering)]
    assert entering[0] == 200 and entering[-1] < 200  # samples left, and later blocks ran on fewer


def test_batch_size_does_not_change_a_decision(nets, splits) -> None:  # noqa: ANN001
    net = nets["toy_running_mean"]
    batched = early_exit_predict(net, _test_batches(splits, 128), 0.8, "entropy")
    one_by_one = early_exit_predict(net, _test_batches(splits, 1), 0.8, "entropy")
    assert torch.equal(batched.exits, one_by_one.exits) and torch.equal(batched.predictions, one_by_one.predictions)


def test_the_classifier_module_predicts_and_records_exits(nets, splits) -> None:  # noqa: ANN001
    net = nets["sdn"]
    x: Tensor = torch.stack([splits.test[i][0] for i in range(64)])
    model = EarlyExitClassifier(net, threshold=0.95)
    pred = model(x)
    reference = early_exit_forward(net, x, 0.95, "max_softmax")
    assert torch.equal(pred, reference.predictions) and torch.equal(model.last_exits, reference.exits)
    # threshold 1.0 (max softmax never above it): every sample reaches the final head, as the plain forward
    everything = EarlyExitClassifier(net, threshold=1.0)
    assert torch.equal(everything(x), net(x)[-1].argmax(dim=-1)) and bool((everything.last_exits == net.num_exits - 1).all())
