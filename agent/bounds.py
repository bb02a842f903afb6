"""Queue bounds: size, count and age limits, the full-queue policy, and the disk reserve.

Owned by the writer thread, which asks :meth:`Bounds.admit` before each
commit and calls :meth:`Bounds.housekeeping` between commits.

- ``max_bytes`` counts the live pages of the database plus its WAL file.
- ``max_events`` counts queued events.
- ``max_age`` drops events older than that, whatever the policy.
- ``reserve_free``: the queue stops growing while the filesystem has less than
  this free, so that acknowledgements (deletes), checkpoints and WAL
  checkpoints still find room: SQLite on a full disk fails the very delete an
  acknowledgement needs. Default: min(64 MiB, 10% of the filesystem).
- ``when_full = "drop_oldest"`` makes room by deleting the oldest events
  (counted per source, logged at most once a minute); ``"block"`` makes
  sources wait until sinks confirm enough to make room.
- Dead letters (:mod:`edge_agent.dead_letters`) count against ``max_events`` and
  ``max_bytes``, and are dropped with the events, oldest first (by their
  event's place in the queue), and by ``max_age``; counted per sink.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass

from edge_agent.queue import QueueWriter, Usage

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


#: The default reserve: this much, or RESERVE_SHARE of a smaller filesystem.
RESERVE_MAX = 64 * 1024 * 1024
RESERVE_SHARE = 0.10


@dataclass(frozen=True)
class Limits:
    """The ``[queue]`` bounds; 0 means no limit; ``reserve_free`` None: the default."""

    max_bytes: int = 0
    max_events: int = 0
    max_age: float = 0.0
    reserve_free: int | None = 0
    when_full: str = "drop_oldest"


def default_reserve(state_dir: str) -> int:
    """``reserve_free`` when the config says nothing: min(64 MiB, 10% of the filesystem).

    A fixed 64 MiB would leave nothing for the queue on a small state
    filesystem (an 8 MiB partition would accept no event at all).
    """
    stat = os.statvfs(state_dir)
    return min(RESERVE_MAX, int(stat.f_blocks * stat.f_frsize * RESERVE_SHARE))


class Bounds:
    """Applies :class:`Limits` to the queue the writer owns."""

    def __init__(self, queue: QueueWriter, limits: Limits, state_dir: str) -> None:
        self.queue = queue
        if limits.reserve_free is None:
            limits = dataclasses.replace(limits, reserve_free=default_reserve(state_dir))
        self.limits = limits
        self.state_dir = state_dir
        self._check_reserve()
        #: Events dropped since start, per source, by the full-queue policy or max_age.
        self.dropped: Counter[str] = Counter()
        #: The same, per (source, reason): reason "queue_full" or "max_age".
        self.dropped_by_reason: Counter[tuple[str, str]] = Counter()
        self._unreported: Counter[str] = Counter()
        self._dead_reported: Counter[str] = Counter()
        self._why = ""
        self._last_warning = 0.0
        self._last_expire = 0.0
        #: Why the queue cannot grow now (events wait or old ones are dropped), or None.
        self.full_reason: str | None = None
        self.full_since = 0.0
        self._last_full_warning = -WARN_EVERY
        self._said_full = False
        self._full_action: str | None = None
        self._appended: collections.deque[tuple[float, int]] = collections.deque()

    def _check_reserve(self) -> None:
        """Warn at start when the reserve leaves the queue no room at all."""
        reserve = self.limits.reserve_free or 0
        stat = os.statvfs(self.state_dir)
        free = stat.f_bavail * stat.f_frsize
        if reserve and free <= reserve:
            log.warning(
                "[queue] reserve_free is %d KiB but the filesystem of %s has only %d KiB free:"
                " the queue takes no events until space is freed there (or reserve_free is"
                " lowered)",
                reserve // 1024,
                self.state_dir,
                free // 1024,
            )

    # -- before a commit -------------------------------------------------------

    def admit(self, count: int, data_bytes: int) -> bool:
        """Make room for ``count`` new events; False when they must wait (policy "block")."""
        usage = self.queue.usage()
        needed = data_bytes + count * ROW_OVERHEAD
        if usage.events:  # what an event really takes here, pages and index included...
            # ...but at most a few times its data: with few events queued, the average
            # also spreads the file's other tables (a source's index, dead letters) over
            # them, and a batch of a few MiB was taken for tens (sources then waited
            # for room with most of the disk free).
            needed = max(needed, min(count * usage.live_bytes // usage.events, 4 * needed))
        reason, excess_events, excess_bytes = self._over(count, needed, usage)
        if reason is None:
            self._set_full(None)
            return True
        if self.limits.when_full == "block":
            self._set_full(reason)
            return False
        average = (usage.live_bytes / usage.events) if usage.events else needed / max(count, 1)
        to_drop = max(excess_events, math.ceil(excess_bytes / max(average, 1.0)))
        dead_before = sum(self.queue.dead_letters_dropped.values())
        dropped = self.queue.drop_oldest(to_drop)
        dead = sum(self.queue.dead_letters_dropped.values()) - dead_before
        self._count_drops(dropped, f"the queue is full ({reason})", "queue_full")
        short = sum(dropped.values()) + dead < to_drop
        # Nothing (or too little) left to drop: the events wait for room.
        waits = short and (reason.startswith("disk") or excess_events > 0)
        self._set_full(reason, "nothing is left to drop" if waits else None)
        return not waits

    def dropped_unqueued(self, dropped: Counter[str], why: str) -> None:
        """Count events dropped before they reached the queue (policy drop_oldest)."""
        self._count_drops(dropped, why, "queue_full")

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

    def _set_full(self, reason: str | None, nothing_to_drop: str | None = None) -> None:
        """Say (at most once a minute) that the queue cannot grow and what happens then,
        again when that changes, and when it can grow again."""
        now = time.monotonic()
        if reason is None:
            if self.full_reason is not None and self._said_full:
                self._said_full = False
                log.info(
                    "queue has room again after %.0fs (was: %s)",
                    now - self.full_since,
                    self.full_reason,
                )
            self.full_reason = None
            self._full_action = None
            return
        disk = reason.startswith("disk")
        if self.limits.when_full == "block":
            action = 'sources wait until sinks confirm events (when_full = "block")'
            if disk:
                action = 'sources wait until space is freed (when_full = "block")'
        elif nothing_to_drop:
            action = f"{nothing_to_drop}, so sources wait until " + (
                "space is freed" if disk else "sinks confirm events"
            )
        else:
            action = 'the oldest events are dropped to make room (when_full = "drop_oldest")'
        if self.full_reason is None:
            self.full_since = now
        news = self.full_reason is None or action != self._full_action
        if news and now - self._last_full_warning >= WARN_EVERY:
            self._last_full_warning = now
            self._said_full = True
            log.warning("queue cannot grow: %s; %s", reason, action)
        self.full_reason = reason
        self._full_action = action

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
        dead = self.queue.dead_letters_dropped - self._dead_reported
        if not dropped and not dead:
            return
        self.dropped.update(dropped)
        self.dropped_by_reason.update({(s, reason): n for s, n in dropped.items()})
        self._unreported.update(dropped)
        self._why = why
        self._report()

    @property
    def dead_letters_dropped(self) -> Counter[str]:
        """Dead letters dropped since start, per sink."""
        return self.queue.dead_letters_dropped

    def _report(self) -> None:
        dead = self.queue.dead_letters_dropped - self._dead_reported
        quiet = time.monotonic() - self._last_warning < WARN_EVERY
        if (not self._unreported and not dead) or quiet:
            return
        self._last_warning = time.monotonic()
        if dead:
            self._dead_reported.update(dead)
            log.warning(
                "dropped %d dead letters (%s): %s; %d dropped since start",
                sum(dead.values()),
                ", ".join(f"sink {s}: {n}" for s, n in dead.most_common()),
                self._why,
                sum(self.queue.dead_letters_dropped.values()),
            )
        if not self._unreported:
            return
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
