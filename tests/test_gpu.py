"""The GPU paths: bf16 autocast and channels_last in the core loop, evaluation and dynamic inference on
CUDA, and a Ray Train phase on a GPU with NCCL. Skipped where no CUDA device is visible (CI has none):
run `pytest tests/test_gpu.py` on a GPU machine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from exitflow.stages.core.data import DataSpec, load_splits, make_loader
from exitflow.stages.core.evaluation import collect_logits, exit_criterion, exit_indices, threshold_grid
from exitflow.stages.core.inference import early_exit_predict
from exitflow.stages.core.loop import PhaseConfig, fit_phase, seed_everything
from exitflow.stages.core.nets import create_net
from exitflow.stages.core.nets.spec import NetSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")

SPEC = NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exits=(2, 4, 6), width=16)
FAST = PhaseConfig(optimizer="adam", lr=3e-3, batch_size=64, max_epochs=3, patience=5, selection="mean",
                   bf16=True, channels_last=True)


@pytest.fixture(scope="module")
def splits():  # noqa: ANN201
    return load_splits(DataSpec(name="digits", augment=False), seed=0)


@pytest.fixture(scope="module")
def trained(splits):  # noqa: ANN001, ANN201
    """A net trained on the GPU in bf16 with channels_last, and its phase result."""
    seed_everything(0)
    net = create_net(SPEC)
    train = make_loader(splits.train, 64, shuffle=True, seed=0)
    result = fit_phase(net, "P2", FAST, train, make_loader(splits.val, 256, shuffle=False, seed=0), "cuda")
    return net.eval(), result


def test_a_bf16_channels_last_phase_learns_on_the_gpu(trained) -> None:  # noqa: ANN001
    net, result = trained
    assert next(net.parameters()).is_cuda
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert all(p.dtype == torch.float32 for p in net.parameters())  # autocast: fp32 master weights
    assert result.best_val["val_acc_final"] > 0.8  # digits in 3 epochs: learning, not noise
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in result.history)


def test_the_autocast_forward_runs_in_bf16_and_stays_close_to_fp32(trained, splits) -> None:  # noqa: ANN001
    net, _ = trained
    x = torch.stack([splits.test[i][0] for i in range(256)]).cuda().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        full = torch.stack(net(x))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = torch.stack(net(x))
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    agree = (half.float().argmax(-1) == full.argmax(-1)).float().mean().item()
    assert agree > 0.97  # bf16 keeps 8 mantissa bits: a few borderline samples may flip, not more


def test_gpu_logits_match_cpu_logits(trained, splits) -> None:  # noqa: ANN001
    net, _ = trained
    loader = make_loader(splits.test, 128, shuffle=False, seed=0)
    on_gpu, labels_gpu = collect_logits(net, loader, "cuda")
    on_cpu, labels_cpu = collect_logits(net.to("cpu"), loader, "cpu")
    net.to("cuda")
    assert torch.equal(labels_gpu, labels_cpu)
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-3)  # TF32/cuDNN kernels: not bitwise


def test_dynamic_inference_on_the_gpu_takes_the_simulated_exits(trained, splits) -> None:  # noqa: ANN001
    net, _ = trained
    loader = make_loader(splits.test, 128, shuffle=False, seed=0)
    logits, _ = collect_logits(net, loader, "cuda")
    conf = exit_criterion(logits, "max_softmax")
    thresholds = threshold_grid("max_softmax", logits.shape[-1], 8, "quantile", conf)
    simulated = exit_indices(conf, thresholds, "max_softmax")
    for t, threshold in enumerate(thresholds):
        dynamic = early_exit_predict(net, loader, float(threshold), "max_softmax", "cuda")
        same = (dynamic.exits == torch.as_tensor(simulated[t])).float().mean().item()
        # a compacted batch may pick other kernels than the full one: a sample whose confidence
        # sits on the threshold to ~1e-6 can flip; more than 1 % would be a real divergence
        assert same >= 0.99, f"threshold {threshold}: {same:.3f} of exits agree"


@pytest.mark.ray
def test_a_ray_train_phase_on_the_gpu_uses_nccl(ray_session: None, tmp_path) -> None:  # noqa: ANN001
    import ray

    from exitflow.stages.phase_kind import PhaseJob
    from exitflow.stages.phase_plan import PhaseNodeConfig
    from exitflow.stages.ray_train import fit_with_torch_trainer, scaling_config

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the suite's Ray session has no GPU")
    config = PhaseNodeConfig(phase="P2", seed=0, data=DataSpec(name="digits", augment=False), net=SPEC,
                             train=dataclasses.replace(FAST, max_epochs=2, selection="mean"))
    job = PhaseJob(config=config, net=SPEC, label="gpu/P2")
    outcome = fit_with_torch_trainer(job, scaling_config(1, True, 1.0, 1.0), "gpu-phase", str(tmp_path), max_failures=0)
    assert outcome.ran_on.startswith("1 x NVIDIA") and "nccl" in outcome.ran_on, outcome.ran_on
    assert "bf16" in outcome.ran_on and "channels_last" in outcome.ran_on
    assert outcome.epochs_run == 2 and outcome.best_val["val_acc_final"] > 0.5
