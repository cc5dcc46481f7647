"""Progress lines from inside Ray processes, independent of how Ray configured their logging.

Ray (and Ray Train, in its workers) configure the root logger of the processes they start;
our loggers carry their own handler instead, so their INFO lines show whatever that
configuration is, once each. The handler writes to stderr, or hands each line to `emit`:
the pipeline passes one that relays the line to the driver's terminal (`pipeline.relay`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

OWN_LOGGERS = ("exitflow",)


Emit = Callable[[str], None]


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _ProgressHandler(logging.Handler):
    """Hands each formatted line to `emit`; marks the handler this module installed, so a second
    call replaces its target instead of adding another."""

    def __init__(self, emit: Emit) -> None:
        super().__init__()
        self.emit_line = emit
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.emit_line(self.format(record))
        except Exception:  # noqa: BLE001 - a progress line must never break the work it reports
            self.handleError(record)


def progress_logging(*quiet: str, emit: Emit = to_stderr) -> None:
    """INFO lines of exitflow's loggers go to `emit` (stderr by default); the loggers named in
    `quiet` only warn."""
    for name in OWN_LOGGERS:
        logger = logging.getLogger(name)
        mine = [h for h in logger.handlers if isinstance(h, _ProgressHandler)]
        if mine:
            mine[0].emit_line = emit
        else:
            logger.addHandler(_ProgressHandler(emit))
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the root logger's handlers (Ray's or Train's) would print it twice
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)


def first_line(e: BaseException) -> str:
    """An error's first line (its type's name when it has no message)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def brief(e: BaseException) -> str:
    """`Type: first line` of an error, for one-line warnings and messages."""
    return f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__
