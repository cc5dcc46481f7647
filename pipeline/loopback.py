"""A local run keeps Ray on this machine's loopback interface.

Ray picks the address its services (GCS, raylet, object manager, workers, dashboard agent) listen
on when `ray` is imported: by default the machine's network address, which anyone on the network
can reach. Its own switch for "no cluster here" makes it the loopback address instead, so it must
be set before the first `import ray` of a process that starts a local Ray, and it reaches the
processes Ray starts through their environment. A run that joins a cluster keeps the cluster's
addresses (nothing is set). The MLflow server a run starts listens on 127.0.0.1 (`pipeline/tracking.py`).
"""

from __future__ import annotations

import os
import socket
import sys

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # on Linux too: node address = loopback


def use_loopback() -> None:
    """Make a Ray started by this process listen on loopback only; call before `import ray`
    (again after it is harmless once the switch was set in time, as the test suite does)."""
    if all(os.environ.get(k) == v for k, v in LOOPBACK_ENV.items()):
        return
    if "ray" in sys.modules:
        raise RuntimeError("use_loopback() must run before ray is imported")
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 now (another process may take it before it is bound: check after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
