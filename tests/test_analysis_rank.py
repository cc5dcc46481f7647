"""The rank analysis (paper Fig. 3): the maths on matrices of known rank, the captured tensors, its graph node."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exitflow.pipeline.graph import build_graph
from exitflow.pipeline.spec import SpecError, load_spec
from exitflow.stages.core.analysis.rank import capture_layer_outputs, feature_subset, layer_ranks, numerical_rank
from exitflow.stages.core.nets import NetSpec, create_net


@pytest.mark.parametrize("rank", [0, 1, 5, 20])
def test_a_constructed_matrix_has_its_rank(rank: int) -> None:
    g = torch.Generator().manual_seed(rank)
    m = torch.randn(200, rank, generator=g) @ torch.randn(rank, 50, generator=g) if rank else torch.zeros(200, 50)
    assert numerical_rank(m) == rank
    assert numerical_rank(m.T) == rank


def test_float32_noise_stays_below_the_tolerance_and_rtol_can_count_it() -> None:
    g = torch.Generator().manual_seed(0)
    m = (torch.randn(300, 4, generator=g) @ torch.randn(4, 80, generator=g)).float()  # float32 rounding: full rank in float64
    assert numerical_rank(m.double() + 1e-13 * torch.randn(300, 80, dtype=torch.float64, generator=g)) == 4
    assert numerical_rank(m) == 4  # rounding noise is far below s_max * max(m, n) * eps(float32)
    assert numerical_rank(m.double() + 1e-3 * torch.randn(300, 80, dtype=torch.float64, generator=g), rtol=1e-12) == 80


@pytest.mark.parametrize("rows, columns, rank", [(400, 1500, 37), (1500, 400, 37), (300, 2000, 300)])
def test_activation_sized_matrices_take_the_gram_path_and_agree_with_the_svd(rows: int, columns: int, rank: int) -> None:
    """Activation-sized matrices rank by the Gram matrix's eigenvalues: every singular value the SVD
    gives, to 1e-9 of the largest, and the same rank, with ReLU-like structure and float32 rounding."""
    from exitflow.stages.core.analysis.rank import FLOAT32_EPS, gram_resolves, gram_singular_values

    g = torch.Generator().manual_seed(rows + rank)
    m = torch.relu(torch.randn(rows, rank, generator=g) @ torch.randn(rank, columns, generator=g)).float()
    m = m[:, m.abs().sum(0) > 0]  # a ReLU may zero a column: rank only counts what is there
    relative = max(m.shape) * FLOAT32_EPS
    assert gram_resolves(m.shape, relative)
    svd = torch.linalg.svdvals(m.double())
    gram = gram_singular_values(m.double())
    assert torch.allclose(gram, svd, rtol=0, atol=1e-9 * float(svd[0]))
    expected = int((svd > svd[0] * relative).sum())
    assert numerical_rank(m) == expected and 0 < expected <= min(rows, columns)


def test_small_matrices_and_tight_tolerances_take_the_svd() -> None:
    from exitflow.stages.core.analysis.rank import FLOAT32_EPS, gram_resolves

    assert not gram_resolves((100, 50), 100 * FLOAT32_EPS)  # below 156 rows or columns
    assert not gram_resolves((1000, 6000), 1e-12)  # a tight rtol: below what the Gram matrix resolves
    assert gram_resolves((1000, 6000), 6000 * FLOAT32_EPS)


class _Known(nn.Module):
    """A 'net' whose layer outputs are known: Linear -> BatchNorm -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def test_the_captured_tensor_is_the_layer_output_before_normalisation_and_activation() -> None:
    net = _Known().eval()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_layer_outputs(net.backbone) as out:
        net(x)
    assert list(out) == ["0", "3"]  # both Linear layers, in execution order; not the BatchNorm or ReLU
    first = net.backbone[0]
    torch.testing.assert_close(out["0"], x @ first.weight.T + first.bias)  # pre-normalisation, pre-ReLU
    assert (out["0"] < 0).any()  # a ReLU output would have none
    hidden = torch.relu(net.backbone[1](x @ first.weight.T + first.bias))
    torch.testing.assert_close(out["3"], net.backbone[3](hidden))


def test_conv_outputs_are_flattened_per_sample_and_subsets_are_shared_across_models() -> None:
    spec = NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, width=8)
    a, b = create_net(spec), create_net(spec)
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ra, rb = layer_ranks(a, x, features=100), layer_ranks(b, x, features=100)
    assert [r.layer for r in ra] == [r.layer for r in rb] and len(ra) >= 19  # every conv of ResNet-20, and its head
    for r in ra:
        assert r.rows == 40 and r.columns == min(100, r.full_columns) and 0 <= r.rank <= min(r.rows, r.columns)
    assert torch.equal(feature_subset(512, 100), feature_subset(512, 100))  # the same columns for every model
    assert feature_subset(50, 100) is None


def test_the_rank_node_reads_the_regimes_models_and_only_when_switched_on() -> None:
    g = build_graph(load_spec(None, ["analyses.rank.enabled=true", "seeds=[0, 1]"]))
    node = g.nodes["seed1/analyze/rank"]
    assert node.inputs == ("seed1/P1", "seed1/mixed/P2", "seed1/joint/P2")
    assert node.tags()["exitflow.stage"] == "analyze" and node.tags()["exitflow.analysis"] == "rank"
    assert build_graph(load_spec(None, ["analyses.rank.enabled=true", "regimes=[joint]"])).nodes["seed0/analyze/rank"].inputs == ("seed0/joint/P2",)
    assert not [n for n in build_graph(load_spec(None, [])).nodes if "analyze" in n]


@pytest.mark.parametrize(("field", "value"), [("samples", "1"), ("features", "0"), ("rtol", "-1"), ("split", "everything")])
def test_bad_rank_settings_are_refused_naming_the_field(field: str, value: str) -> None:
    with pytest.raises(SpecError, match=f"analyses.rank.{field}"):
        load_spec(None, [f"analyses.rank.{field}={value}"])
