"""The loss-landscape analysis (paper App. A): directions, grid, the centre is the model, its nodes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from exitflow.pipeline.graph import build_graph
from exitflow.pipeline.spec import SpecError, load_spec
from exitflow.stages.core.analysis.landscape import exit_losses, filter_normalized_direction, grid_coordinates, loss_landscape
from exitflow.stages.core.nets import NetSpec, create_net


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_net(NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exits=(3, 6), width=8)).eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g)


def test_the_grid_centre_is_the_model_own_loss(net: torch.nn.Module) -> None:
    x, y = _batch()
    before = {n: p.clone() for n, p in net.named_parameters()}
    rows = loss_landscape(net, x, y, steps=5, span=0.5, seed=1)
    with torch.no_grad():
        own = [F.cross_entropy(z, y).item() for z in net(x)]
    centre = {r["exit"]: r["loss"] for r in rows if r["a"] == 0.0 and r["b"] == 0.0}
    assert [centre[k] for k in range(3)] == pytest.approx(own, rel=1e-6)
    assert centre[-1] == pytest.approx(sum(own), rel=1e-6)
    assert len(rows) == 5 * 5 * 4  # every point: 3 exits and the sum
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())  # the model is left as it was
    assert len({r["loss"] for r in rows if r["exit"] == -1}) > 1  # the landscape is not flat


def test_directions_are_filter_normalised_and_skip_biases_and_norms(net: torch.nn.Module) -> None:
    d = filter_normalized_direction(net, torch.Generator().manual_seed(0))
    for name, p in net.named_parameters():
        if p.ndim <= 1:
            assert not d[name].any(), name
        else:
            dims = tuple(range(1, p.ndim))
            norm = torch.linalg.vector_norm
            torch.testing.assert_close(norm(d[name], dim=dims), norm(p.detach(), dim=dims), rtol=1e-5, atol=1e-6)


def test_grid_coordinates_put_zero_exactly_in_the_middle() -> None:
    c = grid_coordinates(101, 1.0)
    assert c[50].item() == 0.0 and c[0].item() == -1.0 and c[-1].item() == 1.0 and len(c) == 101
    with pytest.raises(ValueError, match="odd"):
        grid_coordinates(4, 1.0)


def test_exit_losses_batches_give_the_full_batch_mean(net: torch.nn.Module) -> None:
    x, y = _batch()
    assert exit_losses(net, x, y, batch_size=5) == pytest.approx(exit_losses(net, x, y, batch_size=100), rel=1e-5)


def test_one_landscape_node_per_regime_reading_its_final_model() -> None:
    g = build_graph(load_spec(None, ["analyses.landscape.enabled=true"]))
    found = {n.id: n.inputs for n in g.nodes.values() if n.kind == "analyze.landscape"}
    assert found == {"seed0/joint/analyze/landscape": ("seed0/joint/P2",),
                     "seed0/disjoint/analyze/landscape": ("seed0/disjoint/P3",),
                     "seed0/mixed/analyze/landscape": ("seed0/mixed/P2",)}
    assert g.nodes["seed0/mixed/analyze/landscape"].tags()["exitflow.analysis"] == "landscape"


@pytest.mark.parametrize(("field", "value"), [("steps", "20"), ("steps", "1"), ("span", "0"), ("samples", "0")])
def test_bad_landscape_settings_are_refused_naming_the_field(field: str, value: str) -> None:
    with pytest.raises(SpecError, match=f"analyses.landscape.{field}"):
        load_spec(None, [f"analyses.landscape.{field}={value}"])
