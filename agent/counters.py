"""Counters behind ``edge-agent status`` and the metrics: latencies and problems per plugin.

:class:`Latency` keeps a histogram (for Prometheus) and the most recent
observations (for p50/p99 in ``status``). :class:`LoggedProblems` counts the
warnings and errors each plugin instance logs through its ``self.log``.
"""

from __future__ import annotations

import bisect
import collections
import logging

#: Upper bounds, in seconds, of the latency histogram's buckets (Prometheus "le").
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RECENT = 1024


class Latency:
    """Durations in seconds: a cumulative histogram and the last :data:`RECENT` of them.

    Observed from one thread (the forwarder's), read from others; a reader
    may see the buckets one observation ahead of the count, never a torn value.
    """

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one: +Inf
        self.recent: collections.deque[float] = collections.deque(maxlen=RECENT)

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.count += 1
        self.sum += seconds
        self.recent.append(seconds)

    def cumulative(self) -> list[tuple[str, int]]:
        """[(le, count of observations ≤ le)], "+Inf" last, as Prometheus wants them."""
        total = 0
        result = []
        for bound, count in zip([*LATENCY_BUCKETS, None], list(self.buckets), strict=True):
            total += count
            result.append(("+Inf" if bound is None else repr(bound), total))
        return result

    def percentiles(self) -> dict[str, float | None]:
        """p50 and p99 of the recent observations (None before the first)."""
        recent = sorted(self.recent)
        if not recent:
            return {"p50": None, "p99": None}
        return {
            "p50": recent[(len(recent) - 1) // 2],
            "p99": recent[min(len(recent) - 1, round(0.99 * (len(recent) - 1)))],
        }


def utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8, without encoding it when it is ASCII (most events)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


class LoggedProblems(logging.Handler):
    """Counts WARNING and worse records from ``edge_agent.{source,sink,processor}.NAME``.

    Those are the loggers plugin instances get as ``self.log``; the agent's own
    lines about a plugin use other loggers and are counted where they happen.
    """

    KINDS = ("source", "sink", "processor")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:  # called holding self.lock
        parts = record.name.split(".", 2)
        if len(parts) == 3 and parts[0] == "edge_agent" and parts[1] in self.KINDS:
            self.counts[(parts[1], parts[2])] += 1

    def get(self, kind: str, name: str) -> int:
        return self.counts.get((kind, name), 0)
