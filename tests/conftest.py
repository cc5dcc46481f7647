"""Shared fixtures: one local Ray session and one MLflow server (temporary sqlite) per test run.

Ray costs 10-30 s to start on a 2-core machine and the MLflow server ~10-20 s, so both are
session-scoped and started lazily: tests that need neither never pay for them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Store

from exitflow.pipeline.loopback import use_loopback

use_loopback()  # before any test module imports ray: the suite's Ray (and each run's own) on 127.0.0.1

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR10 = SHARED / "data" / "cifar10"


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One MLflow server on a fresh sqlite store, as `exitflow run` serves it."""
    from exitflow.pipeline.tracking import DEFAULT_ARTIFACTS
    from exitflow.pipeline.tracking_server import serve_store

    root = tmp_path_factory.mktemp("mlflow")
    with serve_store(f"sqlite:///{root / 'mlflow.db'}") as url:
        yield Store(url, root / DEFAULT_ARTIFACTS)


@pytest.fixture(scope="session")
def mlflow_uri(mlflow_store: Store) -> str:
    """An HTTP tracking URI backed by the suite's sqlite store."""
    return mlflow_store.uri


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole suite: 4 logical CPUs so a Tune trial + Train workers never deadlock."""
    import ray

    from exitflow.pipeline.ray_session import init_local_ray, local_env

    env = local_env()
    os.environ.update(env)
    # As `exitflow run` starts one: its dashboard serves the state API that Train's cleanup of stopped
    # trials asks, at an address every process of the session knows (the own_ray group's clusters
    # run beside it on this machine).
    ctx = init_local_ray(env, num_cpus=4, logging_level="WARNING")
    _DASHBOARD.append(f"http://{ctx.dashboard_url}")
    yield
    ray.shutdown()


_DASHBOARD: list[str] = []  # the suite's Ray dashboard, once ray_session started it

RAY_GROUP = "ray"
OWN_RAY_GROUP = "own_ray"
WAITING_MODULES = ("test_tune", "test_train_stage", "test_faults")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the suite's Ray session (through any fixture) joins one xdist group: under
    `make test` (`-n 2 --dist loadgroup`) one worker runs them all in order, in one Ray session.
    The tests marked `ray` that start Ray clusters of their own (`exitflow run` without --address, a
    two-node cluster) join a second group, which xdist hands the other worker first: they run there,
    in order (never two of their clusters at once), beside the shared session's tests, then that
    worker runs the rest. Both workers then fill the CPU the other leaves idle (Ray's start, a
    single one-thread phase training, Ray Train's polls, a terminal being read)."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group(RAY_GROUP))
        elif item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group(OWN_RAY_GROUP))
    # Modules whose tests mostly wait (Ray Train's actors starting, its 2 s polls, a killed run's
    # own Ray) run first, beside the fast tests; those that keep both cores busy (the fault
    # matrix) after. A stable sort: each module stays whole and in its order.
    items.sort(key=lambda item: getattr(getattr(item, "module", None), "__name__", "") not in WAITING_MODULES)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under `--dist loadgroup` xdist names a grouped test `<id>@<group>`; a pytest where that did not
    take would split the Ray tests over workers, each starting its own Ray: stop instead."""
    if not (os.environ.get("PYTEST_XDIST_WORKER") and session.config.getvalue("loadgroup")):
        return
    loose = [i.nodeid for i in session.items
             if i.get_closest_marker("xdist_group") and not i.nodeid.endswith((f"@{RAY_GROUP}", f"@{OWN_RAY_GROUP}"))]
    if loose:
        raise pytest.UsageError(f"pytest-xdist could not group the Ray tests ({loose[0]} has no @{RAY_GROUP}): "
                                "install the pytest the project pins (pyproject.toml)")


@pytest.fixture(scope="session")
def ray_dashboard(ray_session: None) -> str:
    """The suite's Ray dashboard address: the job API `exitflow submit|status|logs|stop` talk to."""
    return _DASHBOARD[0]


@pytest.fixture(scope="session")
def ray_address(ray_session: None) -> str:
    """The suite's Ray, for `exitflow run --address` in a process of its own (a driver joining a cluster)."""
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny tensors: a second thread gains nothing on them, and
    on a shared 2-core machine a second spinning thread makes epochs 10-20x slower under load."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> Any:
    """sklearn's digits split as a phase reads it (no augmentation, seed 0)."""
    from exitflow.stages.core.data import DataSpec, load_splits

    return load_splits(DataSpec(name="digits", augment=False), seed=0)


@pytest.fixture
def process_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A one-rank gloo process group: DDP and the loop's all-reduces run for real."""
    import torch.distributed as dist

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # hosts resolving to 127.0.1.1 break gloo
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh working directory (holding an empty spec, empty.yaml) with no tracking store or Ray
    address from the environment: what a command run there writes shows."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    (work / "empty.yaml").write_text("")
    yield work


@pytest.fixture
def storage(tmp_path: Path) -> str:
    """A Ray Train/Tune storage folder of this test's own."""
    p = tmp_path / "ray"
    p.mkdir()
    return str(p)


def needs_cifar() -> pytest.MarkDecorator:
    return pytest.mark.skipif(not CIFAR10.is_dir(), reason="../shared/data/cifar10 is absent")
