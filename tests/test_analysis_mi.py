"""The mutual-information estimators (paper Fig. 5) against closed forms, and their graph node.

Every random draw is seeded and every estimate computed in float64; the data's generator seeds
differ from the noise's (the same seed would make the noise the data's own normals).
"""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from exitflow.pipeline.graph import build_graph
from exitflow.pipeline.spec import SpecError, load_spec
from exitflow.stages.analyze_mi import MutualInformationAnalysis
from exitflow.stages.core.analysis.mutual_information import (
    ESTIMATORS,
    MIEstimator,
    _log_kernel,
    block_mutual_information,
    layer_mi,
    log_marginal,
    mi_jensen,
    mi_monte_carlo,
    mi_pairwise_bounds,
    noise_scale,
)
from exitflow.stages.core.nets import NetSpec, create_net

TOLERANCE = 0.06  # relative: 2,000 samples, 8 noise draws (measured: 1.5-4 % low, mostly the sample covariance)


def _gaussian(eigenvalues: tuple[float, ...], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cov, n samples of N(0, cov)): cov has the given eigenvalues along a fixed random rotation."""
    d = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    cov = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    return cov, x


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


# Kawaguchi et al.'s fixed-noise estimator, both modes, on X ~ N(0, cov) in 4 dimensions, N = 2,000.
@pytest.mark.parametrize(("eigenvalues", "s"), [((2.0, 1.0, 0.5, 0.25), 1.0), ((1.0, 1.0, 1.0, 1.0), 1.5)])
def test_both_kawaguchi_modes_against_the_closed_form_of_correlated_gaussians(eigenvalues: tuple[float, ...], s: float) -> None:
    n = 2000
    cov, x = _gaussian(eigenvalues, n, seed=1)
    eye = torch.eye(len(eigenvalues), dtype=torch.float64)
    true = 0.5 * float(torch.logdet(eye + cov / s**2))  # I(X; Z), Z = X + N(0, s^2 I)

    # mc estimates I(X; Z) itself. Tolerance 0.1 nats: over 100 data seeds at this N, d and 4 draws its
    # error had mean -0.015 (a mixture of N samples carries a little less than the Gaussian) and standard
    # deviation <= 0.017, nearly all from which N points were drawn; 0.1 is that bias plus 5 deviations.
    mc = layer_mi(x, MIEstimator("mc", noise_std=s, draws=4), index=1, seed=0)
    assert mc.mi == pytest.approx(true, abs=0.1)
    assert mc.noise_std == s and mc.dims == len(eigenvalues)

    # jensen estimates E over X, X' of KL(p(z | X) || p(z | X')) = I(X; Z) + the lautum information,
    # for Gaussians tr(cov) / s^2. On the data it is exactly the total sample variance over s^2 (hand
    # computation below, to rounding), whose standard deviation across data sets is
    # sqrt(2 tr(cov^2) / N) / s^2 (the variance of a Gaussian quadratic form): 5 of them is the tolerance.
    jensen = layer_mi(x, MIEstimator("jensen", noise_std=s), index=1)
    by_hand = float(((x - x.mean(dim=0)) ** 2).sum()) / n / s**2
    assert jensen.mi == pytest.approx(by_hand, rel=1e-12)
    spread = math.sqrt(2 * float(torch.trace(cov @ cov)) / n) / s**2
    assert jensen.mi == pytest.approx(float(torch.trace(cov)) / s**2, abs=5 * spread)

    # The bound's direction: Jensen's log p(z) (mean of the components' logs) is never above the
    # Monte Carlo one (log of their mean), so jensen >= mc on the same data, and it lies above the true
    # I(X; Z) and above the bracket's upper end (the mean of the pairwise KLs >= -log mean exp(-KL)).
    assert jensen.mi > mc.mi
    assert jensen.mi > true
    assert mc.lower <= true <= mc.upper <= jensen.mi
    assert (jensen.lower, jensen.upper) == (mc.lower, mc.upper)  # the same bracket: the same noise

    # mi_jensen is the exact noise expectation of the sampled Jensen estimate (Kawaguchi et al.'s
    # `jensen` switch on drawn z); that average's standard deviation is sqrt(total variance /
    # (N draws)) / s (about 0.015 here), the tolerance 0.1 over 6 of them. On the same draws the
    # sampled Jensen estimate is above the Monte Carlo one point by point (Jensen's inequality).
    sampled = mi_monte_carlo(x, s, draws=4, seed=0, jensen=True)
    assert sampled == pytest.approx(jensen.mi, abs=0.1)
    assert sampled >= mi_monte_carlo(x, s, draws=4, seed=0)


def test_the_jensen_marginal_is_below_the_mixture_at_every_point_and_the_closed_form_is_their_pairwise_one() -> None:
    g = torch.Generator().manual_seed(3)
    h = torch.randn(30, 7, generator=g, dtype=torch.float64)
    z = h + 0.5 * torch.randn(30, 7, generator=g, dtype=torch.float64)
    log_k = _log_kernel(z, h, 0.5)
    assert (log_marginal(log_k, jensen=True) <= log_marginal(log_k)).all()
    # Their CIFAR code evaluates the Jensen form at z = h_i: mean_i [log N(h_i; h_i) - mean_j log N(h_i; h_j)]
    at_h = _log_kernel(h, h, 0.5)
    assert float((at_h.diagonal() - log_marginal(at_h, jensen=True)).mean()) == pytest.approx(mi_jensen(h, 0.5), rel=1e-10)


def test_a_fixed_noise_keeps_the_activations_scale_and_the_relative_one_removes_it() -> None:
    h = torch.randn(40, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for c in (0.5, 3.0):
        assert layer_mi(c * h, MIEstimator("jensen"), 1).mi == pytest.approx(c * c * layer_mi(h, MIEstimator("jensen"), 1).mi, rel=1e-12)
        relative = MIEstimator("relative_noise")
        assert layer_mi(c * h, relative, 1).mi == pytest.approx(layer_mi(h, relative, 1).mi, rel=1e-9)


def test_the_relative_noise_estimator_gives_what_it_gave_before() -> None:
    """Values computed by the estimator before the Kawaguchi modes were added (same input, same draws)."""
    h = torch.sin(torch.arange(60 * 5, dtype=torch.float64).reshape(60, 5) * 0.37) * 3.0  # no generator involved
    row = layer_mi(h, MIEstimator("relative_noise", noise=0.25, draws=3), index=2, seed=7)
    assert row.noise_std == pytest.approx(1.549757677375332, rel=1e-9) == noise_scale(h, 0.25)
    assert row.mi == pytest.approx(1.3858631559876151, rel=1e-9)
    assert (row.lower, row.upper) == pytest.approx((1.1900383548183233, 1.973480995220008), rel=1e-9)
    assert (row.index, row.dims) == (2, 5)
    assert MIEstimator("relative_noise") == MIEstimator("relative_noise", noise=0.25, draws=4)  # its old defaults


def test_identical_inputs_carry_no_information_and_separated_ones_log_n() -> None:
    same = torch.zeros(50, 3)
    assert mi_monte_carlo(same, 0.1) == pytest.approx(0.0, abs=1e-9)
    assert mi_jensen(same, 0.1) == pytest.approx(0.0, abs=1e-9)
    assert mi_pairwise_bounds(same, 0.1) == pytest.approx((0.0, 0.0), abs=1e-9)
    apart = torch.eye(50) * 100.0  # every sample far from every other: X is recovered from Z
    assert mi_monte_carlo(apart, 0.1) == pytest.approx(math.log(50), rel=1e-6)
    assert mi_pairwise_bounds(apart, 0.1)[0] == pytest.approx(math.log(50), rel=1e-6)
    assert mi_jensen(apart, 0.1) > 1e5  # Jensen's value is no mutual information: log N does not cap it


@pytest.mark.parametrize("estimator", [MIEstimator("jensen"), MIEstimator("mc", noise_std=2.0, draws=2),
                                       MIEstimator("relative_noise", noise=0.2, draws=2)])
def test_every_block_gets_an_estimate_by_every_estimator(estimator: MIEstimator) -> None:
    torch.manual_seed(0)
    net = create_net(NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, width=8))
    x = torch.randn(60, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    rows = block_mutual_information(net, x, estimator, seed=0)
    assert [r.index for r in rows] == list(range(1, net.num_blocks + 1))
    for r in rows:
        assert 0.0 <= r.lower - 1e-9 and r.upper <= math.log(60) + 1e-9 and r.noise_std > 0
        if estimator.kind == "jensen":
            assert r.noise_std == 1.0 and r.mi >= r.upper - 1e-9  # the bound's direction, exactly
        else:
            assert r.lower - 0.15 <= r.mi <= r.upper + 0.15  # Monte Carlo noise around the bracket


def test_the_noise_is_relative_to_the_median_distance_so_wide_layers_do_not_saturate() -> None:
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


def test_each_estimator_names_itself_and_its_settings_for_the_plot() -> None:
    assert MIEstimator().describe() == "Kawaguchi et al. 2023, Jensen, noise std 1.0"
    assert MIEstimator("mc", draws=8).describe() == "Kawaguchi et al. 2023, Monte Carlo, 8 draws, noise std 1.0"
    assert MIEstimator("relative_noise").describe() == "relative noise: std 0.25 x median distance, 4 draws"


def test_the_node_reads_the_regimes_models() -> None:
    g = build_graph(load_spec(None, ["analyses.mutual_information.enabled=true"]))
    node = g.nodes["seed0/analyze/mutual_information"]
    assert node.inputs == ("seed0/P1", "seed0/mixed/P2", "seed0/joint/P2")
    assert node.tags()["exitflow.analysis"] == "mutual_information"


def test_the_paper_estimator_is_the_default_and_its_default_keys_as_if_set() -> None:
    on = "analyses.mutual_information.enabled=true"
    node = build_graph(load_spec(None, [on])).nodes["seed0/analyze/mutual_information"]
    assert (node.config.estimator, node.config.noise_std, node.config.noise, node.config.draws) == ("jensen", 1.0, None, None)
    same = build_graph(load_spec(None, [on, "analyses.mutual_information.noise_std=1.0"])).nodes[node.id]
    assert same.key == node.key
    mc = build_graph(load_spec(None, [on, "analyses.mutual_information.estimator=mc"])).nodes[node.id]
    assert (mc.config.noise_std, mc.config.draws) == (1.0, 4) and mc.key != node.key
    old = build_graph(load_spec(None, [on, "analyses.mutual_information.estimator=relative_noise"])).nodes[node.id]
    assert (old.config.noise_std, old.config.noise, old.config.draws) == (None, 0.25, 4)
    assert get_args(MutualInformationAnalysis.model_fields["estimator"].annotation) == ESTIMATORS


def test_the_estimators_can_be_compared_in_one_study() -> None:
    """Unset settings stay null in the spec (the stage fills the defaults), so a variant's dump carries
    no setting another estimator would refuse."""
    g = build_graph(load_spec(None, ["analyses.mutual_information.enabled=true",
                                     "compare={analyses.mutual_information.estimator: [jensen, mc, relative_noise]}"]))
    configs = {n.config.estimator: n.config for n in g.nodes.values() if n.kind == "analyze.mutual_information"}
    assert {k: (c.noise_std, c.noise, c.draws) for k, c in configs.items()} == {
        "jensen": (1.0, None, None), "mc": (1.0, None, 4), "relative_noise": (None, 0.25, 4)}


@pytest.mark.parametrize(("estimator", "field", "value"), [("jensen", "noise", "0.25"), ("jensen", "draws", "4"),
                                                           ("mc", "noise", "0.25"), ("relative_noise", "noise_std", "1.0")])
def test_a_setting_the_estimator_does_not_read_is_refused_naming_it(estimator: str, field: str, value: str) -> None:
    with pytest.raises(SpecError, match=f"analyses.mutual_information.{field}: .*read only by"):
        load_spec(None, [f"analyses.mutual_information.estimator={estimator}", f"analyses.mutual_information.{field}={value}"])
    with pytest.raises(ValueError, match=f"{field} is read only by"):
        MIEstimator(estimator, **{field: float(value)})  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "value"), [("samples", "1"), ("noise", "0"), ("draws", "0"), ("noise_std", "0"),
                                              ("estimator", "binning")])
def test_bad_settings_are_refused_naming_the_field(field: str, value: str) -> None:
    with pytest.raises(SpecError, match=f"analyses.mutual_information.{field}"):
        load_spec(None, [f"analyses.mutual_information.{field}={value}"])
