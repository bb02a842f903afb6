"""The running agent: starts the writer, forwarders and sources, and stops them in order.

Threads and what each owns:

- ``writer``: inserts into the queue and deletes confirmed events;
- ``sink:NAME``: one per sink, its connection and its cursor;
- ``source:NAME``: one per source, whatever the source watches;
- the main thread: signals, and the order of start and stop.

Stopping (SIGTERM or SIGINT): sources stop first, the writer commits what was
handed over, forwarders send what they can within ``[agent] shutdown_grace``,
and the process exits 0. Nothing accepted is lost: what was not sent stays on
disk for the next start.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from edge_agent import __version__, status
from edge_agent.api import Processor, Sink, Source, SourceContext
from edge_agent.backoff import Backoff
from edge_agent.bounds import Limits
from edge_agent.config import Config, InstanceConfig
from edge_agent.counters import LoggedProblems, utf8_len
from edge_agent.drain import UNLIMITED
from edge_agent.errors import QueueError
from edge_agent.event import EncodedEvent, Event, check_event, encode_data
from edge_agent.forwarder import Forwarder
from edge_agent.logfold import flush_folded
from edge_agent.plugin_host import PluginHost, SlowReporter
from edge_agent.queue import (
    INSTANCE_KEY,
    QueueStore,
    iter_checkpoints,
    read_checkpoints,
    read_stats,
)
from edge_agent.statedir import StateDirBusy, StateDirLock
from edge_agent.systemd import Notifier
from edge_agent.writer import Writer

log = logging.getLogger("edge_agent")

SOURCE_RESTART_MIN = 1.0
SOURCE_RESTART_MAX = 60.0
DAMAGED_REMINDER = 3600.0
#: A writer or forwarder whose loop has not turned for this long is stuck.
STUCK_AFTER = 120.0
STATUS_EVERY = 5.0
#: A publish call waiting this long (seconds) for its answer is called stalled.
STALLED_AFTER = 10.0
#: The source name of events the agent makes itself (queue.gap).
AGENT_SOURCE = "agent"
#: How long start-up (and a reload) waits for sources to listen before READY=1.
LISTEN_TIMEOUT = 30.0
#: How often that wait looks for a stop request (seconds).
LISTEN_POLL = 0.1


class SourceRunner:
    """Runs one source in its own thread and restarts it with backoff when it raises."""

    def __init__(self, source: Source, plugin: str) -> None:
        self.source = source
        self.plugin = plugin
        self.restarts = 0
        #: Times run() raised (refused commits: Agent.commit_errors, kept per name).
        self.errors = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"source:{source.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def carry_over(self, old: SourceRunner) -> None:
        """Take the counters of the runner this one replaces (a reload)."""
        self.restarts = old.restarts
        self.errors = old.errors
        self.source.counters.update(old.source.counters)

    def stop(self) -> None:
        try:
            self.source.stop()
        except Exception as exc:
            log.error("source %s (plugin %s): stop() raised %s", self.source.name, self.plugin, exc)
            self.source.stopping.set()

    def join(self, timeout: float | None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        backoff = Backoff(SOURCE_RESTART_MIN, SOURCE_RESTART_MAX)
        source = self.source
        while not source.stopping.is_set():
            started = time.monotonic()
            if not source.announces_listening:
                source.listening()
            try:
                source.run()
            except Exception as exc:
                if source.stopping.is_set():
                    return
                self.restarts += 1
                self.errors += 1
                error = f"{type(exc).__name__}: {exc}"
                if time.monotonic() - started > SOURCE_RESTART_MAX:
                    backoff.reset()
                    self.last_error = None  # it ran a while: a new failure, said in full
                delay = backoff.next()
                if error != self.last_error:
                    log.exception(
                        "source %s (plugin %s) failed: %s; restarting it in %.1fs",
                        source.name,
                        self.plugin,
                        error,
                        delay,
                    )
                else:  # the traceback was logged; the same line repeats (and is folded)
                    log.error(
                        "source %s (plugin %s) failed again: %s; restarting it with a"
                        " backoff of up to %gs",
                        source.name,
                        self.plugin,
                        error,
                        SOURCE_RESTART_MAX,
                    )
                self.last_error = error
                source.stopping.wait(delay)
                continue
            if not source.stopping.is_set():
                log.info("source %s (plugin %s) finished", source.name, self.plugin)
            return


class Agent:
    """The daemon: one configuration, one queue, its sources and sinks."""

    def __init__(self, config: Config, host: PluginHost) -> None:
        self.config = config
        self.host = host
        self.id = config.agent.id
        self.store = QueueStore(config.agent.state_dir, sync=config.queue.sync)
        #: One agent per state directory: taken before the queue opens.
        self.lock = StateDirLock(config.agent.state_dir)
        self.sinks: list[Sink] = []
        self.forwarders: list[Forwarder] = []
        self.sources: list[SourceRunner] = []
        self.processors: list[Processor] = []
        self.writer: Writer | None = None
        self.slow = SlowReporter()
        host.slow = self.slow
        self._stop_requested = threading.Event()
        self._reload_requested = threading.Event()
        #: Reloads finished (and whether the last was applied), for reload_and_wait().
        self._reloads = threading.Condition()
        self._reloads_done = 0
        self._last_reload_applied = False
        self._wake = threading.Event()  # a signal arrived
        self.notifier = Notifier()
        self.metrics_server: Any = None
        #: The ``edge-agent tap`` socket's server, once listening.
        self.tap: Any = None
        self.version = __version__
        self.started_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.status_interval = STATUS_EVERY
        self._last_status: dict[str, Any] | None = None
        #: Events committed per source since start.
        self.events_in: collections.Counter[str] = collections.Counter()
        #: Size of their data (as stored: JSON), in bytes.
        self.bytes_in: collections.Counter[str] = collections.Counter()
        #: Commits refused per source (an event that cannot be sent, a queue that cannot grow).
        self.commit_errors: collections.Counter[str] = collections.Counter()
        #: Gap events (type "<kind>.gap": a known loss) committed per source.
        self.gaps: collections.Counter[str] = collections.Counter()
        #: Exceptions raised by each processor's process().
        self.processor_errors: collections.Counter[str] = collections.Counter()
        #: Warnings and errors each plugin instance logged.
        self.logged_problems = LoggedProblems()
        #: Forwarders and source runners a reload stopped, by (kind, name): a
        #: replacement takes their counters.
        self.retired: dict[tuple[str, str], Any] = {}

    # -- events ------------------------------------------------------------

    def commit_events(
        self,
        source: str,
        events: Sequence[Event],
        checkpoint: Mapping[str, str | None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Run processors, encode, and commit ``events`` (and ``source``'s checkpoint).

        Returns once they are on disk; raises ValueError for an event that
        cannot be sent and QueueError when the queue cannot take them, or when
        ``cancel`` (the source's ``stopping``) is set while it waits for room.
        """
        try:
            processing = self.processors or self.host.processes_events
            if processing:
                processed = [self._process(event) for event in events]
                events = [event for event in processed if event is not None]
            for event in events:
                check_event(event)
            items = [
                # Data that came as JSON text is queued as it is, unless a processor ran.
                (event, event.data_json)
                if type(event) is EncodedEvent and not processing
                else (event, encode_data(event.data))
                for event in events
            ]
            if self.writer is None:
                raise QueueError("the agent has not started its queue")
            rows = [(source, key, value) for key, value in (checkpoint or {}).items()]
            self.writer.submit(items, rows, cancel)
        except (ValueError, QueueError):
            self.commit_errors[source] += 1
            raise
        self.events_in[source] += len(items)
        gaps = sum(event.type.endswith(".gap") for event, _ in items)
        if gaps:
            self.gaps[source] += gaps
        self.bytes_in[source] += sum(utf8_len(data) for _, data in items)

    def _process(self, event: Event) -> Event | None:
        """``process_event`` hooks, then the configured processors in file order."""
        processed = self.host.process_event(event, self)
        for processor in self.processors:
            if processed is None:
                return None
            try:
                with self.slow.timed(f"processor {processor.name}"):
                    result = processor.process(processed)
            except Exception as exc:
                self.processor_errors[processor.name] += 1
                log.error(
                    "processor %s raised for a %s event from %s: %s; the event goes on unchanged",
                    processor.name,
                    processed.type,
                    processed.source,
                    exc,
                )
                continue
            if result is None:
                processor.dropped += 1
            processed = result
        return processed

    def _wake_forwarders(self) -> None:
        for forwarder in self.forwarders:
            forwarder.wake.set()

    # -- life --------------------------------------------------------------

    def _make(self, instance: InstanceConfig) -> Any:
        cls = instance.registration.cls
        if instance.kind == "source":
            name = instance.name
            made: list[Source] = []  # the source, once made: its stopping ends a wait for room

            def commit(events: Sequence[Event], checkpoint: Any) -> None:
                cancel = made[0].stopping if made else None
                self.commit_events(name, events, checkpoint, cancel)

            context = SourceContext(
                agent_id=self.id,
                commit=commit,
                read_checkpoints=lambda: read_checkpoints(self.store, name),
                status=lambda: status.snapshot(self),
                scan_checkpoints=lambda prefix: iter_checkpoints(self.store, name, prefix),
            )
            made.append(cls(name=name, config=instance.config, context=context))
            return made[0]
        return cls(name=instance.name, config=instance.config, agent_id=self.id)

    def replace_processors(self) -> None:
        """Build the configured processors, then swap them in at once (sources may be
        running: none may see a half-built list)."""
        processors = []
        for instance in self.config.processors:
            try:
                processors.append(self._make(instance))
            except Exception as exc:
                log.exception(
                    "processor %s (plugin %s) could not be created: %s; events pass without it",
                    instance.name,
                    instance.plugin,
                    exc,
                )
        self.processors = processors

    def start(self) -> None:
        """Lock the state directory, open the queue, start writer, forwarders and sources.

        Raises StateDirBusy when another agent holds the state directory (then
        nothing was started, and :meth:`stop` has nothing to do), and
        QueueError when the queue cannot be opened.
        """
        queue = self.config.queue
        self.lock.acquire()
        logging.getLogger("edge_agent").addHandler(self.logged_problems)
        self.store.open()
        self._remind_damaged()
        log.info(
            "edge-agent %s starting: queue %s (sync=%s), %d sources, %d sinks",
            self.id,
            self.store.path,
            self.config.queue.sync,
            len(self.config.sources),
            len(self.config.sinks),
        )
        self.host.call_each("startup", agent=self)
        self.replace_processors()
        self.writer = Writer(
            self.store,
            commit_max_events=self.config.queue.commit_max_events,
            handoff_max_events=self.config.queue.handoff_max_events,
            sink_names=[s.name for s in self.config.sinks],
            routes=self.config.routes(),
            on_commit=self._wake_forwarders,
            limits=Limits(
                max_bytes=queue.max_bytes,
                max_events=queue.max_events,
                max_age=queue.max_age,
                reserve_free=queue.reserve_free,
                when_full=queue.when_full,
            ),
        )
        self.writer.start()
        self._start_tap()
        self._report_lost_queue()
        for instance in self.config.sinks:
            self.start_sink(instance)
        self._start_metrics()
        from edge_agent.reload import carry_renames_at_start

        carry_renames_at_start(self.store, self.config.sources)
        started = [self.start_source(instance) for instance in self.config.sources]
        self.wait_until_listening([r for r in started if r is not None])

    def wait_until_listening(
        self, runners: Sequence[SourceRunner], timeout: float | None = None
    ) -> None:
        """Wait (at most ``timeout``) until ``runners``' sources listen; name the late ones.

        READY=1 follows this, so that what happens after ``systemctl start``
        returns is seen. A source that is still not listening is named in a
        warning, and start-up goes on: READY is never held forever. A stop
        request (SIGTERM, SIGINT) ends the wait at once.
        """
        timeout = LISTEN_TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + timeout
        for runner in runners:
            while not runner.source.is_listening.is_set():
                left = deadline - time.monotonic()
                if left <= 0 or self._stop_requested.is_set():
                    break
                runner.source.is_listening.wait(min(left, LISTEN_POLL))
        if self._stop_requested.is_set():
            return
        late = [r for r in runners if not r.source.is_listening.is_set()]
        for runner in late:
            log.warning(
                "source %s (plugin %s) is not listening yet after %gs%s; going on without"
                " waiting for it: what it would see until then may be missed",
                runner.source.name,
                runner.plugin,
                timeout,
                f" (it failed: {runner.last_error})" if runner.last_error else "",
            )

    def not_listening(self) -> list[str]:
        """Each configured source that does not listen now, as "source NAME (plugin P)"
        with why when known; empty when every source listens."""
        running = {r.source.name: r for r in self.sources}
        late = []
        for instance in self.config.sources:
            runner = running.get(instance.name)
            if runner is None:
                late.append(
                    f"source {instance.name} (plugin {instance.registration.plugin})"
                    " could not be created"
                )
            elif not runner.source.is_listening.is_set():
                why = f", it failed: {runner.last_error}" if runner.last_error else ""
                late.append(f"source {instance.name} (plugin {runner.plugin}{why})")
        return late

    def _report_lost_queue(self) -> None:
        """A queue lost at start or in the last run is a certain loss: say so in the stream.

        A ``queue.gap`` event of the agent's own source ``agent`` says why. For
        a damaged queue moved aside at start, it names the file it was moved to
        and what could still be read of it (events, oldest, newest). For a
        queue file that vanished while the last run used it (deleted, replaced,
        its state directory deleted), it gives what that run recorded: path,
        detected, events (not sent to every sink), oldest, newest, sinks (each
        one's backlog). Sources go on numbering where the lost queue stopped, so
        the loss also shows as a jump in ``sequence``.
        """
        lost = self.store.moved_aside
        if lost is not None:
            self.store.moved_aside = None
            data = {
                "reason": "the queue file was damaged and moved aside; its events were not sent"
            }
            data.update(lost)
            self._report_gap("the damaged queue", data)
        vanished = self.store.lost
        if vanished is not None:
            data = {
                **vanished,
                "reason": f"{vanished.get('reason', 'the queue file vanished')};"
                " its queued events were not sent",
            }
            if self._report_gap("the queue that vanished in the last run", data):
                self.store.forget_lost()

    def _report_gap(self, what: str, data: dict[str, Any]) -> bool:
        event = Event(type="queue.gap", source=AGENT_SOURCE, data=data)
        try:
            self.commit_events(AGENT_SOURCE, [event])
        except (ValueError, QueueError) as exc:
            log.error("could not report %s in a queue.gap event: %s", what, exc)
            return False
        log.warning("reported %s as a queue.gap event: %s", what, data)
        return True

    def start_sink(self, instance: InstanceConfig) -> Forwarder | None:
        """Create a sink and start its forwarder; None (logged) if it cannot be created."""
        assert self.writer is not None
        try:
            sink = self._make(instance)
        except Exception as exc:
            # Its name stays among the sinks the writer waits for, so nothing
            # is deleted that this sink never got.
            log.exception(
                "sink %s (plugin %s) could not be created: %s; its events stay queued"
                " until it can be (restart after fixing it)",
                instance.name,
                instance.registration.plugin,
                exc,
            )
            return None
        forwarder = Forwarder(
            sink,
            self.store,
            route=instance.route,
            limits=instance.limits,
            on_confirmed=self.writer.request_cleanup,
            dead_letter_after=self.config.queue.dead_letter_after,
        )
        if not instance.route.everything:
            log.info(
                "sink %s gets only the events it selects: %s", sink.name, instance.route.describe()
            )
        if instance.limits != UNLIMITED:
            log.info("sink %s sends %s", sink.name, instance.limits.describe())
        retired = self.retired.pop(("sink", instance.name), None)
        if retired is not None:
            forwarder.carry_over(retired)
        self.sinks = [*self.sinks, sink]  # replaced, never changed in place: other
        self.forwarders = [*self.forwarders, forwarder]  # threads iterate these
        forwarder.start()
        return forwarder

    def start_source(self, instance: InstanceConfig) -> SourceRunner | None:
        """Create a source and start its thread; None (logged) if it cannot be created."""
        try:
            source = self._make(instance)
        except Exception as exc:
            log.exception(
                "source %s (plugin %s) could not be created: %s; the others run",
                instance.name,
                instance.plugin,
                exc,
            )
            return None
        self._record(instance)
        runner = SourceRunner(source, instance.registration.plugin)
        retired = self.retired.pop(("source", instance.name), None)
        if retired is not None:
            runner.carry_over(retired)
        self.sources = [*self.sources, runner]
        runner.start()
        return runner

    def _record(self, instance: InstanceConfig) -> None:
        """Remember the source's plugin and settings, to recognise a rename made while stopped."""
        from edge_agent.reload import instance_record

        assert self.writer is not None
        try:
            self.writer.submit([], [(instance.name, INSTANCE_KEY, instance_record(instance))])
        except QueueError as exc:
            log.warning("source %s: %s; a rename of it will not be recognised", instance.name, exc)

    def _start_tap(self) -> None:
        """Listen for ``edge-agent tap`` on the state directory's socket (never fatal)."""
        from edge_agent.tap import TapError, TapServer

        assert self.writer is not None
        tap = TapServer(self.store.state_dir, self.id, self.writer)
        try:
            tap.start()
        except TapError as exc:
            log.warning("%s", exc)
            return
        self.tap = tap

    def _start_metrics(self) -> None:
        listen = self.config.metrics.listen
        if not listen:
            return
        try:
            from edge_agent import metrics

            self.metrics_server = metrics.serve(self, listen)
        except ImportError:
            log.error(
                "[metrics] listen is set but prometheus-client is not installed:"
                " pip install 'edge-event-agent[metrics]'; running without metrics"
            )
        except OSError as exc:
            log.error("cannot serve metrics on %s: %s; running without them", listen, exc)

    def request_stop(self) -> None:
        """Ask :meth:`run_until_stopped` to return (signal-safe)."""
        self._stop_requested.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads. Install before :meth:`start`, so a signal
        during a long start-up is kept for the main loop instead of killing the process."""

        def on_stop(signum: int, _frame: Any) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            self.request_stop()

        def on_hup(_signum: int, _frame: Any) -> None:
            self.request_reload()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def run_until_stopped(self) -> None:
        """Block the main thread until SIGTERM or SIGINT (or :meth:`request_stop`)."""
        last_reminder = last_status = time.monotonic()
        if self._stop_requested.is_set():
            log.info("edge-agent %s stopping before it was ready", self.id)
            return
        self.notifier.ready(self.summary())
        late = self.not_listening()
        if late:
            log.warning(
                "edge-agent %s ready, but not every source listens: %s; the others run",
                self.id,
                "; ".join(late),
            )
        else:
            log.info("edge-agent %s ready: every source listens", self.id)
        self.write_status()
        while not self._stop_requested.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stop_requested.is_set():
                break
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self.reload()
                continue
            if self.writer is not None and not self.writer.is_alive():
                raise QueueError(
                    self.writer.failure
                    or "the queue writer stopped unexpectedly; exiting so systemd restarts us"
                )
            try:
                self.lock.check()
            except StateDirBusy as exc:
                raise QueueError(str(exc)) from None
            self.slow.report_stuck()
            self.warn_stalled()
            flush_folded()
            stuck = self.stuck()
            if not stuck:
                self.notifier.watchdog()
            elif self.notifier.watchdog_interval:
                log.error("%s made no progress for %.0fs; not telling the watchdog", *stuck)
            if time.monotonic() - last_status >= self.status_interval:
                last_status = time.monotonic()
                self.notifier.status(self.summary())
                self.write_status()
            if time.monotonic() - last_reminder >= DAMAGED_REMINDER:
                last_reminder = time.monotonic()
                self._remind_damaged()

    def warn_stalled(self) -> None:
        """Say once when a sink's publish call has waited STALLED_AFTER s for an answer.

        A connection can stay open while nothing comes back (a stalled link, a
        broker that hangs): the sink still says "connected" until its heartbeat
        or keepalive gives up, which takes up to twice that interval. Status
        shows the wait at once (``stalled_for``), and this line tells why the
        backlog grows.
        """
        now = time.monotonic()
        for forwarder in self.forwarders:
            since = forwarder.publishing_since
            if since is None:
                forwarder.stall_warned = False
                continue
            if now - since < STALLED_AFTER:
                continue
            if not forwarder.stall_warned:
                forwarder.stall_warned = True
                log.warning(
                    "sink %s: %s has not answered for %.0fs while events were being sent;"
                    " the connection may be stalled. Events stay queued; the connection is"
                    " dropped and made again once its heartbeat or keepalive runs out.",
                    forwarder.name,
                    forwarder.sink.target,
                    now - since,
                )

    def reload(self) -> bool:
        """SIGHUP: read the config file again and apply it (see :mod:`edge_agent.reload`).

        Runs in the main thread; False when the new file was refused (invalid).
        """
        from edge_agent.reload import reload

        self.notifier.send("RELOADING=1", "STATUS=reloading the configuration")
        applied = False
        try:
            applied = reload(self)
        finally:
            with self._reloads:
                self._reloads_done += 1
                self._last_reload_applied = applied
                self._reloads.notify_all()
        if not self._stop_requested.is_set():  # else STOPPING=1 follows and ends the reload
            self.notifier.ready(self.summary())
        return applied

    def request_reload(self) -> None:
        """Ask the main loop to reload the configuration, as SIGHUP does (any thread)."""
        self._reload_requested.set()
        self._wake.set()

    def reload_and_wait(self, timeout: float) -> bool | None:
        """Request a reload and wait for it (a remote ``reload`` command): True if the new
        configuration was applied, False if it was refused, None if not done in time."""
        with self._reloads:
            before = self._reloads_done
            self.request_reload()
            finished = self._reloads.wait_for(lambda: self._reloads_done > before, timeout)
            return self._last_reload_applied if finished else None

    def stuck(self) -> tuple[str, float] | None:
        """(what, seconds) for a writer or forwarder that is dead or made no progress lately."""
        now = time.monotonic()
        parts: list[tuple[str, Any]] = [("the queue writer", self.writer)]
        parts += [(f"sink {f.name}", f) for f in self.forwarders]
        for name, part in parts:
            if part is None:
                continue
            if not part.is_alive():
                return name, float("inf")
            if now - part.last_progress > STUCK_AFTER:
                return name, now - part.last_progress
        return None

    def write_status(self) -> None:
        """Refresh ``status.json`` in the state directory for ``edge-agent status``."""
        try:
            snapshot = status.snapshot(self)
            status.write(self.store.state_dir, snapshot, self._last_status)
            self._last_status = snapshot
        except Exception as exc:  # a status must never take the agent down
            log.warning("cannot write the status snapshot: %s", exc)

    def summary(self) -> str:
        """One line for systemd's STATUS: each sink's state and the backlog."""
        try:
            stats = read_stats(self.store, self.config.routes())
        except Exception as exc:  # a status must never take the agent down
            return f"queue unreadable: {exc}"
        sinks = ", ".join(
            f"{f.name} {'connected' if f.connected else 'offline'}"
            f" ({stats.sink_backlog.get(f.name, 0)} waiting)"
            for f in self.forwarders
        )
        return f"{stats.events} events queued; {sinks or 'no sinks'}"

    def _left_behind(self) -> str:
        """For the last line at a stop: what each sink leaves queued for the next start."""
        try:
            backlog = read_stats(self.store, self.config.routes()).sink_backlog
        except QueueError as exc:
            return f"the queue cannot be read: {exc}"
        parts = [
            f"sink {f.name}: {backlog.get(f.name, 0)} events left queued"
            f"{'' if backlog.get(f.name, 0) == 0 else ' for the next start'}"
            f"{f' (last error: {f.last_error})' if f.last_error and backlog.get(f.name) else ''}"
            for f in self.forwarders
        ]
        return "; ".join(parts) or "no sinks"

    def _remind_damaged(self) -> None:
        """Keep saying that a damaged queue was moved aside, until an operator deletes it."""
        for path in self.store.damaged_copies():
            log.warning(
                "a damaged queue was moved aside to %s; its events were not sent. Inspect it"
                " and delete it to silence this warning.",
                path,
            )

    def stop(self) -> None:
        """Stop sources, commit, flush within the grace period, stop sinks."""
        if not self.lock.held:
            return  # never started: the state directory (and its status) is another's
        self.notifier.stopping()
        grace = self.config.agent.shutdown_grace
        if self.writer is not None and self.writer.failure:
            grace = 0.0  # the queue is gone: what is sent now would be counted as lost too
        for runner in self.sources:
            runner.stop()
        for runner in self.sources:
            if not runner.join(5.0):
                log.warning("source %s did not stop within 5s; leaving it", runner.source.name)
        if self.writer is not None:
            self.writer.stop(timeout=30.0)
        deadline = time.monotonic() + grace
        for forwarder in self.forwarders:
            forwarder.drain(deadline)
        for forwarder in self.forwarders:
            forwarder.join(max(0.0, deadline - time.monotonic()))
        for forwarder in self.forwarders:
            forwarder.abort()
        for forwarder in self.forwarders:
            if not forwarder.join(5.0):
                log.warning("sink %s did not stop within 5s; leaving it", forwarder.name)
        if self.writer is not None:
            self.writer.record_lost()
        try:
            self.host.call_each("shutdown", agent=self)
            if self.writer is None or self.writer.vanished is None:
                self.write_status()
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
            log.info("edge-agent %s stopped; %s", self.id, self._left_behind())
        finally:
            if self.tap is not None:
                self.tap.stop()
            logging.getLogger("edge_agent").removeHandler(self.logged_problems)
            self.lock.release()
