"""A local Ray's processes find its own state API, even beside another Ray on the machine.

Ray Train's placement-group cleaner asks the state API whether a run's controller is still alive.
Without an address, Ray's client looks for Ray on the machine and gives up when it finds two (the
suite's own_ray group runs clusters beside the shared session; a user runs two studies): the
cleaner died, a stopped trial's placement groups kept their CPUs, and a later phase that needed
them waited forever. The suite's session starts as `exitflow run` starts a local Ray
(`pipeline.ray_session.init_local_ray`).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.ray


@pytest.fixture
def another_ray_on_the_machine() -> Iterator[str]:
    """What Ray's discovery takes for a second Ray on this machine: a process named `raylet` that names
    its GCS address."""
    address = "127.0.0.1:9"
    proc = subprocess.Popen(["raylet", "-c", "import time; time.sleep(300)", f"--gcs-address={address}"],
                            executable=sys.executable)
    try:
        yield address
    finally:
        proc.kill()
        proc.wait()


def test_a_process_of_the_session_asks_its_own_state_api_beside_another_ray(
        ray_session: None, another_ray_on_the_machine: str) -> None:
    import ray

    @ray.remote(num_cpus=0)
    class Controller:
        def ping(self) -> bool:
            return True

    @ray.remote(num_cpus=0)
    def cleaner_asks(actor_id: str) -> tuple[set[str], bool]:
        """What Train's placement-group cleaner asks, from a process of the job, discovery's cache cleared."""
        from ray._private import services
        from ray.train.v2._internal.state.util import is_actor_alive

        services.find_gcs_addresses.cache_clear()
        return set(services.find_gcs_addresses()), bool(is_actor_alive(actor_id, timeout=30))

    controller = Controller.remote()
    assert ray.get(controller.ping.remote())
    seen, alive = ray.get(cleaner_asks.remote(controller._actor_id.hex()))
    # two or more sessions on the machine (a CI box may run others): discovery alone would give up here
    assert another_ray_on_the_machine in seen and len(seen) >= 2
    assert alive
    ray.kill(controller)
