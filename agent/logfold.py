"""Fold repeated log lines: the first one is printed, the repeats counted.

A destination that refuses every event, a library that logs each returned
message: the same warning many times a second fills a small device's journal
and hides everything else. The stream handler's filter prints the first line
of a kind, then, at most once a minute while it repeats, one line saying how
many more there were and the last of them.

"The same kind" is the same logger, level and message: for the agent's own
loggers the message as printed (two different files are two kinds); for
libraries' loggers (pika, paho, watchdog) the message template, since they
put each returned message or packet into their lines.
Counters of warnings (``edge-agent status``) count every one of them.
"""

from __future__ import annotations

import logging
import threading
import time

#: A kind of line is printed at most once in this many seconds, then summed up.
FOLD_WINDOW = 60.0


class _Kind:
    __slots__ = ("last", "repeats", "since")

    def __init__(self, now: float) -> None:
        self.since = now
        self.repeats = 0
        self.last: logging.LogRecord | None = None


class RepeatFolder(logging.Filter):
    """A handler filter: passes a line's first occurrence, counts repeats in a window."""

    def __init__(self, handler: logging.Handler, window: float = FOLD_WINDOW) -> None:
        super().__init__()
        self.handler = handler
        self.window = window
        self._kinds: dict[tuple, _Kind] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(record: logging.LogRecord) -> tuple:
        if record.name == "edge_agent" or record.name.startswith("edge_agent."):
            return record.name, record.levelno, record.getMessage()
        return record.name, record.levelno, str(record.msg)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, "folded", False):
            return True
        now = time.monotonic()
        key = self._key(record)
        with self._lock:
            kind = self._kinds.get(key)
            if kind is None or now - kind.since >= self.window:
                summary = self._summary(kind)
                self._kinds[key] = _Kind(now)
            else:
                kind.repeats += 1
                kind.last = record
                return False
        if summary is not None:
            self.handler.handle(summary)
        return True

    def flush_due(self) -> None:
        """Print the summaries of kinds whose window ended (call now and then)."""
        now = time.monotonic()
        with self._lock:
            ended = [key for key, kind in self._kinds.items() if now - kind.since >= self.window]
            summaries = [self._summary(self._kinds.pop(key)) for key in ended]
        for summary in summaries:
            if summary is not None:
                self.handler.handle(summary)

    def _summary(self, kind: _Kind | None) -> logging.LogRecord | None:
        if kind is None or not kind.repeats or kind.last is None:
            return None
        last = kind.last
        record = logging.makeLogRecord(
            {
                "name": last.name,
                "levelno": last.levelno,
                "levelname": last.levelname,
                "msg": "%d more like this in %.0fs; the last: %s",
                "args": (kind.repeats, time.monotonic() - kind.since, last.getMessage()),
                "folded": True,
            }
        )
        return record


def flush_folded() -> None:
    """Print due summaries of every folding filter on the root logger's handlers."""
    for handler in logging.getLogger().handlers:
        for filter in handler.filters:
            if isinstance(filter, RepeatFolder):
                filter.flush_due()
