"""Admission (`pipeline.admission`): a node starts only when the study's running nodes leave room
for what it holds on the cluster; each stage kind states that footprint."""

from __future__ import annotations

import pytest

from exitflow.pipeline.admission import Admission
from exitflow.pipeline.stage import Resources, RunSettings, get_stage
from exitflow.pipeline.graph import build_graph
from exitflow.pipeline.runner import run_settings
from exitflow.pipeline.spec import load_spec


def _admission(cpus: float, gpus: float = 0.0) -> Admission:
    return Admission(capacity=lambda: Resources(cpus, gpus))


def test_nodes_start_while_they_fit_and_the_next_waits_for_a_release() -> None:
    a = _admission(2)
    one = Resources(1.0)
    assert a.fits(one)
    a.admit("seed0/P1", one)
    assert a.fits(one)
    a.admit("seed1/P1", one)
    assert not a.fits(one)  # three seeds on two cores: the third P1 waits in the driver
    assert a.why_waiting(one) == "needs 1 CPU; the study's running nodes hold 2 CPU of 2 CPU"
    a.release("seed0/P1")
    assert a.fits(one)


def test_a_node_larger_than_the_cluster_starts_alone_and_never_stalls_the_study() -> None:
    a = _admission(2)
    big = Resources(8.0)
    assert a.fits(big)  # nothing of the study runs: Ray (or an autoscaler) gets the demand
    a.admit("big", big)
    assert not a.fits(Resources(0.5))
    assert a.fits(Resources())  # a node that holds nothing (the report) never waits


def test_gpus_and_fractional_reservations_are_counted() -> None:
    a = _admission(16, 1)
    trial = Resources(1.01, 0.5)  # a trial: a worker and its 0.01-CPU trial actor, half a GPU
    a.admit("a", trial)
    assert a.fits(trial)
    a.admit("b", trial)
    assert not a.fits(Resources(0.0, 0.5)) and a.fits(Resources(1.0))
    for n in range(100):  # rounding of many small reservations does not refuse the last that fits
        a.admit(f"t{n}", Resources(0.01))
    assert a.fits(Resources(16 - 2.02 - 1.0))


def test_capacity_is_read_on_every_check_and_admission_can_be_off() -> None:
    cpus = [1.0]
    a = Admission(capacity=lambda: Resources(cpus[0]))
    a.admit("x", Resources(1.0))
    assert not a.fits(Resources(1.0))
    cpus[0] = 2.0  # a node joined
    assert a.fits(Resources(1.0))
    off = Admission(capacity=lambda: Resources(1.0), enabled=False)
    off.admit("x", Resources(1.0))
    assert off.fits(Resources(5.0))


@pytest.mark.parametrize("sets, expected", [
    ([], {"seed0/P1": 1.0, "seed0/disjoint/P3": 1.0, "seed0/joint/P2": 1.0, "seed0/joint/evaluate": 1.0, "report": 0.0}),
    (["resources.num_workers=2", "resources.cpus_per_worker=3"], {"seed0/P1": 6.0, "seed0/joint/P2": 6.0, "seed0/joint/evaluate": 3.0}),
    # a search: the trials that run at once (at most max_concurrent_trials); in process each trial is
    # its worker, under Ray Train each adds its trial actor
    (["phases.P2.lr=[1.0e-3,3.0e-3,1.0e-2]"], {"seed0/joint/P2": 2.0}),
    (["phases.P2.lr=[1.0e-3,3.0e-3,1.0e-2]", "search.max_concurrent_trials=5"], {"seed0/joint/P2": 3.0}),
    (["phases.P2.lr=[1.0e-3,3.0e-3,1.0e-2]", "resources.trainer=ray_train"], {"seed0/joint/P2": 2.02}),
])
def test_each_stage_kind_states_what_its_node_holds(sets: list[str], expected: dict[str, float]) -> None:
    spec = load_spec(None, ["regimes=[joint,disjoint]", *sets])
    graph, settings = build_graph(spec), run_settings(spec)
    for node_id, cpus in expected.items():
        node = graph.nodes[node_id]
        assert get_stage(node.kind).footprint(node, settings).num_cpus == pytest.approx(cpus), node_id


def test_gpu_phases_count_their_gpus() -> None:
    settings = RunSettings(num_workers=4, use_gpu=True, gpus_per_worker=1.0, cpus_per_worker=8)
    assert settings.worker_group() == Resources(32.0, 4.0)
    assert RunSettings(num_workers=0).worker_group() == Resources(1.0, 0.0)  # one process
