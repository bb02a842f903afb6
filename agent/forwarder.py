"""Forwarders: one thread per sink, moving the queue to the sink in order.

A forwarder owns its sink and its cursor. It reads the next batch after the
cursor, hands it to the sink, and advances the cursor over the events the sink
confirmed without a gap. Events confirmed after a gap are remembered so they
are not sent twice while the agent runs; everything unconfirmed is sent again,
in order, after a reconnect or a restart.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable

from agent.api import Sink
from agent.backoff import Backoff
from agent.counters import Latency, utf8_len
from agent.errors import QueueError
from agent.event import QueuedEvent
from agent.queue import QueueStore, SinkCursor

log = logging.getLogger("edge_agent.forwarder")

#: Confirmed positions are written to disk at most this often (seconds).
CURSOR_FLUSH_EVERY = 0.2
#: A backlog this large when a sink connects gets progress lines every DRAIN_REPORT_EVERY s.
DRAIN_REPORT_MIN = 10_000
DRAIN_REPORT_EVERY = 30.0
#: While a sink stays unreachable, repeat the "offline" line this often.
OFFLINE_REMINDER = 300.0


class Forwarder:
    """Drives one sink: open, publish batches, record confirmations, reconnect."""

    def __init__(
        self,
        sink: Sink,
        store: QueueStore,
        *,
        on_confirmed: Callable[[], None],
    ) -> None:
        self.sink = sink
        self.store = store
        self.on_confirmed = on_confirmed
        self.wake = threading.Event()
        self.connected = False
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
        self._ever_connected = False
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
        from the queue until every sink has confirmed it.
        """
        restart = Backoff(1.0, 60.0)
        while not self.sink.stopping.is_set() and not self._draining_done():
            cursor = None
            try:
                cursor = SinkCursor(self.store, self.sink.name, self.sink.agent_id)
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

    def _flush(self, cursor: SinkCursor) -> None:
        try:
            if cursor.flush():
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

    def _forward(self, cursor: SinkCursor) -> None:
        sink = self.sink
        backoff = Backoff(sink.retry_min, sink.retry_max)
        outage = _Outage(sink, cursor)
        report = _DrainReport(sink.name, cursor)
        confirmed_ahead: set[int] = set()
        # position → when handed to the sink (read, and handed over the same round)
        sent_at: dict[int, float] = {}
        unsent: collections.deque[QueuedEvent] = collections.deque()
        while not sink.stopping.is_set() and not self._draining_done():
            if not self.connected:
                if self._drain_deadline is not None:
                    return  # nothing can be flushed to a sink that is not there
                try:
                    sink.open()
                except Exception as exc:
                    self.last_error = _reason(exc)
                    self.errors += 1
                    outage.failed(f"cannot reach {sink.target}: {self.last_error}")
                    self._close_sink()
                    self._pause(backoff.next())
                    continue
                self.connected = True
                now = time.monotonic()  # a new connection: all unconfirmed goes again
                sent_at = {event.position: now for event in unsent}
                self.reconnects += self._ever_connected
                self._ever_connected = True
                outage.connected()
                report.start(cursor.backlog(), self.confirmed)

            self.wake.clear()
            # Read ahead only what is new: events already read and not yet
            # confirmed stay in `unsent`, in queue order.
            while unsent and unsent[0].position <= cursor.position:
                unsent.popleft()
            if len(unsent) < sink.max_batch:
                after = unsent[-1].position if unsent else cursor.position
                fresh = cursor.read(after, sink.max_batch - len(unsent))
                now = time.monotonic()
                for event in fresh:
                    sent_at[event.position] = now
                unsent.extend(fresh)
            events = list(unsent)
            self.last_progress = time.monotonic()
            if not events and self._drain_deadline is not None:
                return
            if not events:
                self._flush(cursor)  # idle: put the position on disk now
            batch = [e for e in events if e.position not in confirmed_ahead]
            try:
                if not events:
                    sink.check_connection()
                    outage.ended()  # connected, and nothing was refused
                    backoff.reset()
                    self.wake.wait(1.0)
                    continue
                result = sink.publish(batch) if batch else []
                sent = {e.position for e in batch}
                positions = {event.position for event in result} & sent
            except Exception as exc:
                self.last_error = _reason(exc)
                self.errors += 1
                outage.failed(f"lost {sink.target}: {self.last_error}")
                self._close_sink()
                self._pause(backoff.next())
                continue
            self.confirmed += len(positions)
            confirmed_ahead |= positions
            if positions:
                self.confirmed_bytes += sum(
                    utf8_len(e.data_json) for e in result if e.position in positions
                )
                handed = [sent_at.pop(p) for p in positions if p in sent_at]
                if handed:
                    self.latency.observe(time.monotonic() - min(handed))
            # The read events are consecutive in the queue: the cursor moves over
            # the confirmed prefix; confirmations after a gap wait in the set.
            prefix = []
            for event in events:
                if event.position not in confirmed_ahead:
                    break
                prefix.append(event.position)
            if prefix:
                confirmed_ahead.difference_update(prefix)
                try:
                    cursor.advance(prefix[-1], flush_after=CURSOR_FLUSH_EVERY)
                except QueueError as exc:
                    # The position stays in memory; written on the next round.
                    log.error("sink %s: %s; trying again", sink.name, exc)
                    self._pause(1.0)
                self.on_confirmed()
            if batch and not positions:
                # Nothing confirmed: the sink has said why (a refusal, say). Wait
                # before sending again so a refusing destination is not hammered.
                self.last_error = f"none of {len(batch)} events confirmed"
                self.errors += 1
                self._pause(backoff.next())
                now = time.monotonic()  # the wait was not publish latency
                for event in batch:
                    sent_at[event.position] = now
            elif positions:
                backoff.reset()
                outage.ended()
                report.progress(self.confirmed)


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
