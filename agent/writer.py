"""The writer: the one thread that commits events to the queue.

Sources hand events over through a bounded hand-off and wait. The writer takes
whatever is waiting (up to ``commit_max_events``) and commits it in one
transaction (group commit: one fsync for many events), then wakes the sources
whose events are now on disk and the forwarders that have something to send.
It also deletes events every sink that selects them has confirmed.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from edge_agent.bounds import ROW_OVERHEAD, Bounds, Limits
from edge_agent.errors import QueueError, QueueVanished, TooManyAtOnce
from edge_agent.event import Event
from edge_agent.queue import Checkpoint, QueueStore, QueueWriter
from edge_agent.routing import Route

log = logging.getLogger("edge_agent.writer")

CLEANUP_INTERVAL = 0.5
#: Once no events came for this long, confirmed events are deleted as soon as a
#: sink asks, instead of at the next CLEANUP_INTERVAL.
IDLE_CLEANUP = 0.05
#: Delete confirmed events at least this often, even when no forwarder asked.
UNASKED_CLEANUP = 5.0
#: Under concurrent load, how long the writer may wait for the callers it just
#: served to hand over their next events, so that they share one commit (one
#: fsync) instead of each taking its own (PostgreSQL's commit_delay, in spirit).
GROUP_COMMIT_DELAY = 0.001
#: How often a caller waiting for its commit looks whether its source is stopping.
CANCEL_CHECK = 0.2
CANCELLED = "not accepted: the source is stopping (waiting for room in the queue)"
#: While the queue is full and sources must wait, look for room this often.
BLOCKED_RETRY = 0.2


class _Pending:
    """Events from one ``emit`` call, waiting to be committed."""

    __slots__ = ("cancelled", "checkpoints", "data_bytes", "done", "error", "events")

    def __init__(self, events: Sequence[tuple[Event, str]], checkpoints: Sequence[Checkpoint]):
        self.events = events
        self.data_bytes: int | None = None  # see size()
        self.checkpoints = checkpoints
        self.done = threading.Event()
        self.error: Exception | None = None
        #: The caller stopped waiting (its source is stopping): give it back uncommitted.
        self.cancelled = False

    def size(self) -> int:
        """Bytes of the events' data as stored (JSON), for the queue's bounds; summed once."""
        if self.data_bytes is None:
            self.data_bytes = sum(len(data) for _event, data in self.events)
        return self.data_bytes


class Writer:
    """Owns inserts into the queue and the deletion of confirmed events."""

    def __init__(
        self,
        store: QueueStore,
        *,
        commit_max_events: int,
        handoff_max_events: int,
        sink_names: Sequence[str],
        on_commit: Callable[[], None],
        limits: Limits | None = None,
        routes: Mapping[str, Route] | None = None,
    ) -> None:
        self.store = store
        self.commit_max_events = max(1, commit_max_events)
        self.handoff_max_events = max(1, handoff_max_events)
        # (sink names, routes of those that select events), replaced as one at a reload.
        self._sinks: tuple[list[str], dict[str, Route]] = (list(sink_names), dict(routes or {}))
        self.on_commit = on_commit
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._waiting_events = 0
        self._last_group = 0  # callers served by the last commit
        self._held_events = 0  # events in a batch that waits for room
        self._cond = threading.Condition()
        self._stopping = False
        self._cleanup_wanted = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self._queue: QueueWriter | None = None
        self.limits = limits or Limits()
        self.bounds: Bounds | None = None
        self.committed = 0
        self._last_delete = 0.0
        self._last_housekeeping = 0.0
        self._last_commit = 0.0
        self.last_progress = time.monotonic()
        #: Why the writer stopped on its own (the agent must exit), or None.
        self.failure: str | None = None
        #: Set when the queue file vanished (then the queue stays open for record_lost).
        self.vanished: QueueVanished | None = None
        #: While someone taps (``edge-agent tap``), called after each commit with the
        #: events and each source's last sequence (see agent/tap.py); else None.
        self.tapped: Callable[[Sequence[tuple[Event, str]], Mapping[str, int]], None] | None = None

    @property
    def sink_names(self) -> list[str]:
        """The sinks whose confirmations deletion waits for."""
        return self._sinks[0]

    @sink_names.setter
    def sink_names(self, names: Sequence[str]) -> None:
        self._sinks = (list(names), self._sinks[1])

    def set_sinks(self, routes: Mapping[str, Route]) -> None:
        """The configured sinks by name, each with its selection (a reload).

        An event is deleted once every sink that wants it confirmed it; the
        new routes apply to events already queued from the next clean-up on.
        """
        self._sinks = (list(routes), dict(routes))
        self._cleanup_wanted.set()

    def start(self) -> None:
        self._queue = QueueWriter(self.store)
        self.bounds = Bounds(self._queue, self.limits, self.store.state_dir)
        self._thread.start()

    def submit(
        self,
        events: Sequence[tuple[Event, str]],
        checkpoints: Sequence[Checkpoint] = (),
        cancel: threading.Event | None = None,
    ) -> None:
        """Hand events (and checkpoints) over; wait until committed, or raise QueueError.

        ``cancel`` (a source's ``stopping``) ends a wait for room (``when_full =
        "block"``) with QueueError: the events were then not accepted, and the
        source can stop instead of holding up a stop or a reload.
        """
        if not events and not checkpoints:
            return
        pending = _Pending(events, checkpoints)
        with self._cond:
            while (
                self._waiting_events
                and self._waiting_events + len(events) > self.handoff_max_events
                and not self._stopping
            ):
                if cancel is not None and cancel.is_set():
                    raise QueueError(CANCELLED)  # nothing was handed over
                self._cond.wait(None if cancel is None else CANCEL_CHECK)
            if self._stopping:
                raise QueueError("the agent is stopping; the event was not accepted")
            self._waiting.append(pending)
            self._waiting_events += len(events)
            self._cond.notify_all()
        while not pending.done.wait(None if cancel is None else CANCEL_CHECK):
            if cancel is not None and cancel.is_set() and not pending.cancelled:
                pending.cancelled = True  # the writer gives it back unless it commits it now
                with self._cond:
                    if pending in self._waiting:
                        self._waiting.remove(pending)
                        self._waiting_events -= len(events)
                        self._cond.notify_all()
                        raise QueueError(CANCELLED)
        if pending.error is not None:
            raise pending.error

    def _commit_checkpoints_only(self) -> None:
        """While events wait for room: commit what carries no events (a checkpoint alone,
        the agent's record of a source), which needs none, so its caller (a reload, in
        the main thread) is not held up by other sources' events."""
        with self._cond:
            alone = [p for p in self._waiting if not p.events]
            for pending in alone:
                self._waiting.remove(pending)
            if alone:
                self._cond.notify_all()
        if alone:
            self._commit(alone)

    @staticmethod
    def _without_cancelled(batch: list[_Pending]) -> list[_Pending]:
        """Give back, uncommitted, what a stopping source no longer waits for."""
        kept = []
        for pending in batch:
            if pending.cancelled:
                pending.error = QueueError(CANCELLED)
                pending.done.set()
            else:
                kept.append(pending)
        return kept

    def request_cleanup(self) -> None:
        """A sink confirmed something: delete what every sink that wants it confirmed, soon."""
        self._cleanup_wanted.set()
        with self._cond:
            self._cond.notify_all()  # an idle writer deletes now rather than later

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new events, commit what was handed over, and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.ident is not None:  # start() may have failed before it
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def uncommitted(self) -> int:
        """Events handed over by sources and not committed yet (0 once all are)."""
        return self._waiting_events + self._held_events

    @property
    def waiting_for_room(self) -> bool:
        """True while a batch waits for room in a full queue (``when_full = "block"``)."""
        return self._held_events > 0

    def _take(self) -> list[_Pending]:
        with self._cond:
            while not self._waiting and not self._stopping:
                left = self._housekeeping_due() - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            group = self._last_group
            if group > 1 and 0 < len(self._waiting) < group and not self._stopping:
                self._cond.wait_for(
                    lambda: (
                        len(self._waiting) >= group
                        or self._waiting_events >= self.commit_max_events
                        or self._stopping
                    ),
                    GROUP_COMMIT_DELAY,
                )
            batch: list[_Pending] = []
            count = 0
            most = self.commit_max_events
            if self.limits.max_events:
                most = min(most, self.limits.max_events)  # room can always be made for it
            while self._waiting and (not batch or count + len(self._waiting[0].events) <= most):
                pending = self._waiting.popleft()
                batch.append(pending)
                count += len(pending.events)
            self._waiting_events -= count
            self._last_group = len(batch)
            self._cond.notify_all()
            return batch

    def _housekeeping_due(self) -> float:
        """When housekeeping is next due: every interval, or soon once idle if a sink asked."""
        due = self._last_housekeeping + CLEANUP_INTERVAL
        if self._cleanup_wanted.is_set():
            due = min(due, max(self._last_housekeeping, self._last_commit) + IDLE_CLEANUP)
        return due

    def _run(self) -> None:
        assert self._queue is not None and self.bounds is not None
        held: list[_Pending] = []  # a batch waiting for room (when_full = "block")
        batch: list[_Pending] = []
        try:
            while True:
                batch = self._without_cancelled(held or self._take())
                held = []
                self._held_events = 0
                if batch:
                    self._queue.check_file()  # never commit into a file that is gone
                    batch = self._fit(batch)
                if batch:
                    fits = self._admitted(batch)
                    batch, held = batch[:fits], batch[fits:]
                if batch:
                    self._commit(batch)
                    self._last_commit = time.monotonic()
                if held:
                    self._held_events = sum(len(p.events) for p in held) or 1
                    self._commit_checkpoints_only()
                    # Room comes from deletes: look again when they are due, or after
                    # BLOCKED_RETRY; a sink's notify alone does not make room.
                    with self._cond:
                        wait = min(BLOCKED_RETRY, self._housekeeping_due() - time.monotonic())
                        self._cond.wait_for(lambda: self._stopping, max(0.0, wait))
                now = time.monotonic()
                self.last_progress = now
                # Under load every CLEANUP_INTERVAL (deletes in bulk); once no commit came
                # for IDLE_CLEANUP (idle, or blocked for room), as soon as a sink asks.
                if now >= self._housekeeping_due():
                    self._last_housekeeping = now
                    self._housekeeping()
                with self._cond:
                    if self._stopping and not self._waiting and not held:
                        break
        except QueueVanished as exc:
            self._vanished(exc, batch + held)
        except BaseException as exc:
            log.exception("the queue writer failed: %r", exc)
            for pending in held:
                pending.error = QueueError(f"the queue writer failed: {exc!r}")
                pending.done.set()
            self._fail_everything(exc)
            raise
        finally:
            if self.vanished is None:
                self._queue.close()

    def _vanished(self, exc: QueueVanished, batch: list[_Pending]) -> None:
        """The queue file is gone: accept nothing more; the agent exits (see record_lost)."""
        for pending in batch:
            pending.error = QueueError(f"{exc}; the event was not accepted")
            pending.done.set()
        self._fail_everything(exc)
        self.vanished = exc
        self.failure = (
            f"{exc}. No more events are accepted, and the agent exits so that it is started"
            " again (by systemd) on a new queue; the events that were waiting in the lost one"
            " are reported then, in a queue.gap event. Find out what removed the file (a"
            " clean-up job, an operator) so that it does not happen again."
        )

    def record_lost(self) -> None:
        """After a vanished queue, once the forwarders have stopped: record what it held.

        The forwarders write their last confirmed positions into the vanished
        file on the way out, so the record counts as lost only what was not sent.
        """
        if self.vanished is None or self._queue is None:
            return
        try:
            record = self._queue.record_lost(str(self.vanished), self._sinks[1])
        except OSError as exc:
            log.error(
                "cannot write %s: %s; the next start cannot report what the lost queue held",
                self.store.lost_path,
                exc.strerror,
            )
        else:
            log.info(
                "recorded what the lost queue held in %s (%s events not sent to every sink)"
                " for the next start",
                self.store.lost_path,
                record.get("events", "an unknown number of"),
            )
        finally:
            self._queue.close()
            self._queue = None

    def _fit(self, batch: list[_Pending]) -> list[_Pending]:
        """Make each caller's events fit ``max_events`` on their own; drop or refuse the rest.

        One ``emit_many`` of more events than the whole queue may hold cannot
        be committed as it is: with ``drop_oldest`` its oldest events are
        dropped (counted and logged, as any drop) and the rest is committed
        with its checkpoint; with ``block`` it could never fit, so the caller
        is told at once instead of waiting forever.
        """
        assert self.bounds is not None and self._queue is not None
        most = self.limits.max_events
        if not most or all(len(p.events) <= most for p in batch):
            return batch
        kept = []
        for pending in batch:
            if len(pending.events) <= most:
                kept.append(pending)
            elif self.limits.when_full == "block":
                pending.error = TooManyAtOnce(
                    f"{len(pending.events)} events at once are more than [queue] max_events"
                    f" ({most}) lets the queue hold; none were accepted. Raise max_events, or"
                    " have the source commit fewer at once"
                )
                pending.done.set()
            else:
                cut = len(pending.events) - most
                dropped = collections.Counter(event.source for event, _ in pending.events[:cut])
                self.bounds.dropped_unqueued(dropped, f"more events at once than max_events {most}")
                self._queue.skip_sequences(dropped)
                pending.events = pending.events[cut:]
                pending.data_bytes = None
                kept.append(pending)
        return kept

    def _admitted(self, batch: list[_Pending]) -> int:
        """How many of the batch's callers, first come first, there is room for now.

        A group that does not fit as a whole may still fit in part: its first
        callers are committed and only the rest waits, so a wait for room never
        holds back what the disk can take (a big group on a nearly full disk
        would otherwise wait for room it can never get once the queue is empty).
        """
        fits = len(batch)
        while fits and not self._admit(batch[:fits]):
            fits = 0 if fits == 1 else fits // 2
        return fits

    def _admit(self, batch: list[_Pending]) -> bool:
        """Room for this batch? Drops old events or says wait, as the policy wants."""
        assert self.bounds is not None
        count = sum(len(pending.events) for pending in batch)
        if not count:
            return True
        if self._stopping:
            return True  # at shutdown, try to keep what sources handed over
        try:
            size = sum(pending.size() for pending in batch)
            return self.bounds.admit(count, size)
        except Exception as exc:
            log.error("cannot check the queue's size: %s; committing anyway", exc)
            return True

    def _housekeeping(self) -> None:
        assert self._queue is not None and self.bounds is not None
        self._queue.check_file()  # also when idle: exit (and report) before anything is lost
        try:
            # Also now and then unasked: `queue purge` moves cursors behind our back.
            now = time.monotonic()
            if self._cleanup_wanted.is_set() or now - self._last_delete >= UNASKED_CLEANUP:
                self._cleanup_wanted.clear()
                self._last_delete = now
                names, routes = self._sinks
                self._queue.delete_confirmed(names, routes)
            self.bounds.housekeeping()
        except (QueueError, OSError) as exc:
            log.error("%s; confirmed events stay on disk until it works", exc)

    def _commit(self, batch: list[_Pending]) -> None:
        """Commit a group; if it fails, commit each caller's part alone.

        So one caller's bad event (or a failing disk for a moment) costs only
        that caller its commit, not everyone who happened to share the group.
        """
        try:
            self._append(batch)
            error: Exception | None = None
        except Exception as exc:
            error = exc
        if error is not None and len(batch) > 1:
            for pending in batch:
                self._commit([pending])
            return
        if error is not None:
            log.error(
                "%s; the source was told, and none of its %d events were accepted",
                error,
                len(batch[0].events),
            )
            if not isinstance(error, QueueError):
                error = QueueError(f"cannot commit to the queue: {error!r}")
        for pending in batch:
            pending.error = error
            pending.done.set()
        if error is None:
            self.on_commit()

    def _append(self, batch: list[_Pending]) -> None:
        assert self._queue is not None
        events = [item for pending in batch for item in pending.events]
        checkpoints = [row for pending in batch for row in pending.checkpoints]
        self._queue.append(events, checkpoints)
        self.committed += len(events)
        tapped = self.tapped  # the whole cost of the tap while nobody taps
        if tapped is not None and events:
            try:
                tapped(events, self._queue.sequences)
            except Exception as exc:  # a tap must never cost a commit
                log.warning("the tap failed: %r; the events are committed", exc)
        if self.bounds is not None:
            self.bounds.appended(
                sum(pending.size() for pending in batch) + ROW_OVERHEAD * len(events)
            )

    def _fail_everything(self, error: Exception) -> None:
        """The writer is going away: no caller may wait for a commit forever."""
        with self._cond:
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._waiting_events = 0
            self._cond.notify_all()
        for pending in waiting:
            pending.error = QueueError(f"the queue writer stopped: {error!r}")
            pending.done.set()
