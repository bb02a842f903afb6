"""Repeated log lines are folded: the first printed, the rest counted."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from edge_agent.logfold import RepeatFolder
from edge_agent.testing import wait_for


@contextmanager
def printed(
    logger_name: str, window: float
) -> Iterator[tuple[io.StringIO, logging.Logger, RepeatFolder]]:
    """A logger printing into a string through a folding handler, as the agent's stderr."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    folder = RepeatFolder(handler, window=window)
    handler.addFilter(folder)
    logger = logging.getLogger(logger_name)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield out, logger, folder
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


def test_a_library_line_repeated_500_times_prints_once_then_a_count():
    with printed("pika.channel", window=0.2) as (out, pika, folder):
        for i in range(500):
            pika.warning("Published message was returned: body=%s", f"event {i}")
        assert out.getvalue().count("\n") == 1

        def summed_up() -> bool:
            folder.flush_due()
            return "more like this" in out.getvalue()

        wait_for(summed_up, 5, "the summary line")
        lines = out.getvalue().splitlines()
        assert len(lines) == 2
        assert "499 more like this" in lines[1] and "body=event 499" in lines[1]


def test_the_agents_own_lines_fold_only_when_they_say_the_same():
    with printed("edge_agent.source.fold", window=60) as (out, own, _):
        for name in ("a", "b", "a", "a"):
            own.warning("cannot open %s", name)
        own.info("below warning: never folded")
        own.info("below warning: never folded")
        assert out.getvalue().splitlines() == [
            "WARNING edge_agent.source.fold: cannot open a",
            "WARNING edge_agent.source.fold: cannot open b",
            "INFO edge_agent.source.fold: below warning: never folded",
            "INFO edge_agent.source.fold: below warning: never folded",
        ]
