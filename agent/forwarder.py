"""Forwarders: one thread per sink, moving the queue to the sink in order.

A forwarder owns its sink and its cursor. It reads the next batch after the
cursor, hands it to the sink, and advances the cursor over the events the sink
confirmed without a gap. Events confirmed after a gap are remembered so they
are not sent twice while the agent runs; everything unconfirmed is sent again,
in order, after a reconnect or a restart.

A sink that selects events (``sources``, ``types``; :mod:`edge_agent.routing`)
reads only those; its cursor moves over the others with them, and, when it
has nothing left to send, to the newest event it looked through.

An event the sink rejects (:meth:`edge_agent.api.Sink.reject`) is sent again; after
``dead_letter_after`` refusals in a row, or at once when it cannot be sent at
all, it is set aside as a dead letter (:mod:`edge_agent.dead_letters`) and the
cursor moves over it as over a confirmed one. Dead letters an operator asked
to retry are sent ahead of the other events. Events the queue's bounds
dropped are forgotten, never sent again from memory.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import random
import sqlite3
import threading
import time
from collections.abc import Callable

from edge_agent import dead_letters
from edge_agent.api import Sink
from edge_agent.backoff import Backoff
from edge_agent.counters import Latency, utf8_len
from edge_agent.drain import UNLIMITED, DrainLimits, Limiter, LiveLane
from edge_agent.errors import QueueError, SinkUnavailable
from edge_agent.event import QueuedEvent
from edge_agent.queue import QueueStore, SinkCursor
from edge_agent.routing import EVERYTHING, Route

log = logging.getLogger("edge_agent.forwarder")

#: Confirmed positions are written to disk at most this often (seconds).
CURSOR_FLUSH_EVERY = 0.2
#: A backlog this large when a sink connects gets progress lines every DRAIN_REPORT_EVERY s.
DRAIN_REPORT_MIN = 10_000
DRAIN_REPORT_EVERY = 30.0
#: While a sink stays unreachable, repeat the "offline" line this often.
OFFLINE_REMINDER = 300.0
#: Look for dead letters an operator asked to retry this often (seconds).
RETRY_POLL_EVERY = 1.0
#: Dead letters named one by one in warnings per sink and minute; then a count.
DEAD_LETTER_WARNINGS = 10


class Forwarder:
    """Drives one sink: open, publish batches, record confirmations, reconnect."""

    def __init__(
        self,
        sink: Sink,
        store: QueueStore,
        *,
        on_confirmed: Callable[[], None],
        dead_letter_after: int = 3,
        route: Route = EVERYTHING,
        limits: DrainLimits = UNLIMITED,
    ) -> None:
        self.sink = sink
        self.store = store
        #: The events this sink wants (``sources``, ``types``); it never reads the others.
        self.route = route
        #: ``max_rate``, ``max_bytes_rate``, ``priority`` (agent/drain.py).
        self.limits = limits
        #: Seconds events waited for the rate limits since start (while new events were
        #: held back by them).
        self.rate_waited = 0.0
        #: The cut-off position while live events go before a backlog (priority "live").
        self.live_after: int | None = None
        self.on_confirmed = on_confirmed
        #: Refusals in a row after which an event is set aside; 0: never.
        self.dead_letter_after = dead_letter_after
        #: Events set aside as dead letters since start.
        self.dead_lettered = 0
        self.wake = threading.Event()
        self.connected = False
        #: When the publish call under way started (monotonic), or None: a call that
        #: lasts is a destination that stopped answering (see Agent.warn_stalled).
        self.publishing_since: float | None = None
        #: Set once the stall of the current publish call was logged.
        self.stall_warned = False
        self.confirmed = 0
        #: Size of the confirmed events' data (as stored: JSON), in bytes.
        self.confirmed_bytes = 0
        #: Connections made after the first one.
        self.reconnects = 0
        #: Failed attempts: to connect, to publish, batches of which nothing was confirmed.
        self.errors = 0
        #: From handing an event to the sink to its confirmation, one observation per
        #: publish call that confirmed something (its oldest event's wait).
        self.latency = Latency()
        self.last_error: str | None = None
        self.last_progress = time.monotonic()
        self._drain_deadline: float | None = None
        #: When the cursor's position was last written to disk (monotonic).
        self._flushed_at = 0.0
        self._ever_connected = False
        self._first_open_waited = False
        self._thread = threading.Thread(target=self._run, name=f"sink:{sink.name}", daemon=True)

    @property
    def name(self) -> str:
        return self.sink.name

    def start(self) -> None:
        self._thread.start()

    def carry_over(self, old: Forwarder) -> None:
        """Take the counters of the forwarder this one replaces (a reload): counters
        never go back."""
        self.confirmed = old.confirmed
        self.confirmed_bytes = old.confirmed_bytes
        self.reconnects = old.reconnects
        self.errors = old.errors
        self.latency = old.latency
        self.dead_lettered = old.dead_lettered
        self.rate_waited = old.rate_waited
        self._first_open_waited = old._first_open_waited  # a reload is not a start

    def drain(self, deadline: float) -> None:
        """Keep sending until the backlog is empty or ``deadline`` (monotonic), then end."""
        self._drain_deadline = deadline
        self.wake.set()

    def abort(self) -> None:
        """End now: cut the sink's waits short."""
        self._drain_deadline = 0.0
        self.sink.stopping.set()
        self.wake.set()

    def join(self, timeout: float | None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _draining_done(self) -> bool:
        return self._drain_deadline is not None and time.monotonic() >= self._drain_deadline

    def _run(self) -> None:
        """Forward until told to stop; on an unexpected failure, start over after a backoff.

        A forwarder that died would hold back every sink: nothing is deleted
        from the queue until every sink that selects it has confirmed it.
        """
        restart = Backoff(1.0, 60.0)
        while not self.sink.stopping.is_set() and not self._draining_done():
            cursor = None
            try:
                cursor = SinkCursor(self.store, self.sink.name, self.sink.agent_id, self.route)
                self._forward(cursor)
                return
            except Exception as exc:
                self.last_error = _reason(exc)
                self.errors += 1
                delay = restart.next()
                log.exception(
                    "sink %s: forwarding failed: %s; events stay queued, starting over in %.1fs",
                    self.sink.name,
                    self.last_error,
                    delay,
                )
                self._pause(delay)
            finally:
                self._close_sink()
                if cursor is not None:
                    self._flush(cursor)
                    cursor.close()

    def _advance(self, cursor: SinkCursor, position: int) -> None:
        """Move the cursor over confirmed events; put it on disk at most every
        CURSOR_FLUSH_EVERY seconds, and only then tell the writer: it deletes by the
        positions on disk, and waking it for less was a thread switch per round."""
        cursor.advance(position, flush_after=math.inf)
        if time.monotonic() - self._flushed_at < CURSOR_FLUSH_EVERY:
            return
        try:
            moved = cursor.flush()
        except QueueError as exc:
            # The position stays in memory; written on the next round.
            log.error("sink %s: %s; trying again", self.sink.name, exc)
            self._pause(1.0)
            return
        self._flushed_at = time.monotonic()
        if moved:
            self.on_confirmed()

    def _flush(self, cursor: SinkCursor) -> None:
        try:
            moved = cursor.flush()
            self._flushed_at = time.monotonic()
            if moved:
                self.on_confirmed()  # the writer deletes by positions on disk
        except QueueError as exc:
            log.warning("sink %s: %s; those events will be sent again", self.sink.name, exc)

    def _close_sink(self) -> None:
        try:
            self.sink.close()
        except Exception as exc:
            log.warning("sink %s: close() raised %s", self.sink.name, exc)
        self.connected = False

    def _pause(self, seconds: float) -> None:
        """Wait before a retry, ending early when the agent stops.

        A connection still open (after a refusal, say) is looked after meanwhile,
        so its keepalive goes on; if it is lost, the next publish finds out.
        """
        end = time.monotonic() + seconds
        while not self.sink.stopping.is_set():
            self.last_progress = time.monotonic()  # waiting by design is not being stuck
            # While draining at a stop too: a refusing destination is not hammered
            # for the whole grace period. The wait ends with the grace.
            deadline = end if self._drain_deadline is None else min(end, self._drain_deadline)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self.connected:
                with contextlib.suppress(Exception):
                    self.sink.check_connection()
            self.sink.stopping.wait(min(left, 0.5))

    def _first_open_delay(self) -> None:
        """Before the first connection after start: a random wait up to first_open_delay."""
        self._first_open_waited = True
        most = self.sink.first_open_delay
        if most <= 0:
            return
        delay = random.uniform(0.0, most)
        log.info(
            "sink %s: first connection in %.1fs (a random delay up to %gs spreads a fleet)",
            self.sink.name,
            delay,
            most,
        )
        self._pause(delay)

    def _forward(self, cursor: SinkCursor) -> None:
        sink = self.sink
        backoff = Backoff(sink.retry_min, sink.retry_max, jitter=sink.retry_jitter)
        outage = _Outage(sink, cursor)
        report = _DrainReport(sink.name, cursor)
        verdicts = _Verdicts(self, cursor)
        limiter = Limiter(self.limits) if self.limits.limited else None
        waited_before = self.rate_waited
        confirmed_ahead: set[int] = set()  # confirmed or set aside, after a gap
        # position → when handed to the sink (read, and handed over the same round)
        sent_at: dict[int, float] = {}
        unsent: collections.deque[QueuedEvent] = collections.deque()
        # Every event this sink wants up to here is in `unsent` or confirmed; the
        # others (a sink that selects events) are passed over with them.
        read_through = cursor.position
        # Priority "live": the events after the cut-off, read and confirmed apart
        # (in memory only; the cursor on disk moves over the backlog).
        live: LiveLane | None = None
        dropped_through = self.store.dropped_through
        while not sink.stopping.is_set() and not self._draining_done():
            if not self.connected:
                if self._drain_deadline is not None:
                    return  # nothing can be flushed to a sink that is not there
                if not self._first_open_waited:
                    self._first_open_delay()
                    continue
                try:
                    sink.open()
                except Exception as exc:
                    self.last_error = _reason(exc)
                    self.errors += 1
                    outage.failed(f"cannot reach {sink.target}: {self.last_error}")
                    self._close_sink()
                    self._pause(_retry_delay(backoff, exc))
                    continue
                self.connected = True
                now = time.monotonic()  # a new connection: all unconfirmed goes again
                sent_at = {event.position: now for event in unsent}
                if live is not None:
                    sent_at.update((event.position, now) for event in live.unsent)
                if limiter is not None:
                    limiter.paid.clear()  # what is sent again is paid again
                self.reconnects += self._ever_connected
                self._ever_connected = True
                outage.connected()
                report.start(cursor.backlog(), self.confirmed)
                if self.limits.priority == "live" and live is None:
                    newest = _newest(cursor)
                    if newest > cursor.position:
                        live = LiveLane(newest)
                        self.live_after = newest
                        log.info(
                            "sink %s: events after position %d go before the %d waiting",
                            sink.name,
                            newest,
                            cursor.backlog(),
                        )

            self.wake.clear()
            if self.store.dropped_through != dropped_through:
                # The bounds deleted events from disk: what is gone is never sent again.
                dropped_through = self.store.dropped_through
                while unsent and unsent[0].position <= dropped_through:
                    gone = unsent.popleft().position
                    confirmed_ahead.discard(gone)
                    sent_at.pop(gone, None)
                if live is not None:
                    for gone in live.forget_through(dropped_through):
                        confirmed_ahead.discard(gone)
                        sent_at.pop(gone, None)
                verdicts.forget_through(dropped_through)
            # Read ahead only what is new: events already read and not yet
            # confirmed stay in `unsent`, in queue order.
            while unsent and unsent[0].position <= cursor.position:
                unsent.popleft()
            read_through = max(read_through, cursor.position)  # a purge moves it on
            now = time.monotonic()
            live_events: list[QueuedEvent] = []
            if live is not None:
                for event in live.fill(cursor, sink.max_batch):
                    sent_at[event.position] = now
                live_events = list(live.unsent)
            # Read (and so send) every round, however few were confirmed: a new PUBLISH
            # carries the TCP acknowledgement that a broker with Nagle's algorithm on
            # (Mosquitto's default) waits for before sending more PUBACKs. Waiting for a
            # quarter of the window to be free instead stalled 40 ms at a time.
            room = sink.max_batch - len(unsent) - len(live_events)
            if room > 0:
                fresh = cursor.read(read_through, room)
                seen = cursor.seen_through
                if live is not None:  # the backlog ends at the cut-off
                    fresh = [e for e in fresh if e.position <= live.after]
                    seen = min(seen, live.after)
                read_through = max(read_through, seen)
                for event in fresh:
                    sent_at[event.position] = now
                unsent.extend(fresh)
            if not unsent and read_through > cursor.position:
                # Nothing this sink wants up to there: pass over the rest.
                self._advance(cursor, read_through)
            if live is not None and cursor.position >= live.after:
                # The backlog is confirmed: back to queue order, from the live events on.
                self._advance(cursor, live.through)
                unsent = live.unsent
                read_through = live.read_through
                live = None
                self.live_after = None
                log.info("sink %s: the backlog is sent; events go in queue order", sink.name)
                continue
            events = list(unsent)
            retried = verdicts.retries()
            self.last_progress = time.monotonic()
            if not events and not live_events and not retried and self._drain_deadline is not None:
                return
            if not events and not live_events:
                self._flush(cursor)  # idle: put the position on disk now
            again = {e.position for e in retried}
            skip = confirmed_ahead | again | verdicts.held
            batch = retried + [e for e in live_events + events if e.position not in skip]
            if limiter is not None and batch:
                batch = limiter.choose(batch)
                self.rate_waited = waited_before + limiter.waited
                if not batch:
                    self._pause(limiter.wait())
                    continue
            try:
                if not batch and not events and not live_events:
                    sink.check_connection()
                    outage.ended()  # connected, and nothing was refused
                    backoff.reset()
                    self.wake.wait(1.0)
                    continue
                self.publishing_since = time.monotonic()
                try:
                    result = sink.publish(batch) if batch else []
                finally:
                    self.publishing_since = None
                sent = {e.position for e in batch}
                positions = {event.position for event in result} & sent
            except Exception as exc:
                # A rejection made before it raised (the event that broke the connection)
                # still counts.
                set_aside, _ = verdicts.judge(batch, set())
                verdicts.retried_done(set(), set_aside & again)
                confirmed_ahead |= set_aside - again
                self.last_error = _reason(exc)
                self.errors += 1
                outage.failed(f"lost {sink.target}: {self.last_error}")
                self._close_sink()
                self._pause(_retry_delay(backoff, exc))
                continue
            self.confirmed += len(positions)
            if positions:
                self.confirmed_bytes += sum(
                    utf8_len(e.data_json) for e in result if e.position in positions
                )
                handed = [sent_at.pop(p) for p in positions if p in sent_at]
                if handed:
                    self.latency.observe(time.monotonic() - min(handed))
            set_aside, transient = verdicts.judge(batch, positions)
            verdicts.retried_done(positions & again, set_aside & again)
            confirmed_ahead |= (positions | set_aside) - again
            if limiter is not None:
                limiter.paid.difference_update(positions | set_aside)
            if live is not None:
                live.settle(live_events, confirmed_ahead)
            # The read events are consecutive in the queue: the cursor moves over
            # the confirmed prefix; confirmations after a gap wait in the set.
            prefix = []
            for event in events:
                if event.position not in confirmed_ahead:
                    break
                prefix.append(event.position)
            if prefix:
                confirmed_ahead.difference_update(prefix)
                # All read events confirmed: the ones between, not for this sink, too.
                through = read_through if len(prefix) == len(events) else prefix[-1]
                self._advance(cursor, through)
            if (batch and not positions and not set_aside) or transient:
                # Nothing confirmed (the sink has said why: a refusal, say), or a
                # refusal for now: wait before sending again so a refusing
                # destination is not hammered.
                if not positions:
                    self.last_error = f"none of {len(batch)} events confirmed"
                    self.errors += 1
                self._pause(backoff.next())
                now = time.monotonic()  # the wait was not publish latency
                for event in batch:
                    sent_at[event.position] = now
            elif positions or set_aside:
                backoff.reset()
                outage.ended()
                report.progress(self.confirmed)


def _retry_delay(backoff: Backoff, exc: BaseException) -> float:
    """The wait after a failed attempt: near the cap when the destination said it is busy."""
    if isinstance(exc, SinkUnavailable) and exc.busy:
        return backoff.longest()
    return backoff.next()


def _newest(cursor: SinkCursor) -> int:
    row = cursor.conn.execute("SELECT MAX(position) FROM events").fetchone()
    return int(row[0] or 0)


class _Verdicts:
    """A forwarder's rejected events: refusals counted per event, dead letters set aside,
    and dead letters an operator asked to retry.

    An event refused ``dead_letter_after`` times in a row is set aside only once
    an event behind it was confirmed after its first refusal: a destination
    that refuses everything (an ACL that lost this device) keeps the events
    queued, not a backlog turned into dead letters. When nothing behind it was
    sent (a window of 1, a broker that hangs up), it is held out of one round
    to see whether the events behind it go through. A retried dead letter
    needs no such proof: it was set aside before.
    """

    def __init__(self, forwarder: Forwarder, cursor: SinkCursor) -> None:
        self.forwarder = forwarder
        self.sink = forwarder.sink
        self.cursor = cursor
        #: position → refusals in a row (across reconnects) of an event still unconfirmed.
        self.refusals: dict[int, int] = {}
        #: Refused events with an event behind them confirmed since their first refusal.
        self.evidence: set[int] = set()
        #: Events held out of the next round, to see whether the events behind them go.
        self.held: set[int] = set()
        self._retries: list[QueuedEvent] = []
        self._next_poll = 0.0
        self._log = _DeadLetterLog(self.sink.name)
        self.sink.take_rejections()  # left by an earlier forwarder of this sink

    def retries(self) -> list[QueuedEvent]:
        """Dead letters to send again, ahead of the other events (polled about once a second)."""
        now = time.monotonic()
        if self._retries or now >= self._next_poll:
            self._next_poll = now + RETRY_POLL_EVERY
            try:
                self._retries = dead_letters.retries(
                    self.cursor.conn,
                    self.sink.name,
                    self.sink.agent_id,
                    self.sink.max_batch,
                    self.forwarder.route,
                )
            except sqlite3.Error as exc:
                log.warning("sink %s: cannot read dead letters to retry: %s", self.sink.name, exc)
        return list(self._retries)

    def retried_done(self, confirmed: set[int], set_aside_again: set[int]) -> None:
        """Retried dead letters confirmed (deleted now) or set aside again."""
        if confirmed:
            try:
                dead_letters.delivered(self.cursor.conn, self.sink.name, confirmed)
            except QueueError as exc:
                log.warning("sink %s: %s; a retried dead letter stays listed", self.sink.name, exc)
        if confirmed or set_aside_again:
            done = confirmed | set_aside_again
            self._retries = [e for e in self._retries if e.position not in done]

    def forget_through(self, position: int) -> None:
        for known in [p for p in self.refusals if p <= position]:
            del self.refusals[known]
        self.evidence = {p for p in self.evidence if p > position}
        self.held = {p for p in self.held if p > position}

    def judge(self, batch: list[QueuedEvent], confirmed: set[int]) -> tuple[set[int], bool]:
        """Take the sink's rejections of this round: (positions set aside now, whether
        a refusal asked for a backoff)."""
        handed = {e.position for e in batch}
        rejections = self.sink.take_rejections()
        self.held.clear()  # held out of this round only
        for position in confirmed:
            self.refusals.pop(position, None)
            self.evidence.discard(position)
        last = max(confirmed, default=0)
        self.evidence.update(p for p in self.refusals if p < last)
        dead: list[tuple[QueuedEvent, str, int]] = []
        transient = False
        limit = self.forwarder.dead_letter_after
        retried = {e.position for e in self._retries}  # set aside before: no proof needed
        for rejection in rejections:
            position = rejection.event.position
            if position not in handed or position in confirmed:
                continue
            if not rejection.permanent:
                transient = True
                continue
            count = self.refusals[position] = self.refusals.get(position, 0) + 1
            if any(d[0].position == position for d in dead):
                continue
            proven = position in self.evidence or position in retried
            if rejection.invalid or (limit and count >= limit and proven):
                dead.append((rejection.event, rejection.reason, count))
            elif limit and count >= limit:
                self.held.add(position)
        self.evidence.update(p for p in self.refusals if p < last)  # refused first this round
        if self.held >= handed:
            self.held.clear()  # nothing behind them to try
        if not dead:
            self._log.flush()
            return set(), transient
        try:
            dead_letters.set_aside(self.cursor.conn, self.sink.name, dead)
        except QueueError as exc:
            log.error("sink %s: %s; the events are sent again", self.sink.name, exc)
            return set(), transient
        self.forwarder.dead_lettered += len(dead)
        for event, reason, count in dead:
            self.refusals.pop(event.position, None)
            self.evidence.discard(event.position)
            self._log.set_aside(event, reason, count)
        return {event.position for event, _, _ in dead}, transient


class _DeadLetterLog:
    """A warning per dead letter, naming the event and the reason; past
    DEAD_LETTER_WARNINGS a minute, one line a minute says how many more."""

    def __init__(self, sink: str) -> None:
        self.sink = sink
        self.since = time.monotonic()
        self.said = 0
        self.more = 0
        self.last = ""

    def set_aside(self, event: QueuedEvent, reason: str, attempts: int) -> None:
        self.flush()
        if self.said >= DEAD_LETTER_WARNINGS:
            self.more += 1
            self.last = f"event {event.id}: {reason}"
            return
        self.said += 1
        sink = self.sink
        log.warning(
            "sink %s: event %s (%s from source %s) set aside as a dead letter after %d"
            " attempt%s: %s. The events behind it go on. See it with `edge-agent queue dead"
            " list --sink %s`; send it again with `edge-agent queue dead retry --sink %s`.",
            sink,
            event.id,
            event.type,
            event.source,
            attempts,
            "" if attempts == 1 else "s",
            reason,
            sink,
            sink,
        )

    def flush(self) -> None:
        if time.monotonic() - self.since < 60.0:
            return
        if self.more:
            log.warning(
                "sink %s: %d more events set aside as dead letters in the last minute (the"
                " last: %s); see `edge-agent queue dead list --sink %s`",
                self.sink,
                self.more,
                self.last,
                self.sink,
            )
        self.since = time.monotonic()
        self.said = self.more = 0


class _DrainReport:
    """While a large backlog drains, say how it goes at a calm pace: left, rate, time to go."""

    def __init__(self, sink_name: str, cursor: SinkCursor) -> None:
        self.sink_name = sink_name
        self.cursor = cursor
        self.active = False
        self.last_at = 0.0
        self.last_confirmed = 0

    def start(self, waiting: int, confirmed: int) -> None:
        if waiting >= DRAIN_REPORT_MIN:
            self.active = True
            self.last_at = time.monotonic()
            self.last_confirmed = confirmed

    def progress(self, confirmed: int) -> None:
        if not self.active or time.monotonic() - self.last_at < DRAIN_REPORT_EVERY:
            return
        now = time.monotonic()
        rate = (confirmed - self.last_confirmed) / max(now - self.last_at, 1e-6)
        left = self.cursor.backlog()
        self.last_at, self.last_confirmed = now, confirmed
        if left < DRAIN_REPORT_MIN:
            self.active = False
            log.info("sink %s: backlog sent (%d events left)", self.sink_name, left)
            return
        eta = f"about {left / rate / 60:.0f} min to go" if rate > 0 else "no progress"
        log.info(
            "sink %s: sending the backlog: %d events left, %.0f events/s, %s",
            self.sink_name,
            left,
            rate,
            eta,
        )


class _Outage:
    """Says once that a sink went offline, reminds now and then, and says when it is back."""

    def __init__(self, sink: Sink, cursor: SinkCursor) -> None:
        self.sink = sink
        self.cursor = cursor
        self.since: float | None = None
        self.reminded = 0.0
        self.announced = False

    def failed(self, what: str) -> None:
        now = time.monotonic()
        sink = self.sink
        if self.since is None:
            self.since = self.reminded = now
            log.warning(
                "sink %s: %s. Offline: events are kept on disk and sent when it answers;"
                " %d waiting. Retrying with backoff up to %gs.",
                sink.name,
                what,
                self.cursor.backlog(),
                sink.retry_max,
            )
        elif now - self.reminded >= OFFLINE_REMINDER:
            self.reminded = now
            log.warning(
                "sink %s: still offline after %.0fs (%s); %d events waiting",
                sink.name,
                now - self.since,
                what,
                self.cursor.backlog(),
            )
        else:
            log.debug("sink %s: %s", sink.name, what)

    def connected(self) -> None:
        """A connection is up; the outage ends with the first confirmed delivery."""
        sink = self.sink
        waiting = self.cursor.backlog()
        if self.since is None:
            log.info("sink %s: connected to %s; %d events waiting", sink.name, sink.target, waiting)
        elif not self.announced:
            self.announced = True
            log.info(
                "sink %s: connected to %s after %.0fs offline; sending %d waiting events in order",
                sink.name,
                sink.target,
                time.monotonic() - self.since,
                waiting,
            )

    def ended(self) -> None:
        self.since = None
        self.announced = False


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text
