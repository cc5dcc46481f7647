"""Progress lines from inside Ray processes, independent of how Ray configured their logging.

Ray (and Ray Train, in its workers) configure the root logger of the processes they start;
our loggers carry their own stderr handler instead, so their INFO lines show whatever that
configuration is, once each. Ray forwards every process's stderr to the driver.
"""

from __future__ import annotations

import logging

OWN_LOGGERS = ("pipeline", "stages")


class _ProgressHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so a second call does not add another."""


def progress_logging(*quiet: str) -> None:
    """INFO lines of exitflow's loggers on stderr; the loggers named in `quiet` only warn."""
    for name in OWN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _ProgressHandler) for h in logger.handlers):
            handler = _ProgressHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the root logger's handlers (Ray's or Train's) would print it twice
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)


def brief(e: BaseException) -> str:
    """`Type: first line` of an error, for one-line warnings and messages."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
