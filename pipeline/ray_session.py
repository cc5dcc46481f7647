"""Ray for a run: a local Ray started with what its processes need, or a cluster joined (and checked
before anything is written); the environment every process of the job gets."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import ray

from exitflow.pipeline import tracking
from exitflow.pipeline.loopback import free_loopback_port
from exitflow.pipeline.relay import quiet_ray_notices
from exitflow.stages.core.log_lines import first_line


def job_env() -> dict[str, str]:
    """Env vars of every process of the job, on one machine or a cluster."""
    tuned = {k: v for k, v in os.environ.items() if k.startswith("RAY_TRAIN_")}
    return {
        **tracking.CLIENT_ENV,
        **tuned,  # the user's own Train settings reach every process
        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore:`torch.jit.script` is deprecated:FutureWarning",
        "RAY_AIR_NEW_OUTPUT": "0",  # Tune's new reporter prints a banner per search whatever its verbosity
    }


def local_env() -> dict[str, str]:
    """`job_env` plus what a local Ray on one machine needs."""
    return {
        **job_env(),
        "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),  # hosts resolving to 127.0.1.1
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
        # One machine has no node to lose to preemption: skip the watcher actor each phase would start.
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"),
    }


STATE_API_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's state API clients look first


def runtime_env(env: dict[str, str], py_modules: Sequence[str] = ()) -> dict[str, Any]:
    """The job's runtime environment: its env vars, and the user's own modules (`pipeline.user_code`:
    a backbone builder beside the spec) that Ray ships to every worker, which installs nothing."""
    return {"env_vars": env, **({"py_modules": list(py_modules)} if py_modules else {})}


def init_local_ray(env: dict[str, str], py_modules: Sequence[str] = (), **init: Any) -> Any:
    """`ray.init` of a local Ray whose processes know where its state API is: its dashboard, on a
    loopback port chosen here and named in every process's environment.

    Ray Train's placement-group cleaner asks the state API whether a run's controller is alive.
    Without an address it looks for Ray on the machine (`ray start`'s address file, then raylet
    processes) and gives up when it finds two: a second study, a `ray start` cluster. The
    placement groups of a run whose controller died (a trial ASHA stopped, a killed worker) then
    keep their CPUs until Ray stops, and the next phase that needs them waits forever."""
    ctx = None
    for _ in range(3):
        port = free_loopback_port()
        ctx = ray.init(runtime_env=runtime_env({**env, STATE_API_ENV: f"http://127.0.0.1:{port}"}, py_modules),
                       include_dashboard=True, dashboard_port=port, **init)
        url = ctx.dashboard_url or ""
        if not url or url.rsplit(":", 1)[-1] == str(port):
            return ctx
        ray.shutdown()  # another process bound the port first: the address would name its server
    return ctx


class ClusterError(RuntimeError):
    """The Ray cluster named by --address / $RAY_ADDRESS cannot be reached or joined."""


RAY_CLIENT_PORT = 10001  # Ray Client's port on a head node, when a ray:// address names none


def check_address(address: str | None) -> None:
    """Fail fast, before anything is stored, when a cluster address takes no connections: `HOST:PORT`
    of its GCS, or `ray://HOST[:PORT]` of its Ray Client server ("auto" and a local start are left
    to Ray; so is another scheme, which names a Ray Client plugin)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return
    scheme, sep, rest = address.partition("://")
    if sep and scheme != "ray":
        return
    where = rest.split("/", 1)[0] if sep else address
    host, colon, port = where.rpartition(":")
    if sep and not colon:
        host, port = where, str(RAY_CLIENT_PORT)
    elif not colon or not port.isdigit() or not host:
        expected = ("ray://HOST:PORT of the cluster's Ray Client server (10001 by default)" if sep else
                    "HOST:PORT of the cluster's head (its GCS port, 6379 by default)")
        raise ClusterError(f"--address {address!r}: expected {expected}")
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None
    # Ray would wait minutes on a port that takes connections but is no Ray (its GCS client retries
    # without end): both of its ports speak gRPC, whose handshake answers in milliseconds.
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", "") and not _speaks_grpc(host, int(port)):
        port_name = "its Ray Client port, 10001 by default" if sep else "its GCS port, 6379 by default"
        raise ClusterError(f"{address} takes connections but is not a Ray cluster (no gRPC answer in "
                           f"{GRPC_WAIT_S:.0f} s): is it the head's port ({port_name})?")


GRPC_WAIT_S = 10.0  # a gRPC handshake on a loaded head still answers well within this


def _speaks_grpc(host: str, port: int) -> bool:
    """Whether the server at host:port completes a gRPC (HTTP/2) handshake within GRPC_WAIT_S."""
    import grpc  # Ray's own dependency

    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=GRPC_WAIT_S)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


@contextlib.contextmanager
def joined(address: str | None, ray_logs: bool, py_modules: Sequence[str] = ()) -> Iterator[None]:
    """Join the cluster a run names (--address, $RAY_ADDRESS) for the block, and leave it after: joined
    before anything is written, so an address that answers but is no Ray (or refuses this client)
    fails with the store untouched. A local Ray is not started here: only once a node must run."""
    joined = ensure_ray(address, ray_logs, py_modules) if address or os.environ.get("RAY_ADDRESS") else False
    try:
        yield
    finally:
        if joined:
            ray.shutdown()


def ensure_ray(address: str | None, ray_logs: bool = False, py_modules: Sequence[str] = ()) -> bool:
    """Join `address` / $RAY_ADDRESS, or start a local Ray; True if we started it (and stop it).
    `py_modules`: files and package folders of the user's that every worker imports (shipped by Ray).

    Ray's own output of the processes stays in the session's log files unless `ray_logs`: the
    terminal shows exitflow's lines, relayed by `pipeline.relay`."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    env = job_env() if address else local_env()
    os.environ.update(env)  # the driver's own MLflow clients too
    # The dashboard serves the state API, which Ray Train's placement-group cleaner needs: without
    # it, the workers' resources of a trial that Tune stops (ASHA) are never given back.
    if not address:  # a local Ray's default token auth is right; its notice about it is not progress
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    common: dict[str, Any] = dict(logging_level=logging.WARNING, configure_logging=False, log_to_driver=ray_logs)
    try:
        if address:  # a cluster's nodes each know their Ray (`ray start` writes its address)
            ray.init(address=address, runtime_env=runtime_env(env, py_modules), include_dashboard=True, **common)
        else:
            init_local_ray(env, py_modules, **common)
    except (ConnectionError, RuntimeError) as e:
        if not address:
            raise
        why = first_line(e)
        hint = ""
        if "Authentication" in str(e) or "GCS" in str(e):
            hint = (" (a cluster with token authentication needs RAY_AUTH_MODE=token and the cluster's token in "
                    "RAY_AUTH_TOKEN; and the same Ray version as the cluster)")
        raise ClusterError(f"could not join the Ray cluster at {address}: {why}{hint}") from None
    if not ray_logs:
        quiet_ray_notices()
    return True


def ray_logs_dir() -> str | None:
    """Where the local Ray this process started writes its processes' output (Ray has no public
    call for it: None if its internals moved)."""
    try:
        return str(ray._private.worker._global_node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 - only a hint for the terminal
        return None
