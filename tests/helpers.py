"""Small builders shared by the Ray-backed tests (tiny digits studies that train in seconds)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exitflow.pipeline.spec import StudySpec, load_spec

def digits_net(seed: int) -> Any:
    """The PyTorch-core tests' tiny net, seeded: CIFAR ResNet-20 at width 8 on 8x8 digits, ICs after blocks 3 and 6."""
    from exitflow.stages.core.loop import seed_everything
    from exitflow.stages.core.nets import NetSpec, create_net

    seed_everything(seed)
    return create_net(NetSpec(backbone="resnet20", num_classes=10, in_chans=1, img_size=8, exits=(3, 6), width=8))


TINY = [
    "net.width=8",
    "resources.num_workers=1",
    "resources.torch_threads=1",
    "evaluation.thresholds=20",
]


def tiny_spec(storage: str | Path, *sets: str, epochs: int = 2) -> StudySpec:
    """A digits study with every phase `epochs` long (patience never stops it first)."""
    phase = [f"phases.{p}.{k}={v}" for p in ("P1", "P2", "P3") for k, v in (("max_epochs", epochs), ("patience", epochs + 1))]
    return load_spec(None, [*TINY, *phase, f"tracking.storage_path={storage}", *sets])


def phase_job(max_epochs: int = 3, fault: str | None = None, phase: str = "P1", lr: float = 3e-3) -> Any:
    """A digits phase (resnet20, width 8) for the train and tune stages; patience never stops it first."""
    from exitflow.stages.core.data import DataSpec, dataset_info
    from exitflow.stages.core.faults import parse_plan
    from exitflow.stages.core.loop import PhaseConfig
    from exitflow.stages.core.nets import NetChoice
    from exitflow.stages.phase_kind import PhaseJob
    from exitflow.stages.phase_plan import PhaseNodeConfig

    data = DataSpec(name="digits")
    info = dataset_info(data)
    choice = NetChoice(backbone="resnet20", exit_every=2, exit_start=2, width=8)
    train = PhaseConfig(optimizer="adam", lr=lr, batch_size=64, max_epochs=max_epochs, patience=max_epochs + 1,
                        schedule="cosine", selection="final" if phase == "P1" else "mean")
    config = PhaseNodeConfig(phase=phase, seed=0, data=data, net=choice, train=train)
    return PhaseJob(config=config, net=choice.sized(info.num_classes, info.in_chans, info.img_size),
                    fault_plan=parse_plan(fault or ""), label="test")


def runs(client: Any, experiment: str, **tags: str) -> list[Any]:
    """Runs of an experiment whose tags match (keys without the 'exitflow.' prefix)."""
    exp = client.get_experiment_by_name(experiment)
    clauses = [f"tags.`exitflow.{k}` = '{v}'" for k, v in tags.items()]
    return client.search_runs([exp.experiment_id], filter_string=" and ".join(clauses), max_results=1000)


@dataclass(frozen=True)
class Store:
    """The suite's tracking store: the HTTP URI every process logs to, and where artifacts lie on disk."""

    uri: str
    artifacts: Path

    def artifact_file(self, artifact_uri: str, path: str) -> Path:
        """The file behind `path` of a run whose artifact URI is `artifact_uri` (mlflow-artifacts:/...)."""
        return self.artifacts / artifact_uri.removeprefix("mlflow-artifacts:/") / path


def is_loopback(ip: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(ip).is_loopback


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing holds now."""
    from exitflow.pipeline.loopback import free_loopback_port

    return free_loopback_port()


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = {pid}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def listening_addresses(root_pid: int) -> set[tuple[str, str, int]]:
    """(process name, ip, port) of every listening TCP socket held by `root_pid` and its descendants (from /proc)."""
    pids = descendants(root_pid)
    inodes: dict[int, int] = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[int(target[8:-1])] = pid
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] != "0A" or int(parts[9]) not in inodes:  # 0A: LISTEN
                continue
            hex_ip, hex_port = parts[1].split(":")
            found.add((_name(inodes[int(parts[9])]), _ip(hex_ip), int(hex_port, 16)))
    return found


def _name(pid: int) -> str:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
    except OSError:
        return str(pid)
    return (argv0.rsplit("/", 1)[-1] if argv0.startswith("/") else argv0.split(" ")[0]) or str(pid)


def _ip(hex_ip: str) -> str:
    """/proc/net/tcp{,6}'s little-endian 32-bit words as an address."""
    import ipaddress

    raw = bytes.fromhex(hex_ip)
    ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:a.b.c.d: an IPv4 socket on a dual-stack one
    return str(mapped or ip)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def run_in_terminal(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float, columns: int = 140) -> tuple[int, str]:
    """Run `cmd` with a pseudo-terminal as its stdin, stdout and stderr, as in a user's shell; returns its
    exit status and everything it wrote (both streams, in order), control sequences removed."""
    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env, "TERM": "xterm-256color", "COLUMNS": str(columns)},
                            stdin=side, stdout=side, stderr=side, start_new_session=True)
    os.close(side)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            raise TimeoutError(f"{cmd} ran past {timeout} s")
        rc = proc.wait(timeout=60)
    finally:
        os.close(main)
    return rc, ANSI.sub("", b"".join(chunks).decode(errors="replace"))
