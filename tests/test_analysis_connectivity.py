"""Mode connectivity (paper Fig. 2): permutation specs, weight matching, paths, BatchNorm repair, its node."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from exitflow.pipeline.graph import build_graph
from exitflow.pipeline.spec import load_spec
from exitflow.stages.core.analysis.connectivity import barrier, exit_metrics, interpolate, line, plane, repair_batchnorm
from exitflow.stages.core.analysis.permutation import permutation_spec, permute_state, random_perms, weight_matching
from exitflow.stages.core.nets import NetSpec, create_net

SPECS = {  # every family with a permutation spec, every IC head kind, and ZTW's and GPF's wrapped heads
    "resnet20-sdn": NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, width=8, exits=(2, 4, 6, 8)),
    "resnet20-mlp": NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, width=8, exits=(3, 5),
                            head="mlp", head_hidden=(16,), head_norm=True),
    "resnet18-linear": NetSpec(backbone="resnet18", num_classes=10, in_chans=3, img_size=8, small_input=True,
                               exits=(2, 5), head="linear", head_norm=True),
    "resnet50-sdn": NetSpec(backbone="resnet50", num_classes=10, in_chans=3, img_size=8, small_input=True, exits=(3, 9)),
    "vit-token": NetSpec(backbone="vit_cifar", num_classes=10, in_chans=3, img_size=8, width=32, depth=3, head_norm=True),
    "vit-mlp": NetSpec(backbone="vit_cifar", num_classes=10, in_chans=3, img_size=8, width=32, depth=3, head="mlp",
                       head_hidden=(16, 8)),
    # ZTW: cascading heads around the family's own, and an ensemble no permutation touches
    "resnet20-ztw": NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, width=8, exits=(2, 4, 6),
                            method="ztw"),
    # MSDNet: dense concatenations (a scale's channels are many groups' segments), transitions, its own IC heads;
    # depth 4 keeps its transitions and scale pruning
    "msdnet-cifar": NetSpec(backbone="msdnet_cifar", num_classes=10, in_chans=3, img_size=16, width=4, depth=4),
    "msdnet-imagenet-gpf": NetSpec(backbone="msdnet_imagenet", num_classes=10, in_chans=3, img_size=32, width=4, depth=3,
                                   method="gpf"),
    # GPF: state heads around the family's own, and an aggregator no permutation touches
    "resnet20-gpf": NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, width=8, exits=(2, 4, 6),
                            method="gpf"),
}


def _net(spec: NetSpec, seed: int = 0) -> torch.nn.Module:
    """A net with random norm parameters, biases and BatchNorm statistics (not their constant
    initial values), so every tensor a permutation touches moves and no unit is interchangeable."""
    torch.manual_seed(seed)
    net = create_net(spec).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.normal_()
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return net


def _batch(spec: NetSpec, n: int = 24, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, spec.in_chans, spec.img_size, spec.img_size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _outputs(net: torch.nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    net.load_state_dict(state)
    with torch.no_grad():
        return net.eval()(x)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_randomly_permuted_net_computes_the_same_function_at_every_exit(name: str) -> None:
    spec = SPECS[name]
    net = _net(spec)
    x, _ = _batch(spec)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    pspec = permutation_spec(net)
    moved = permute_state(pspec, state, random_perms(pspec, torch.Generator().manual_seed(1)))
    permuted = [k for k, axes in pspec.axes.items() if any(a is not None for a in axes)]
    assert permuted and all(not torch.equal(state[k], moved[k]) for k in permuted)  # every permuted tensor moves
    before, after = _outputs(net, state, x), _outputs(net, moved, x)
    assert len(before) == net.num_exits
    for z0, z1 in zip(before, after, strict=True):  # equal up to float32 summation order
        torch.testing.assert_close(z1, z0, rtol=1e-4, atol=1e-4)


def test_a_spec_that_forgets_the_ics_input_changes_the_ics_outputs() -> None:
    """The check above can fail: leave the ICs' inputs unpermuted and their logits change."""
    spec = SPECS["resnet20-sdn"]
    net = _net(spec)
    x, _ = _batch(spec)
    pspec = permutation_spec(net)
    for key in [k for k in pspec.axes if k.startswith("ics.")]:
        del pspec.axes[key]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    moved = permute_state(pspec, state, random_perms(pspec, torch.Generator().manual_seed(1)))
    before, after = _outputs(net, state, x), _outputs(net, moved, x)
    torch.testing.assert_close(after[-1], before[-1], rtol=1e-5, atol=1e-5)  # the final head reads the stream: fine
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(after[:-1], before[:-1]))


def test_a_backbone_without_a_permutation_spec_is_refused_by_name() -> None:
    net = create_net(NetSpec(backbone="efficientnet_b0", num_classes=10, in_chans=3, img_size=32))
    with pytest.raises(ValueError, match="efficientnet_b0"):
        permutation_spec(net)


@pytest.mark.parametrize("name", ["resnet20-sdn", "resnet20-mlp", "vit-token", "msdnet-cifar"])
def test_weight_matching_recovers_a_permuted_copy_exactly(name: str) -> None:
    spec = SPECS[name]
    net = _net(spec)
    a = {k: v.clone() for k, v in net.state_dict().items()}
    pspec = permutation_spec(net)
    b = permute_state(pspec, a, random_perms(pspec, torch.Generator().manual_seed(7)))
    perms, passes = weight_matching(pspec, a, b, seed=0)
    back = permute_state(pspec, b, perms)
    assert all(torch.equal(back[k], a[k]) for k in a)
    assert 2 <= passes < 100  # it converged: one pass found the alignment, the next changed nothing
    # the path between a model and its aligned copy is the model itself: flat
    x, y = _batch(spec)
    rows = line(net, a, back, x, y, points=5)
    assert len({r["loss"] for r in rows if r["exit"] == -1}) == 1 and barrier(rows) == 0.0
    # unaligned, the path between the same two functions leaves them
    unaligned = [r for r in line(net, a, b, x, y, points=5) if r["exit"] == -1]
    assert unaligned[-1]["x"] > 1.0 and abs(unaligned[2]["loss"] - unaligned[0]["loss"]) > 1e-4


def test_line_endpoints_are_the_two_models() -> None:
    spec = SPECS["resnet20-sdn"]
    net_a, net_b = _net(spec, 0), _net(spec, 1)
    x, y = _batch(spec)
    own = [exit_metrics(n, x, y) for n in (net_a, net_b)]
    with torch.no_grad():
        direct = [F.cross_entropy(z, y).item() for z in net_b(x)]
    a, b = net_a.state_dict(), net_b.state_dict()
    rows = line(create_net(spec), a, b, x, y, points=4)
    assert sorted({r["a"] for r in rows}) == [0.0, 1 / 3, 2 / 3, 1.0]
    for t, (losses, accs) in zip((0.0, 1.0), own, strict=True):
        ends = {r["exit"]: r for r in rows if r["a"] == t}
        assert [ends[k]["loss"] for k in range(net_a.num_exits)] == pytest.approx(losses, rel=1e-6)
        assert [ends[k]["accuracy"] for k in range(net_a.num_exits)] == pytest.approx(accs)
        assert ends[-1]["loss"] == pytest.approx(sum(losses), rel=1e-6)
    assert own[1][0] == pytest.approx(direct, rel=1e-5)
    learned = dict(net_a.named_parameters())  # the distance is the learned weights'
    assert 0.0 < rows[-1]["x"] == pytest.approx(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in learned)).item(), rel=1e-5)


def test_line_endpoints_with_bn_repair_are_the_repaired_models() -> None:
    spec = SPECS["resnet20-sdn"]
    net_a, net_b = _net(spec, 0), _net(spec, 1)
    x, y = _batch(spec)
    train, _ = _batch(spec, 64, seed=5)
    rows = line(create_net(spec), net_a.state_dict(), net_b.state_dict(), x, y, points=3, repair=train)
    for t, net in ((0.0, net_a), (1.0, net_b)):
        unrepaired = exit_metrics(net, x, y)[0]
        repair_batchnorm(net, train)
        losses = exit_metrics(net, x, y)[0]
        assert losses != pytest.approx(unrepaired, rel=1e-3)  # the repair changes what the model computes
        assert [r["loss"] for r in rows if r["a"] == t and r["exit"] >= 0] == pytest.approx(losses, rel=1e-5)


def test_bn_repair_sets_the_running_statistics_to_the_training_batch_statistics() -> None:
    spec = SPECS["resnet20-sdn"]
    net = _net(spec)
    train, _ = _batch(spec, 40, seed=5)
    stem_conv, stem_bn = net.backbone.stem[0], net.backbone.stem[1]
    with torch.no_grad():
        h = stem_conv(train)
    assert not torch.allclose(stem_bn.running_mean, h.mean((0, 2, 3)), atol=1e-3)
    momentum = stem_bn.momentum
    repair_batchnorm(net, train, batch_size=40)
    torch.testing.assert_close(stem_bn.running_mean, h.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stem_bn.running_var, h.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    assert not net.training and stem_bn.momentum == momentum
    # in batches, every batch counts the same (momentum None): two halves give the mean of their means
    repair_batchnorm(net, train, batch_size=20)
    halves = (h[:20].mean((0, 2, 3)) + h[20:].mean((0, 2, 3))) / 2
    torch.testing.assert_close(stem_bn.running_mean, halves, rtol=1e-4, atol=1e-5)


def test_plane_corners_are_the_three_models() -> None:
    spec = SPECS["resnet20-sdn"]
    nets = [_net(spec, s) for s in (0, 1, 2)]
    x, y = _batch(spec)
    rows = plane(create_net(spec), *(n.state_dict() for n in nets), x, y, steps=3)
    assert len(rows) == 3 * 3 * (nets[0].num_exits + 1)
    for corner, net in zip(((0.0, 0.0), (1.0, 0.0), (0.0, 1.0)), nets, strict=True):
        losses, accs = exit_metrics(net, x, y)
        got = {r["exit"]: r for r in rows if (r["a"], r["b"]) == corner}
        assert [got[k]["loss"] for k in range(len(losses))] == pytest.approx(losses, rel=1e-6)
        assert [got[k]["accuracy"] for k in range(len(accs))] == pytest.approx(accs)
    # (x, y) keep the plane's geometry: the corners' distances are the models' distances
    origin, b_corner, c_corner = (next(r for r in rows if (r["a"], r["b"]) == c) for c in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0)))
    states = [n.state_dict() for n in nets]
    learned = dict(nets[0].named_parameters())
    dist = lambda s, t: torch.sqrt(sum(((s[k] - t[k]) ** 2).sum() for k in learned)).item()  # noqa: E731
    assert (origin["x"], origin["y"]) == (0.0, 0.0)
    assert (b_corner["x"] ** 2 + b_corner["y"] ** 2) ** 0.5 == pytest.approx(dist(states[0], states[1]), rel=1e-5)
    assert ((b_corner["x"] - c_corner["x"]) ** 2 + (b_corner["y"] - c_corner["y"]) ** 2) ** 0.5 == pytest.approx(
        dist(states[1], states[2]), rel=1e-5)


def test_interpolation_and_barrier() -> None:
    a, b = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}, {"w": torch.tensor([4.0, 2.0]), "n": torch.tensor(9)}
    mid = interpolate((a, b), (0.5, 0.5))
    assert torch.equal(mid["w"], torch.tensor([2.0, 2.0])) and mid["n"].item() == 3
    rows = [{"a": t, "exit": -1, "loss": v, "accuracy": 1 - v / 10} for t, v in ((0.0, 1.0), (0.5, 4.0), (1.0, 3.0))]
    assert barrier(rows) == pytest.approx(2.0)  # 4 against the chord's 2
    assert barrier(rows, key="accuracy", sign=-1.0) == pytest.approx(0.2)


def test_one_node_per_seed_reads_every_regime_final_model() -> None:
    spec = load_spec(None, ["analyses.connectivity.enabled=true", "analyses.connectivity.plane_steps=5", "seeds=[0, 1]"])
    g = build_graph(spec)
    for seed in (0, 1):
        node = g.nodes[f"seed{seed}/analyze/connectivity"]
        assert node.kind == "analyze.connectivity"
        assert node.config.regimes == ("disjoint", "mixed", "joint") and node.config.plane_steps == 5
        assert node.inputs == (f"seed{seed}/disjoint/P3", f"seed{seed}/mixed/P2", f"seed{seed}/joint/P2")
        assert node.inputs == tuple(g.nodes[f"seed{seed}/{r}/evaluate"].inputs[0] for r in node.config.regimes)
    one = build_graph(load_spec(None, ["analyses.connectivity.enabled=true", "regimes=[joint]"]))
    assert not any(n.kind == "analyze.connectivity" for n in one.nodes.values())  # no pair: no node
    off = build_graph(load_spec(None, []))
    assert not any(n.kind == "analyze.connectivity" for n in off.nodes.values())


def test_seeds_make_one_node_comparing_each_regime_model_from_its_seed() -> None:
    """D.8: disjoint's and mixed's models from different seeds, as analyses.connectivity.seeds names them."""
    base = ["analyses.connectivity.enabled=true", "seeds=[0, 1, 2]"]
    spec = load_spec(None, [*base, "analyses.connectivity.seeds={joint: 2, disjoint: 0, mixed: 1}"])
    g = build_graph(spec)
    [node] = [n for n in g.nodes.values() if n.kind == "analyze.connectivity"]
    assert node.id == "analyze/connectivity" and node.seed is None
    assert node.config.regimes == ("disjoint", "mixed", "joint") and node.config.model_seeds == (0, 1, 2)
    assert node.inputs == ("seed0/disjoint/P3", "seed1/mixed/P2", "seed2/joint/P2")
    assert node.config.seed == 0  # the batches' and matching's seed: the first model's
    from exitflow.stages.analyze_connectivity import which_models

    assert which_models(node.config) == "disjoint seed 0, mixed seed 1, joint seed 2"  # the plots' titles
    other = build_graph(load_spec(None, [*base, "analyses.connectivity.seeds={joint: 2, disjoint: 0, mixed: 2}"]))
    assert other.nodes["analyze/connectivity"].inputs[1] == "seed2/mixed/P2"
    assert other.nodes["analyze/connectivity"].key != node.key
    pair = build_graph(load_spec(None, [*base, "analyses.connectivity.seeds={mixed: 1, disjoint: 2}"]))
    assert pair.nodes["analyze/connectivity"].inputs == ("seed2/disjoint/P3", "seed1/mixed/P2")


@pytest.mark.parametrize(("seeds", "says"), [
    ("{joint: 0}", "at least two regimes"),
    ("{joint: 0, mixed: 3}", "mixed's seed 3 is not among the study's seeds"),
    ("{joint: 0, disjoint: 1}", "'disjoint' is not among the study's regimes"),
])
def test_seeds_naming_a_missing_model_are_refused_naming_the_field(seeds: str, says: str) -> None:
    from exitflow.pipeline.spec import SpecError

    with pytest.raises(SpecError, match="analyses.connectivity.seeds") as e:
        load_spec(None, ["analyses.connectivity.enabled=true", "seeds=[0, 1]", "regimes=[joint, mixed]",
                         f"analyses.connectivity.seeds={seeds}"])
    assert says in str(e.value)


class _Model:
    """A finished input node as the stage sees it: a checkpoint and the spec that rebuilds its net."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.state, self.spec = net.state_dict(), {"net": net.spec.to_dict()}

    def checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        return self.state, self.spec


def test_the_stage_run_writes_every_pair_the_plane_and_their_plots(tmp_path: object) -> None:
    """The node's own run, without Ray: three regimes' (untrained) digits models, a small grid."""
    from types import SimpleNamespace

    from exitflow.pipeline.stage import RunSettings, get_stage
    from exitflow.stages.analyze_connectivity import CONNECTIVITY

    spec = load_spec(None, ["analyses.connectivity.enabled=true", "analyses.connectivity.samples=40",
                            "analyses.connectivity.train_samples=40", "analyses.connectivity.points=2",
                            "analyses.connectivity.plane_steps=2", "net.width=8"])
    node = build_graph(spec).nodes["seed0/analyze/connectivity"]
    stage = get_stage(node.kind)
    info = NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, width=8, exit_every=2, exit_start=2)
    nets = [_net(info, seed) for seed in range(3)]
    inputs = [_Model(n) for n in nets]
    ctx = SimpleNamespace(settings=RunSettings(), workdir=tmp_path)
    result = stage.run(node, inputs, ctx)
    stage.check_outputs(result)
    [table] = [a for a in result.artifacts if getattr(a, "kind", None) == CONNECTIVITY.name]
    assert set(CONNECTIVITY.columns) <= set(table.table.column_names)
    rows = table.table.to_pylist()
    pairs = {("line", "disjoint-mixed"), ("line", "disjoint-joint"), ("line", "mixed-joint"), ("plane", "disjoint-mixed-joint")}
    assert {(r["kind"], r["models"]) for r in rows} == pairs
    exits = nets[0].num_exits  # resnet20: ICs after blocks 2, 4, 6, 8, and the final head
    assert exits == 5 and sum(r["kind"] == "plane" for r in rows) == 2 * 2 * (exits + 1)
    assert sum(r["models"] == "disjoint-joint" for r in rows) == 2 * (exits + 1)
    # the plane's origin and the disjoint end of its lines are the same repaired model
    origin = {r["exit"]: r["loss"] for r in rows if r["kind"] == "plane" and r["a"] == r["b"] == 0.0}
    line_start = {r["exit"]: r["loss"] for r in rows if r["models"] == "disjoint-mixed" and r["a"] == 0.0}
    assert origin == pytest.approx(line_start, rel=1e-6)
    assert {p.path.name for p in result.artifacts if hasattr(p, "path")} == {"connectivity_line.png", "connectivity_plane.png"}
    assert all(p.path.stat().st_size > 0 for p in result.artifacts if hasattr(p, "path"))
    assert {k for k in result.metrics if k.startswith("barrier_")} == {"barrier_disjoint_mixed", "barrier_disjoint_joint",
                                                                      "barrier_mixed_joint"}
    assert all(v >= 0.0 for v in result.metrics.values())
