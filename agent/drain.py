"""Drain limits: how fast a sink may send, and whether live events go before its backlog.

Every sink takes three optional common options, handled by its forwarder and
not by the plugin (as ``name``, ``sources`` and ``types`` are)::

    [[sinks.mqtt]]
    name = "cloud"
    max_rate = 200              # events per second; 0 (default): no limit
    max_bytes_rate = "64KiB"    # bytes of event data per second; 0 (default): no limit
    priority = "live"           # or "fifo" (default)

**Rates.** Each limit is a token bucket that starts empty, fills at the
given rate and holds at most one second's worth (a sink that was idle, or
held up for a moment, may send that much at once; a busy moment of the device
costs no budget). An event goes when both buckets hold something; it then
takes its cost (1 event; the size of its data as stored, JSON in UTF-8, the
measure of the ``confirmed_bytes`` counter) even if that leaves a bucket in
debt, and nothing more goes until the debt is paid back. So an event (or a
batch) larger than one second's budget still goes, at once, and the sink then
waits as long as the budget needs to pay for it. Over any stretch of time,
what is sent is at most the rate times the time, plus one second's worth,
plus one event. Each event is counted when
it is handed to the sink the first time on a connection; an event sent again
after a reconnect is counted again. ``max_bytes_rate`` counts the event data
only: the CloudEvents envelope (about 250 bytes), topics and MQTT headers come
on top.

**Priority.** With ``priority = "live"``, when the sink connects (at start,
after an outage) with events waiting, the newest queued position at that
moment is the cut-off: the events up to it are the backlog, the events
committed after it are live. Live events are handed to the sink first, and
the backlog is sent with what the rate limits and the sink's window leave.
The cut-off stays until the whole backlog is confirmed (a reconnect in the
middle keeps it); after that the sink is back to queue order until it next
connects with a backlog. Events that pile up while the sink is connected
(arriving faster than ``max_rate``) are live: sent in queue order among
themselves. ``fifo`` sends everything in queue order.

Live events therefore reach the destination before older ones: a consumer
restores the order of each source from ``sequence``. Nothing else changes:
an event leaves the queue only once every sink that wants it confirmed it,
and the sink's position on disk moves only over its confirmed backlog, so a
live event confirmed before the backlog is sent again after a restart (at
least once, the same ``id``). Refusals and dead letters follow the same rules
as in queue order.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from edge_agent.counters import utf8_len
from edge_agent.schema import ByteSize, build, option

if TYPE_CHECKING:
    from edge_agent.event import QueuedEvent
    from edge_agent.queue import SinkCursor

#: The sink options this module reads; no plugin may take them.
DRAIN_KEYS = ("max_rate", "max_bytes_rate", "priority")
#: A bucket holds at most this many seconds of its rate.
BURST_SECONDS = 1.0


def _finite(value: float) -> None:
    if math.isinf(value):
        raise ValueError("must be a number of events per second (0 for no limit), got inf")


@dataclass(frozen=True, kw_only=True)
class DrainLimits:
    """A sink's ``max_rate``, ``max_bytes_rate`` and ``priority`` (see the module docstring)."""

    max_rate: float = option(
        0.0,
        min=0,
        validator=_finite,
        doc="Events per second this sink sends at most; 0: no limit.",
    )
    max_bytes_rate: ByteSize = option(
        ByteSize(0),
        min=0,
        doc='Bytes of event data per second this sink sends at most ("64KiB"); 0: no limit.',
    )
    priority: Literal["fifo", "live"] = option(
        "fifo",
        doc='"fifo": queue order. "live": events newer than the backlog the sink found when'
        " it connected go first; the backlog drains with what the limits leave.",
    )

    @property
    def limited(self) -> bool:
        """True when a rate limit is set."""
        return self.max_rate > 0 or self.max_bytes_rate > 0

    def describe(self) -> str:
        """For log lines: ``at most 200 events/s, 65536 bytes/s; live first``."""
        said = []
        if self.max_rate:
            said.append(f"{self.max_rate:g} events/s")
        if self.max_bytes_rate:
            said.append(f"{int(self.max_bytes_rate)} bytes/s")
        text = f"at most {', '.join(said)}" if said else "no rate limit"
        return text + ("; live events first" if self.priority == "live" else "")


UNLIMITED = DrainLimits()


def parse_limits(table: dict[str, Any], where: str, problems: list[tuple[str, str]]) -> DrainLimits:
    """Take ``max_rate``, ``max_bytes_rate`` and ``priority`` out of a sink's table.

    ``where`` is the table's key path (``sinks.mqtt[1]``); a problem per bad value.
    """
    found = {key: table.pop(key) for key in DRAIN_KEYS if key in table}
    if not found:
        return UNLIMITED
    return build(DrainLimits, found, where, problems) or UNLIMITED


class TokenBucket:
    """Starts empty, fills at ``rate`` per second up to ``rate * BURST_SECONDS``; may go
    into debt.

    :meth:`ready` says whether anything may go now; :meth:`take` spends (also
    beyond what is there); :meth:`wait` is how long until :meth:`ready`.
    ``clock`` (monotonic seconds) may be given for tests.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate)
        self.capacity = self.rate * BURST_SECONDS
        self.clock = clock
        self.tokens = 0.0  # no burst at start: a fleet that comes up at once stays calm
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def ready(self) -> bool:
        self._refill()
        return self.tokens > 0

    def take(self, amount: float) -> None:
        self.tokens -= amount

    def wait(self) -> float:
        """Seconds until :meth:`ready` (0 if it is)."""
        self._refill()
        if self.tokens > 0:
            return 0.0
        return (-self.tokens) / self.rate + 1e-4


class Limiter:
    """A sink's two buckets (either may be absent), and which events were paid for."""

    def __init__(self, limits: DrainLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.buckets: list[tuple[TokenBucket, bool]] = []  # (bucket, counts bytes)
        if limits.max_rate > 0:
            self.buckets.append((TokenBucket(limits.max_rate, clock), False))
        if limits.max_bytes_rate > 0:
            self.buckets.append((TokenBucket(limits.max_bytes_rate, clock), True))
        #: Positions paid for on this connection and not yet confirmed.
        self.paid: set[int] = set()
        #: Seconds during which an event waited for the budget (summed when it goes).
        self.waited = 0.0
        self._clock = clock
        self._held_since: float | None = None

    def ready(self) -> bool:
        """Whether an event may go now; if not, the time it waits from now on is counted."""
        if all(bucket.ready() for bucket, _ in self.buckets):
            return True
        if self._held_since is None:
            self._held_since = self._clock()
        return False

    def pay(self, position: int, size: int) -> None:
        if self._held_since is not None:
            self.waited += self._clock() - self._held_since
            self._held_since = None
        self.paid.add(position)
        for bucket, counts_bytes in self.buckets:
            bucket.take(size if counts_bytes else 1)

    def wait(self) -> float:
        """Seconds until the next event may go."""
        return max((bucket.wait() for bucket, _ in self.buckets), default=0.0)

    def choose(self, batch: list[QueuedEvent]) -> list[QueuedEvent]:
        """The events of ``batch`` (in its order) that may be handed to the sink now: those
        paid for already on this connection (in flight, or sent again after a partial
        confirmation), and new ones while the budget lasts (the last may take it into
        debt). New events go in order: none after one that has to wait."""
        chosen = []
        open_budget = True
        for event in batch:
            if event.position in self.paid:
                chosen.append(event)
            elif open_budget and self.ready():
                self.pay(event.position, utf8_len(event.data_json))
                chosen.append(event)
            else:
                open_budget = False
        return chosen


class LiveLane:
    """Priority "live": the events after the cut-off position ``after``, read ahead and
    confirmed apart from the backlog, in memory only (the cursor on disk moves over the
    backlog alone)."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.read_through = after
        self._through = after
        self.unsent: collections.deque[QueuedEvent] = collections.deque()

    @property
    def through(self) -> int:
        """Every event this sink wants after the cut-off and up to here is confirmed or
        set aside."""
        return self.read_through if not self.unsent else self._through

    def fill(self, cursor: SinkCursor, limit: int) -> list[QueuedEvent]:
        """Read the live events that fit beside those read already; return the new ones."""
        room = limit - len(self.unsent)
        if room <= 0:
            return []
        fresh = cursor.read(self.read_through, room)
        self.read_through = max(self.read_through, cursor.seen_through)
        self.unsent.extend(fresh)
        return fresh

    def settle(self, read: list[QueuedEvent], done: set[int]) -> None:
        """Move over the confirmed prefix of the live events ``read`` this round (taking
        them out of ``done``, the positions confirmed after a gap) and forget them."""
        count = 0
        for event in read:
            if event.position not in done:
                break
            done.discard(event.position)
            count += 1
        for _ in range(count):
            self.unsent.popleft()
        if count:
            self._through = read[count - 1].position

    def forget_through(self, position: int) -> list[int]:
        """Events up to ``position`` are gone from disk (dropped by the bounds)."""
        gone = []
        while self.unsent and self.unsent[0].position <= position:
            gone.append(self.unsent.popleft().position)
        self.read_through = max(self.read_through, position)
        self._through = max(self._through, position)
        return gone
