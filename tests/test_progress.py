"""Progress lines of the processes a run starts: one handler per logger, re-pointed, never doubled."""

from __future__ import annotations

import logging

from exitflow.stages.core.log_lines import progress_logging


def test_progress_lines_go_to_the_last_target_once() -> None:
    first: list[str] = []
    second: list[str] = []
    try:
        progress_logging(emit=first.append)
        logging.getLogger("exitflow.stages.core.loop").info("one")
        progress_logging("exitflow.stages.core.loop", emit=second.append)  # a reused Ray worker, a later run's relay
        logging.getLogger("exitflow.stages.core.loop").info("quiet now")
        logging.getLogger("exitflow.pipeline.locks").info("two")
        logging.getLogger("exitflow.stages.core.loop").warning("still warns")
        assert first == ["one"]
        assert second == ["two", "still warns"]
        assert len(logging.getLogger("exitflow").handlers) == 1 and not logging.getLogger("exitflow").propagate
    finally:
        logging.getLogger("exitflow.stages.core.loop").setLevel(logging.NOTSET)
        for name in ("exitflow",):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
            logger.setLevel(logging.NOTSET)
