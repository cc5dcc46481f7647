"""Run a command (the local `mlflow server`) that dies with the exitflow process that started it.

`exitflow` serves a local sqlite store over HTTP for as long as a command runs. If that
process is killed outright (SIGKILL, OOM killer), nothing of it runs to stop the server, and
the server with its worker processes would linger, holding the store. This guard runs
between the two: it starts the command in its own process group, watches its owner, and
takes the whole group down when the owner is gone or when it is told to stop (SIGTERM).

usage: python -m exitflow.pipeline.store_guard OWNER_PID -- COMMAND [ARGS...]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import NoReturn

POLL_S = 0.5  # how often the guard checks its owner
GRACE_S = 5.0  # SIGTERM -> SIGKILL


def _take_down(server: subprocess.Popen[bytes]) -> NoReturn:
    """SIGTERM the group (server, its workers), then SIGKILL whatever remains, this guard last."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal below reaches the guard too
    group = os.getpgrp()
    os.killpg(group, signal.SIGTERM)
    try:
        server.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    code = server.returncode if server.returncode is not None else 1
    os.killpg(group, signal.SIGKILL)  # workers the server left behind, and the guard itself
    sys.exit(code)  # not reached: SIGKILL above ends the guard


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit(f"usage: python -m exitflow.pipeline.store_guard OWNER_PID -- COMMAND [ARGS...]; got {argv}")
    owner = int(argv[0])
    server = subprocess.Popen(argv[2:])  # inherits the guard's own process group
    signal.signal(signal.SIGTERM, lambda *_: _take_down(server))
    # Reparenting is how a dead owner shows: a PID can be reused, the parent link cannot.
    while os.getppid() == owner and server.poll() is None:
        time.sleep(POLL_S)
    if server.poll() is not None:
        sys.exit(server.returncode)  # the server ended by itself: its error is in its log
    _take_down(server)


if __name__ == "__main__":
    main(sys.argv[1:])
