"""The mutual-information estimator (paper Fig. 5) against closed forms, and its graph node."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.graph import build_graph
from pipeline.spec import SpecError, load_spec
from stages.core.analysis.mutual_information import block_mutual_information, mi_monte_carlo, mi_pairwise_bounds
from stages.core.nets import NetSpec, create_net

TOLERANCE = 0.06  # relative: 2,000 samples, 8 noise draws (measured: 1.5-4 % low, mostly the sample covariance)


@pytest.mark.parametrize(("rho", "s"), [(0.0, 1.0), (0.8, 0.5), (0.8, 1.0), (-0.5, 0.7)])
def test_the_estimate_matches_the_closed_form_for_correlated_gaussians_in_two_dimensions(rho: float, s: float) -> None:
    """X ~ N(0, [[1, rho], [rho, 1]]), Z = X + N(0, s^2 I): I(X; Z) = 1/2 log det(I + cov / s^2)."""
    cov = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)
    true = 0.5 * math.log(float(torch.linalg.det(torch.eye(2, dtype=torch.float64) + cov / s**2)))
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    estimate = mi_monte_carlo(x, s, draws=8)
    assert estimate == pytest.approx(true, rel=TOLERANCE)
    lower, upper = mi_pairwise_bounds(x, s)
    assert lower <= true <= upper  # the pairwise bounds bracket it


def test_identical_inputs_carry_no_information_and_separated_ones_log_n() -> None:
    same = torch.zeros(50, 3)
    assert mi_monte_carlo(same, 0.1) == pytest.approx(0.0, abs=1e-9)
    assert mi_pairwise_bounds(same, 0.1) == pytest.approx((0.0, 0.0), abs=1e-9)
    apart = torch.eye(50) * 100.0  # every sample far from every other: X is recovered from Z
    assert mi_monte_carlo(apart, 0.1) == pytest.approx(math.log(50), rel=1e-6)
    assert mi_pairwise_bounds(apart, 0.1)[0] == pytest.approx(math.log(50), rel=1e-6)


def test_every_block_gets_an_estimate_within_its_bounds() -> None:
    torch.manual_seed(0)
    net = create_net(NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, width=8))
    x = torch.randn(60, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    rows = block_mutual_information(net, x, noise=0.2, draws=2)
    assert [r.index for r in rows] == list(range(1, net.num_blocks + 1))
    for r in rows:
        assert 0.0 <= r.lower - 1e-9 and r.upper <= math.log(60) + 1e-9 and r.noise_std > 0
        assert r.lower - 0.15 <= r.mi <= r.upper + 0.15  # Monte Carlo noise around the bracket


def test_the_noise_is_relative_to_the_median_distance_so_wide_layers_do_not_saturate() -> None:
    from stages.core.analysis.mutual_information import noise_scale

    pts = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # distances 3, 4, 5: median 4
    assert noise_scale(pts, 0.25) == pytest.approx(1.0)
    assert noise_scale(torch.ones(5, 3), 0.25) == pytest.approx(0.25)  # no spread: the share itself
    # Two tight groups in 4,096 dimensions: at a quarter of the median distance the groups stay apart
    # and their members blur, so I is about log 2 (which group), far below log N; per-dimension RMS
    # scaling would leave every sample separable (log N), whatever the structure.
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 4096, generator=g) * 10.0
    h = torch.cat([centres[i] + 0.1 * torch.randn(50, 4096, generator=g) for i in (0, 1)])
    mi = mi_monte_carlo(h, noise_scale(h, 0.25), draws=2)
    assert 0.4 <= mi <= math.log(2) + 0.3 < math.log(100)  # measured 0.60: the groups overlap a little


def test_the_node_reads_the_regimes_models() -> None:
    g = build_graph(load_spec(None, ["analyses.mutual_information.enabled=true"]))
    node = g.nodes["seed0/analyze/mutual_information"]
    assert node.inputs == ("seed0/P1", "seed0/mixed/P2", "seed0/joint/P2")
    assert node.tags()["exitflow.analysis"] == "mutual_information"


@pytest.mark.parametrize(("field", "value"), [("samples", "1"), ("noise", "0"), ("draws", "0")])
def test_bad_settings_are_refused_naming_the_field(field: str, value: str) -> None:
    with pytest.raises(SpecError, match=f"analyses.mutual_information.{field}"):
        load_spec(None, [f"analyses.mutual_information.{field}={value}"])
