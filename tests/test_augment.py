"""The paper's extra augmentations (`data.augmentations`): bounds, what each operation does to a
batch or an image, the train split only, soft targets through the loss, and exact resume."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from exitflow.pipeline.spec import SpecError, load_spec
from exitflow.stages.core.augment import Augmentations, MixingCollate
from exitflow.stages.core.data import DataError, DataSpec, load_splits, make_loader, train_collate
from exitflow.stages.core.data.sources import digits_normalisation
from exitflow.stages.core.loop import PhaseConfig, fit_phase, seed_everything
from exitflow.stages.core.nets import create_net
from exitflow.stages.core.nets.spec import NetSpec
from exitflow.stages.core.regimes import exit_weights, phase_loss

SPEC = NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exits=(3, 6), width=8)


def _spec(tmp_path: Path, *sets: str) -> object:
    path = tmp_path / "s.yaml"
    path.write_text("")
    return load_spec(path, list(sets))


@pytest.mark.parametrize(("setting", "words"), [
    ("data.augmentations.rotation=200", "augmentations.rotation must lie in [0, 180]"),
    ("data.augmentations.random_erasing=1.5", "random_erasing is a probability"),
    ("data.augmentations.mixup=-1", "augmentations.mixup must be >= 0"),
    ("data.augmentations.blur=1", "blur"),
])
def test_out_of_bounds_values_are_refused_naming_the_field(tmp_path: Path, setting: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        _spec(tmp_path, setting)
    assert words in str(err.value)


def test_augmentations_need_augment_on(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="augment is false"):
        _spec(tmp_path, "data.augment=false", "data.augmentations.cutmix=1.0")
    with pytest.raises(DataError, match="augment is false"):
        DataSpec(augment=False, augmentations=Augmentations(mixup=0.2))
    spec = DataSpec.from_dict({**DataSpec().to_dict(), "augmentations": {"mixup": 0.2}})
    assert spec.augmentations == Augmentations(mixup=0.2)  # to_dict/from_dict round trip
    assert DataSpec.from_dict(spec.to_dict()) == spec


def _batch(n: int = 16) -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(1, 8, 8, generator=g), i % 10) for i in range(n)]


def test_mixup_mixes_images_and_labels_by_the_same_weight() -> None:
    batch = _batch()
    x0 = torch.stack([b[0] for b in batch])
    y0 = torch.tensor([b[1] for b in batch])
    torch.manual_seed(1)
    x, y = MixingCollate(Augmentations(mixup=0.8), 10)(batch)
    assert y.shape == (16, 10) and torch.allclose(y.sum(1), torch.ones(16))
    lam = float(y[0, y0[0]])  # Mixup pairs each sample with the one before it (a roll of the batch)
    assert 0 < lam < 1
    assert torch.allclose(x, lam * x0 + (1 - lam) * x0.roll(1, 0), atol=1e-6)
    expected = lam * torch.nn.functional.one_hot(y0, 10) + (1 - lam) * torch.nn.functional.one_hot(y0.roll(1, 0), 10)
    assert torch.allclose(y, expected.float(), atol=1e-6)


def test_cutmix_pastes_a_box_and_labels_by_its_area() -> None:
    batch = _batch()
    x0 = torch.stack([b[0] for b in batch])
    y0 = torch.tensor([b[1] for b in batch])
    for seed in range(5):
        torch.manual_seed(seed)
        x, y = MixingCollate(Augmentations(cutmix=1.0), 10)(batch)
        own = (x == x0).all(1)  # [B, H, W]: pixels kept from the sample itself
        pasted = (x == x0.roll(1, 0)).all(1)
        assert bool((own | pasted).all())  # every pixel comes from one of the two images
        kept = own[0].float().mean().item()  # the same box for the whole batch
        assert y[0, y0[0]].item() == pytest.approx(kept, abs=1e-6)


def test_with_both_each_batch_takes_one_of_them() -> None:
    batch = _batch()
    x0 = torch.stack([b[0] for b in batch])
    kinds = set()
    mix = MixingCollate(Augmentations(mixup=0.8, cutmix=1.0), 10)
    for seed in range(12):
        torch.manual_seed(seed)
        x, _ = mix(batch)
        kinds.add("cutmix" if bool(((x == x0) | (x == x0.roll(1, 0))).all()) else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_train_collate_only_when_mixing_is_asked_for() -> None:
    assert train_collate(DataSpec(), 10) is None
    assert train_collate(DataSpec(augmentations=Augmentations(rotation=10)), 10) is None
    assert isinstance(train_collate(DataSpec(augmentations=Augmentations(cutmix=1.0)), 10), MixingCollate)


def test_digits_per_image_operations_touch_the_train_split_only() -> None:
    plain = load_splits(DataSpec(name="digits"), seed=0)
    aug = load_splits(DataSpec(name="digits", augmentations=Augmentations(rotation=90, random_erasing=1.0)), seed=0)
    assert len(aug.train) == len(plain.train)
    for split in ("val", "test"):  # never augmented
        a, b = getattr(aug, split), getattr(plain, split)
        assert all(torch.equal(a[i][0], b[i][0]) for i in range(0, len(a), 37))
    mean, std = digits_normalisation()
    background = (0 - mean) / std
    torch.manual_seed(0)
    changed = 0
    for i in range(0, 200, 7):
        x, label = aug.train[i]
        x0, label0 = plain.train[i]
        assert int(label) == int(label0) and x.shape == x0.shape
        changed += not torch.equal(x, x0)
        # Nearest-neighbour rotation moves pixels; the corners fill with the true background (not the
        # normalised 0), and erasing writes 0: nothing else can appear.
        allowed = torch.cat([x0.flatten(), torch.tensor([background, 0.0])])
        assert bool(torch.isclose(x.flatten()[:, None], allowed[None, :], atol=1e-5).any(1).all())
        assert bool((x == 0).any())  # random_erasing=1: a rectangle of every image is erased
    assert changed >= 25


def test_contrast_keeps_digits_in_their_pixel_range() -> None:
    aug = load_splits(DataSpec(name="digits", augmentations=Augmentations(contrast=0.9)), seed=0)
    mean, std = digits_normalisation()
    xs = torch.stack([aug.train[i][0] for i in range(100)])
    low, high = (0 - mean) / std, (1 - mean) / std  # [0, 1] pixels, standardised
    assert float(xs.min()) >= low - 1e-5 and float(xs.max()) <= high + 1e-5


def test_the_loss_takes_soft_targets_as_cross_entropy() -> None:
    seed_everything(0)
    net = create_net(SPEC)
    x, y = MixingCollate(Augmentations(mixup=0.8), 10)(_batch())
    logits = net(x)
    weights = exit_weights("uniform", len(logits), 0.0)
    loss, per_exit = phase_loss(logits, y, "P2", weights, torch.nn.CrossEntropyLoss(), net.method.losses)
    manual = [-(y * torch.log_softmax(z, 1)).sum(1).mean() for z in logits]
    assert torch.allclose(per_exit, torch.stack(manual).detach(), atol=1e-6)
    assert torch.allclose(loss, (weights * torch.stack(manual)).sum() / len(logits), atol=1e-6)  # the mean reduction


def test_a_mixing_phase_resumes_exactly() -> None:
    """CutMix/Mixup draw from torch's RNG in the loader: a resumed phase draws the same boxes and weights."""
    spec = DataSpec(name="digits", augmentations=Augmentations(mixup=0.4, cutmix=1.0, random_erasing=0.5))
    splits = load_splits(spec, seed=0)
    cfg = PhaseConfig(lr=3e-3, batch_size=64, max_epochs=3, patience=10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def fit(resume: dict | None = None, seed: int = 0):  # type: ignore[type-arg]
        seed_everything(seed)
        net = create_net(SPEC)
        loader = make_loader(Subset(splits.train, range(256)), 64, shuffle=True, seed=0,
                             collate_fn=train_collate(spec, 10))
        reports: list = []  # type: ignore[type-arg]
        val = make_loader(splits.val, 512, shuffle=False, seed=0)
        fit_phase(net, "P2", cfg, loader, val, torch.device("cpu"), on_epoch=reports.append, resume=resume)
        return reports

    try:
        full = fit()
        buffer = io.BytesIO()
        torch.save(full[0].state, buffer)
        buffer.seek(0)
        resumed = fit(torch.load(buffer, weights_only=True), seed=7)
    finally:
        torch.set_num_threads(threads)
    assert [r.epoch for r in resumed] == [1, 2]
    for key, value in full[-1].state["net"].items():
        assert torch.equal(value, resumed[-1].state["net"][key]), key
    assert np.isfinite(full[-1].metrics["train_loss"])


def test_image_datasets_get_the_operations_in_their_train_transform_only() -> None:
    from PIL import Image

    from exitflow.stages.core.data.transforms import Normalization, build_transforms

    norm = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    aug = Augmentations(rotation=10, contrast=0.3, random_erasing=0.5, mixup=0.8)
    for imagenet_style in (False, True):
        train, evaluate = build_transforms(32, norm, imagenet_style, aug)
        _, plain_eval = build_transforms(32, norm, imagenet_style)
        names = [type(t).__name__ for t in train.transforms]
        assert names[2:] == ["RandomRotation", "ColorJitter", "ToTensor", "Normalize", "RandomErasing"]
        assert [type(t).__name__ for t in evaluate.transforms] == [type(t).__name__ for t in plain_eval.transforms]
        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
        assert train(img).shape == (3, 32, 32) and torch.equal(evaluate(img), plain_eval(img))
