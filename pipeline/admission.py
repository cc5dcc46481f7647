"""Admission: the driver starts a node only when the study's running nodes leave room for it.

A Ray Train run that cannot place its workers still starts its controller and helper actors
(about 200 MB each) and waits; a study with more phases than slots (three seeds on two cores)
used to hold them all at once. Here a node that does not fit waits in the driver, costing no Ray
process, until a running node of the study ends. The cluster's capacity is read on every check,
so nodes that join are used. A node larger than the whole cluster is started when nothing else of
the study runs (Ray then waits for, or an autoscaler adds, the resources), so a study never stalls.
Other jobs on a shared cluster are not counted: Ray queues against them as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from exitflow.pipeline.stage import Resources

EPSILON = 1e-9  # fractional reservations (0.01 CPU per trial actor) add up with rounding error


def cluster_capacity() -> Resources:
    """The Ray cluster's total CPUs and GPUs, as its nodes declare them now."""
    import ray

    total = ray.cluster_resources()
    return Resources(float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0)))


def describe(r: Resources) -> str:
    return f"{r.num_cpus:g} CPU" + (f", {r.num_gpus:g} GPU" if r.num_gpus else "")


@dataclass
class Admission:
    """What the study's running nodes hold, against the cluster's capacity."""

    capacity: Callable[[], Resources] = cluster_capacity
    enabled: bool = True
    running: dict[str, Resources] = field(default_factory=dict)

    def in_use(self) -> Resources:
        return Resources(sum(r.num_cpus for r in self.running.values()), sum(r.num_gpus for r in self.running.values()))

    def fits(self, need: Resources) -> bool:
        if not self.enabled or not self.running or (need.num_cpus <= 0 and need.num_gpus <= 0):
            return True  # a node holding nothing (the report) never waits
        cap, used = self.capacity(), self.in_use()
        return (used.num_cpus + need.num_cpus <= cap.num_cpus + EPSILON
                and used.num_gpus + need.num_gpus <= cap.num_gpus + EPSILON)

    def admit(self, node: str, need: Resources) -> None:
        self.running[node] = need

    def release(self, node: str) -> None:
        self.running.pop(node, None)

    def why_waiting(self, need: Resources) -> str:
        return f"needs {describe(need)}; the study's running nodes hold {describe(self.in_use())} of {describe(self.capacity())}"
