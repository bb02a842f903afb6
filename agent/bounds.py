"""Queue bounds: size, count and age limits, the full-queue policy, and the disk reserve.

Owned by the writer thread, which asks :meth:`Bounds.admit` before each
commit and calls :meth:`Bounds.housekeeping` between commits.

- ``max_bytes`` counts the live pages of the database plus its WAL file.
- ``max_events`` counts queued events.
- ``max_age`` drops events older than that, whatever the policy.
- ``reserve_free``: the queue stops growing while the filesystem has less than
  this free, so that acknowledgements (deletes), checkpoints and WAL
  checkpoints still find room: SQLite on a full disk fails the very delete an
  acknowledgement needs.
- ``when_full = "drop_oldest"`` makes room by deleting the oldest events
  (counted per source, logged at most once a minute); ``"block"`` makes
  sources wait until sinks confirm enough to make room.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass

from agent.queue import QueueWriter, Usage

log = logging.getLogger("edge_agent.queue")

WARN_EVERY = 60.0
EXPIRE_EVERY = 5.0
#: Give freed pages back to the filesystem once this many are free.
VACUUM_MIN_FREE_PAGES = 1024
VACUUM_STEP_PAGES = 2048
#: Keep as many free pages as events written this many seconds back would take.
VACUUM_HORIZON = 30.0
#: Per-event overhead beyond its data (columns, index), for estimates.
ROW_OVERHEAD = 160


@dataclass(frozen=True)
class Limits:
    """The ``[queue]`` bounds; 0 means no limit."""

    max_bytes: int = 0
    max_events: int = 0
    max_age: float = 0.0
    reserve_free: int = 0
    when_full: str = "drop_oldest"


class Bounds:
    """Applies :class:`Limits` to the queue the writer owns."""

    def __init__(self, queue: QueueWriter, limits: Limits, state_dir: str) -> None:
        self.queue = queue
        self.limits = limits
        self.state_dir = state_dir
        #: Events dropped since start, per source, by the full-queue policy or max_age.
        self.dropped: Counter[str] = Counter()
        #: The same, per (source, reason): reason "queue_full" or "max_age".
        self.dropped_by_reason: Counter[tuple[str, str]] = Counter()
        self._unreported: Counter[str] = Counter()
        self._last_warning = 0.0
        self._last_expire = 0.0
        #: Why the queue cannot grow now (events wait or old ones are dropped), or None.
        self.full_reason: str | None = None
        self.full_since = 0.0
        self._last_full_warning = -WARN_EVERY
        self._said_full = False
        self._appended: collections.deque[tuple[float, int]] = collections.deque()

    # -- before a commit -------------------------------------------------------

    def admit(self, count: int, data_bytes: int) -> bool:
        """Make room for ``count`` new events; False when they must wait (policy "block")."""
        usage = self.queue.usage()
        needed = data_bytes + count * ROW_OVERHEAD
        if usage.events:  # what an event really takes here, pages and index included
            needed = max(needed, count * usage.live_bytes // usage.events)
        reason, excess_events, excess_bytes = self._over(count, needed, usage)
        if reason is None:
            self._set_full(None)
            return True
        if self.limits.when_full == "block":
            self._set_full(reason)
            return False
        average = (usage.live_bytes / usage.events) if usage.events else needed / max(count, 1)
        to_drop = max(excess_events, math.ceil(excess_bytes / max(average, 1.0)))
        dropped = self.queue.drop_oldest(to_drop)
        self._count_drops(dropped, f"the queue is full ({reason})", "queue_full")
        self._set_full(reason)
        # Nothing left to drop and the disk still full: the events must wait for space.
        return not (sum(dropped.values()) < to_drop and reason.startswith("disk"))

    def _over(self, count: int, needed: int, usage: Usage) -> tuple[str | None, int, int]:
        """(reason, events over the limit, bytes over the limit) for ``count`` more events."""
        limits = self.limits
        if limits.reserve_free:
            stat = os.statvfs(self.state_dir)
            free = stat.f_bavail * stat.f_frsize
            if free - needed < limits.reserve_free:
                return (
                    f"disk nearly full: {free // 1024} KiB free in {self.state_dir},"
                    f" reserve_free is {limits.reserve_free // 1024} KiB",
                    0,
                    needed,
                )
        if limits.max_events and usage.events + count > limits.max_events:
            return (
                f"max_events {limits.max_events}",
                usage.events + count - limits.max_events,
                0,
            )
        size = usage.live_bytes + usage.wal_bytes
        if limits.max_bytes and size + needed > limits.max_bytes and usage.wal_bytes:
            # The WAL keeps its size after routine checkpoints; empty it before
            # dropping events to make room that it only seems to take.
            self.queue.checkpoint_wal()
            usage = self.queue.usage()
            size = usage.live_bytes + usage.wal_bytes
        if limits.max_bytes and size + needed > limits.max_bytes:
            return (
                f"max_bytes {limits.max_bytes // 1024} KiB",
                0,
                size + needed - limits.max_bytes,
            )
        return None, 0, 0

    def _set_full(self, reason: str | None) -> None:
        """Say once (at most once a minute) that the queue cannot grow, and when it can again."""
        now = time.monotonic()
        if reason is not None and self.full_reason is None:
            self.full_since = now
            if now - self._last_full_warning >= WARN_EVERY:
                self._last_full_warning = now
                self._said_full = True
                action = (
                    "sources wait until sinks confirm events"
                    if self.limits.when_full == "block"
                    else "the oldest events are dropped to make room"
                )
                log.warning("queue cannot grow: %s; %s", reason, action)
        elif reason is None and self.full_reason is not None and self._said_full:
            self._said_full = False
            log.info(
                "queue has room again after %.0fs (was: %s)",
                now - self.full_since,
                self.full_reason,
            )
        self.full_reason = reason

    def appended(self, data_bytes: int) -> None:
        """The writer committed this much event data (for the vacuum's estimate)."""
        self._appended.append((time.monotonic(), data_bytes))

    # -- between commits ---------------------------------------------------------

    def housekeeping(self) -> None:
        """Expire old events, return free pages to the filesystem, report drops."""
        now = time.monotonic()
        if now - self._last_expire >= EXPIRE_EVERY:
            self._last_expire = now
            self.queue.mark_age()
            if self.limits.max_age:
                expired = self.queue.drop_older_than(self.limits.max_age)
                reason = f"older than max_age {self.limits.max_age:g}s"
                self._count_drops(expired, reason, "max_age")
                log.debug("max_age checked: %d events expired", sum(expired.values()))
            self.queue.forget_age_marks()
        # Free pages that new events will soon take again are left alone:
        # giving them back only for the file to grow again is wasted writes.
        horizon = now - VACUUM_HORIZON
        while self._appended and self._appended[0][0] < horizon:
            self._appended.popleft()
        soon_needed = sum(size for _, size in self._appended)
        self.queue.vacuum_step(VACUUM_MIN_FREE_PAGES, VACUUM_STEP_PAGES, keep_bytes=soon_needed)
        self._report()

    def _count_drops(self, dropped: Counter[str], why: str, reason: str) -> None:
        if not dropped:
            return
        self.dropped.update(dropped)
        self.dropped_by_reason.update({(s, reason): n for s, n in dropped.items()})
        self._unreported.update(dropped)
        self._why = why
        self._report()

    def _report(self) -> None:
        if not self._unreported or time.monotonic() - self._last_warning < WARN_EVERY:
            return
        self._last_warning = time.monotonic()
        total = sum(self._unreported.values())
        per_source = ", ".join(f"{s}: {n}" for s, n in self._unreported.most_common())
        log.warning(
            "dropped %d events (%s): %s; %d dropped since start",
            total,
            per_source,
            self._why,
            sum(self.dropped.values()),
        )
        self._unreported.clear()
