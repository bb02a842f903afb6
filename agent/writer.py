"""The writer: the one thread that commits events to the queue.

Sources hand events over through a bounded hand-off and wait. The writer takes
whatever is waiting (up to ``commit_max_events``) and commits it in one
transaction (group commit: one fsync for many events), then wakes the sources
whose events are now on disk and the forwarders that have something to send.
It also deletes events every sink has confirmed.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence

from agent.errors import QueueError
from agent.event import Event
from agent.queue import Checkpoint, QueueStore, QueueWriter

log = logging.getLogger("edge_agent.writer")

CLEANUP_INTERVAL = 0.5


class _Pending:
    """Events from one ``emit`` call, waiting to be committed."""

    __slots__ = ("checkpoints", "done", "error", "events")

    def __init__(self, events: Sequence[tuple[Event, str]], checkpoints: Sequence[Checkpoint]):
        self.events = events
        self.checkpoints = checkpoints
        self.done = threading.Event()
        self.error: Exception | None = None


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
    ) -> None:
        self.store = store
        self.commit_max_events = max(1, commit_max_events)
        self.handoff_max_events = max(1, handoff_max_events)
        self.sink_names = list(sink_names)
        self.on_commit = on_commit
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._waiting_events = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._cleanup_wanted = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self._queue: QueueWriter | None = None
        self.committed = 0
        self.last_progress = time.monotonic()

    def start(self) -> None:
        self._queue = QueueWriter(self.store)
        self._thread.start()

    def submit(
        self, events: Sequence[tuple[Event, str]], checkpoints: Sequence[Checkpoint] = ()
    ) -> None:
        """Hand events (and checkpoints) over; wait until committed, or raise QueueError."""
        if not events and not checkpoints:
            return
        pending = _Pending(events, checkpoints)
        with self._cond:
            while (
                self._waiting_events
                and self._waiting_events + len(events) > self.handoff_max_events
                and not self._stopping
            ):
                self._cond.wait()
            if self._stopping:
                raise QueueError("the agent is stopping; the event was not accepted")
            self._waiting.append(pending)
            self._waiting_events += len(events)
            self._cond.notify_all()
        pending.done.wait()
        if pending.error is not None:
            raise pending.error

    def request_cleanup(self) -> None:
        """A sink confirmed something: delete what every sink has confirmed, soon."""
        self._cleanup_wanted.set()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new events, commit what was handed over, and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _take(self) -> list[_Pending]:
        with self._cond:
            while not self._waiting and not self._stopping:
                if not self._cond.wait(CLEANUP_INTERVAL):
                    break
            batch: list[_Pending] = []
            count = 0
            while self._waiting and (
                not batch or count + len(self._waiting[0].events) <= self.commit_max_events
            ):
                pending = self._waiting.popleft()
                batch.append(pending)
                count += len(pending.events)
            self._waiting_events -= count
            self._cond.notify_all()
            return batch

    def _run(self) -> None:
        assert self._queue is not None
        last_cleanup = 0.0
        try:
            while True:
                batch = self._take()
                if batch:
                    self._commit(batch)
                now = time.monotonic()
                self.last_progress = now
                if self._cleanup_wanted.is_set() and now - last_cleanup >= CLEANUP_INTERVAL:
                    self._cleanup_wanted.clear()
                    last_cleanup = now
                    try:
                        self._queue.delete_confirmed(self.sink_names)
                    except QueueError as exc:
                        log.error("%s; confirmed events stay on disk until it works", exc)
                with self._cond:
                    if self._stopping and not self._waiting:
                        break
        finally:
            self._queue.close()

    def _commit(self, batch: list[_Pending]) -> None:
        assert self._queue is not None
        events = [item for pending in batch for item in pending.events]
        checkpoints = [row for pending in batch for row in pending.checkpoints]
        error: Exception | None = None
        try:
            self._queue.append(events, checkpoints)
            self.committed += len(events)
        except QueueError as exc:
            log.error("%s; the sources were told, and nothing of this batch was accepted", exc)
            error = exc
        for pending in batch:
            pending.error = error
            pending.done.set()
        if error is None:
            self.on_commit()
