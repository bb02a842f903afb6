"""Base classes for source and sink plugins.

A **source** runs in its own thread and emits events::

    class Heartbeat(Source):
        @dataclass(kw_only=True)
        class Config:
            interval: Duration = option(10.0, doc="Seconds between beats.")

        def run(self) -> None:
            while not self.stopping.wait(self.config.interval):
                self.emit("heartbeat", {"uptime": time.monotonic()})

Events are committed to the queue before ``emit`` returns; a source that
reads something with a position (a file offset) passes a ``checkpoint`` that
is committed in the same transaction, and reads it back with
:meth:`Source.checkpoints` when it starts again.

A **sink** is driven by a forwarder thread that owns it: ``open()``, then
``publish(batch)`` again and again, then ``close()``::

    class Printer(Sink):
        def publish(self, events):
            for event in events:
                print(event.to_cloudevent_json())
            return events          # every one of them is confirmed
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from edge_agent.backoff import Jitter
from edge_agent.errors import QueueError
from edge_agent.event import Event, QueuedEvent


class SourceContext:
    """What the agent gives a source: who it is, and how to commit to the queue.

    Built by the agent; plugin authors use it only through :class:`Source`'s
    methods, and build one themselves only in tests (see :mod:`edge_agent.testing`).
    """

    def __init__(
        self,
        *,
        agent_id: str,
        commit: Callable[[Sequence[Event], Mapping[str, str | None] | None], None],
        read_checkpoints: Callable[[], dict[str, str]],
        status: Callable[[], dict[str, Any]] | None = None,
        scan_checkpoints: Callable[[str], Iterator[tuple[str, str]]] | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.commit = commit
        self.read_checkpoints = read_checkpoints
        self.status = status
        #: Keys starting with a prefix, in key order, streamed (None: filter read_checkpoints).
        self.scan_checkpoints = scan_checkpoints


class Source:
    """Base class of source plugins.

    The agent creates one instance per ``[[sources.NAME]]`` table and calls
    :meth:`run` in a thread of its own. ``run`` returns when
    :attr:`stopping` is set; if it raises, the error is logged with the
    instance name and ``run`` is called again after a backoff.

    Attributes set for you: ``name`` (instance name), ``config`` (an instance
    of :attr:`Config`), ``agent_id``, ``log`` (a logger named after the
    instance), ``stopping`` (a ``threading.Event``) and ``counters`` (see
    :meth:`count`).

    **Listening.** The agent tells systemd it is ready (READY=1) only once
    every source listens, so that nothing that happens after
    ``systemctl start`` returns is missed. A source whose ``run`` sets
    something up first (a watch, an open file, a socket) sets
    :attr:`announces_listening` and calls :meth:`listening` once it is set
    up; any other source counts as listening as soon as ``run`` is called.
    """

    #: The config schema: a dataclass (see :mod:`edge_agent.schema`), or None for
    #: a source that takes no options besides ``name``.
    Config: ClassVar[type | None] = None

    #: True if :meth:`run` calls :meth:`listening` once it has set up what it
    #: listens on. False: the source listens as soon as ``run`` is called.
    announces_listening: ClassVar[bool] = False

    def __init__(self, *, name: str, config: Any, context: SourceContext) -> None:
        self.name = name
        self.config = config
        self.context = context
        self.agent_id = context.agent_id
        self.log = logging.getLogger(f"edge_agent.source.{name}")
        self.stopping = threading.Event()
        #: Set once the source listens (see :meth:`listening`).
        self.is_listening = threading.Event()
        #: Counts of this source's own (overflows, bytes dropped...), shown by
        #: ``edge-agent status`` and the metrics. Change them with :meth:`count`.
        self.counters: collections.Counter[str] = collections.Counter()

    def run(self) -> None:
        """Produce events until :attr:`stopping` is set. Runs in its own thread."""
        raise NotImplementedError

    def listening(self) -> None:
        """Say that the source has set up what it listens on (see the class docstring).

        Call it once every watch is set, every file opened at its offset, every
        socket bound, or tried (a path that does not exist yet counts as tried:
        it is looked for again later). Calling it again does nothing.
        """
        self.is_listening.set()

    def count(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to this source's counter ``name`` (for example "overflows").

        Counters are shown per source by ``edge-agent status`` and as the
        metric ``edge_agent_source_counter_total{source=..., counter=name}``;
        they never go back, also across a reload. Call it from the source's
        own threads.
        """
        self.counters[name] += amount

    def report_gap(
        self,
        type: str,
        data: dict[str, Any],
        *,
        subject: str | None = None,
        checkpoint: Mapping[str, str | None] | None = None,
    ) -> bool:
        """Report a loss that is certain and cannot be undone, as an event of its own.

        ``type`` is ``"<kind>.gap"`` (``file.gap``, ``log.gap``...); ``data``
        names what was lost as precisely as the source knows: a path, a byte
        range, a count, a time window, and a ``reason``. The event is
        committed like any other (retried while the queue cannot take it), a
        warning is logged, and the source's ``gaps`` counter goes up.
        Consumers alert on ``*.gap``; docs/events.md lists them. ``checkpoint``
        is committed in the same transaction, so that a crash cannot report
        the same loss twice. Returns False if the source was told to stop
        before the event could be committed.
        """
        if not type.endswith(".gap"):
            raise ValueError(f"a gap event's type ends in '.gap', not {type!r}")
        self.log.warning(
            "reporting a %s event: %s",
            type,
            ", ".join(f"{key}={value}" for key, value in data.items()),
        )
        return self.emit_until_accepted(
            [self.event(type, data, subject=subject)], checkpoint=checkpoint
        )

    def stop(self) -> None:
        """Ask :meth:`run` to return. Override to wake a blocking call; call super()."""
        self.stopping.set()

    def event(self, type: str, data: Any = None, *, subject: str | None = None) -> Event:
        """Build an event of this source (for :meth:`emit_many`)."""
        return Event(type=type, source=self.name, data=data, subject=subject)

    def emit(
        self,
        type: str,
        data: Any = None,
        *,
        subject: str | None = None,
        checkpoint: Mapping[str, str | None] | None = None,
    ) -> None:
        """Commit one event to the queue; returns once it is on disk.

        Blocks while the queue's hand-off is full (backpressure). Raises
        ``ValueError`` when ``data`` is not JSON-serialisable UTF-8 and
        :class:`edge_agent.errors.QueueError` when the queue cannot take it (the
        event was then not accepted: keep it and try again later).
        ``checkpoint`` is committed in the same transaction (see
        :meth:`emit_many`).
        """
        self.context.commit([self.event(type, data, subject=subject)], checkpoint)

    def emit_many(
        self, events: Sequence[Event], *, checkpoint: Mapping[str, str | None] | None = None
    ) -> None:
        """Commit several events in one transaction; returns once all are on disk.

        ``checkpoint`` maps keys to text values (``None`` deletes a key) that
        are saved in the same transaction as the events, so after a crash
        :meth:`checkpoints` returns exactly the state that matches the events
        committed: a tailed file's offset, say. Events dropped by a
        processor do not stop their checkpoint from being saved.
        """
        self.context.commit(events, checkpoint)

    def emit_until_accepted(
        self,
        events: Sequence[Event],
        *,
        batch: int = 500,
        checkpoint: Mapping[str, str | None] | None = None,
    ) -> bool:
        """Commit events (in transactions of at most ``batch``), trying again while the
        queue cannot take them (a full disk): a warning each time, backoff up to 30 s.
        ``checkpoint`` is committed with the last transaction.

        For sources that cannot re-read what they saw (a device event, a serial
        line). Returns False if the source was told to stop first: the events
        not yet committed were then not accepted.
        """
        wait = 0.5
        for start in range(0, len(events), batch):
            chunk = events[start : start + batch]
            while True:
                if self.stopping.is_set():
                    return False
                try:
                    last = start + batch >= len(events)
                    self.context.commit(chunk, checkpoint if last else None)
                    wait = 0.5
                    break
                except QueueError as exc:
                    self.log.warning(
                        "could not commit %d events: %s; trying again in %.1fs",
                        len(chunk),
                        exc,
                        wait,
                    )
                    self.stopping.wait(wait)
                    wait = min(wait * 2, 30.0)
        return True

    def save_checkpoint(self, checkpoint: Mapping[str, str | None]) -> None:
        """Save checkpoint values without events (a skipped blank line, a rotation)."""
        self.context.commit([], checkpoint)

    def checkpoints(self) -> dict[str, str]:
        """This source instance's committed checkpoint values, as last saved."""
        return self.context.read_checkpoints()

    def checkpoint_range(self, prefix: str) -> Iterator[tuple[str, str]]:
        """This source's committed checkpoints whose key starts with ``prefix``, as
        ``(key, value)`` in key order (by code point; ``""``: all of them).

        Read from disk in pages, for a source that keeps many keys (an index of
        files): one key range is read without loading the rest. Consume it
        soon: it holds a read snapshot of the queue while it is open.
        """
        if self.context.scan_checkpoints is not None:
            return self.context.scan_checkpoints(prefix)
        found = self.context.read_checkpoints()
        return iter(sorted((k, v) for k, v in found.items() if k.startswith(prefix)))

    def agent_status(self) -> dict[str, Any]:
        """The running agent's status, as ``edge-agent status --json`` shows it under
        "status": queue, sinks, sources and processors with their counters."""
        if self.context.status is None:
            raise RuntimeError("no agent status here (a source run outside the agent)")
        return self.context.status()


@dataclass(frozen=True)
class Rejection:
    """A sink's verdict on one event it could not deliver (see :meth:`Sink.reject`)."""

    event: QueuedEvent
    reason: str
    #: The destination refused it for a reason that will not go away by itself.
    permanent: bool = True
    #: It cannot be sent at all (too large, a topic the destination cannot take).
    invalid: bool = False


class Sink:
    """Base class of sink plugins.

    The agent creates one instance per ``[[sinks.NAME]]`` table and one
    forwarder thread that owns it. The forwarder calls :meth:`open`, then
    :meth:`publish` with batches of at most :attr:`max_batch` events in queue
    order, then :meth:`close`. It is handed only the events its ``sources`` and
    ``types`` select (common options the agent handles, as ``name``; see
    agent/routing.py). An event leaves the queue only when every sink that
    selects it has confirmed it.

    Raise :class:`edge_agent.errors.SinkUnavailable` (or any exception) from
    ``open`` or ``publish`` when the destination cannot take events now: the
    forwarder logs the reason once, calls ``close``, and retries ``open``
    with a backoff between :attr:`retry_min` and :attr:`retry_max` seconds.

    For one event the destination will not take, call :meth:`reject` instead:
    the events behind it go on, and after ``[queue] dead_letter_after``
    attempts (at once, for an invalid one) it is set aside as a dead letter.

    Attributes set for you: ``name``, ``config``, ``agent_id``, ``log`` and
    ``stopping`` (set when the agent must stop now: cut long waits short).
    """

    Config: ClassVar[type | None] = None

    #: The most events handed to one :meth:`publish` call.
    max_batch: int = 100
    #: Backoff floor and cap, in seconds, between failed attempts.
    retry_min: float = 1.0
    retry_max: float = 60.0
    #: How each backoff delay is drawn below its doubling ceiling: "full" (anywhere
    #: from 0, from the first retry on: spreads a fleet's reconnects), "none" (the
    #: ceiling itself) or "equal" (between half the ceiling and the ceiling).
    retry_jitter: Jitter = "full"
    #: The first :meth:`open` after the forwarder starts waits a random time between
    #: 0 and this many seconds, so that a fleet started at once does not connect at once.
    first_open_delay: float = 0.0
    #: True in ``edge-agent check --connect``, which calls :meth:`open` then
    #: :meth:`close` only to prove the destination answers, possibly while the agent
    #: runs: an ``open`` that would disturb it (take over its MQTT session, publish a
    #: retained status) leaves that out.
    probing: bool = False

    def __init__(self, *, name: str, config: Any, agent_id: str) -> None:
        self.name = name
        self.config = config
        self.agent_id = agent_id
        self.log = logging.getLogger(f"edge_agent.sink.{name}")
        self.stopping = threading.Event()

    @property
    def target(self) -> str:
        """Where events go, for log lines ("127.0.0.1:1883", "stdout")."""
        return type(self).__name__

    def open(self) -> None:
        """Connect to the destination. Called before the first publish and after a failure."""

    def publish(self, events: list[QueuedEvent]) -> Iterable[QueuedEvent]:
        """Deliver ``events`` (in queue order) and return those the destination confirmed.

        Return only events whose delivery the destination acknowledged (an
        MQTT PUBACK, a publisher confirm, an fsync). Events not returned stay
        queued and are handed over again, in order, in the next call. Return
        ``events`` when all were confirmed.

        A sink that keeps messages in flight across calls (a sliding window)
        may return as soon as some are confirmed; it then recognises the ones
        still in flight by ``position`` in the next call and does not send
        them twice. When a call confirms nothing, the forwarder waits (with
        backoff) before the next one.
        """
        raise NotImplementedError

    def reject(
        self, event: QueuedEvent, reason: str, *, permanent: bool = True, invalid: bool = False
    ) -> None:
        """Say why ``event`` was not delivered, so it does not hold back the events behind it.

        Call it from :meth:`publish` (or from a callback that runs inside it),
        for an event of the batch that is not among those returned; it may
        also be called just before ``publish`` raises, for the event that
        broke the connection. ``reason`` is for the operator: what the
        destination said ("0x87 Not authorized", "no queue is bound").

        - ``permanent=True`` (the default): the destination refused it and
          will refuse it again (not authorised, unroutable). It is sent again
          and, after ``[queue] dead_letter_after`` such refusals in a row, set
          aside as a dead letter; the other events go on meanwhile.
        - ``invalid=True``: it cannot be sent at all (larger than the
          destination takes, a name the protocol forbids). Set aside at once.
        - ``permanent=False``: a refusal for now (quota exceeded, server
          busy). It is sent again after a backoff, and never set aside.

        A sink that never calls it keeps working as before: an event not
        returned is simply handed over again.
        """
        self.__dict__.setdefault("_rejections", []).append(
            Rejection(event, reason, permanent=permanent or invalid, invalid=invalid)
        )

    def take_rejections(self) -> list[Rejection]:
        """The rejections made since the last call (the forwarder takes them after each
        :meth:`publish`; :class:`edge_agent.testing.SinkHarness` too)."""
        taken = self.__dict__.get("_rejections") or []
        self.__dict__["_rejections"] = []
        return taken

    def check_connection(self) -> None:
        """Raise :class:`edge_agent.errors.SinkUnavailable` if the connection is known to be lost.

        Called about once a second while there is nothing to send, and while
        the forwarder waits after a round that confirmed nothing, so that an
        outage is noticed (and logged) before the next event arrives. A sink
        whose client has no thread of its own answers heartbeats here. The
        default does nothing.
        """

    def close(self) -> None:
        """Release the connection. Must not raise; called after a failure too."""


class Processor:
    """Base class of processor plugins: filter, change or enrich events before they are queued.

    The agent creates one instance per ``[[processors]]`` table whose ``type``
    names it; the instances run in the order of those tables in the
    configuration (a config folder's files in name order), in the
    emitting source's thread (so several threads may call :meth:`process` at
    once: guard shared state with a lock). Keep it fast: the source waits.

    Attributes set for you: ``name``, ``config``, ``agent_id``, ``log``, and
    ``dropped`` (how many events :meth:`process` dropped, kept by the agent).
    """

    Config: ClassVar[type | None] = None

    def __init__(self, *, name: str, config: Any, agent_id: str) -> None:
        self.name = name
        self.config = config
        self.agent_id = agent_id
        self.log = logging.getLogger(f"edge_agent.processor.{name}")
        self.dropped = 0

    def process(self, event: Event) -> Event | None:
        """Return the event (changed or not) to keep it, or None to drop it.

        An exception is logged with the processor's name and the event goes
        on unchanged.
        """
        raise NotImplementedError
