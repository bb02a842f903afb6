"""The optional Prometheus endpoint: ``[metrics] listen = "127.0.0.1:9108"``.

Off unless configured; it then serves the text exposition format at
``/metrics`` and a health check at ``/health`` on that address only (404
elsewhere). Values are read from the running agent at each scrape, from the
same data as ``edge-agent status``.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edge_agent import __version__

log = logging.getLogger("edge_agent.metrics")


class AgentCollector:
    """A prometheus-client collector reading the agent's status snapshot."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        from edge_agent import status

        build_info = GaugeMetricFamily(
            "edge_agent_build_info", "Always 1; the version in a label.", labels=["version"]
        )
        build_info.add_metric([__version__], 1)
        yield build_info
        data = status.snapshot(self.agent)
        queue = data["queue"]
        events = GaugeMetricFamily("edge_agent_queue_events", "Events in the queue on disk.")
        events.add_metric([], queue["events"])
        yield events
        size = GaugeMetricFamily("edge_agent_queue_bytes", "Size of the queue files on disk.")
        size.add_metric([], queue["file_bytes"])
        yield size
        age = GaugeMetricFamily(
            "edge_agent_queue_oldest_age_seconds", "Age of the oldest queued event (0: empty)."
        )
        age.add_metric([], _age(queue["oldest"]))
        yield age
        committed = CounterMetricFamily(
            "edge_agent_queue_committed_events", "Events committed since start."
        )
        committed.add_metric([], queue["committed"])
        yield committed
        dropped = CounterMetricFamily(
            "edge_agent_queue_dropped_events",
            'Events dropped from the queue, per source and reason ("queue_full", "max_age").',
            labels=["source", "reason"],
        )
        for reason, counts in queue["dropped_by_reason"].items():
            for source, count in counts.items():
                dropped.add_metric([source, reason], count)
        yield dropped

        yield from _per_instance("sink", data["sinks"], SINK_METRICS)
        latency = HistogramMetricFamily(
            "edge_agent_sink_publish_latency_seconds",
            "From handing events to the sink to their confirmation by the destination.",
            labels=["sink"],
        )
        for forwarder in self.agent.forwarders:
            histogram = forwarder.latency
            latency.add_metric([forwarder.name], histogram.cumulative(), histogram.sum)
        yield latency
        waited = CounterMetricFamily(
            "edge_agent_sink_rate_limited_seconds",
            "Seconds a sink waited for its max_rate / max_bytes_rate since start.",
            labels=["sink"],
        )
        for forwarder in self.agent.forwarders:
            waited.add_metric([forwarder.name], forwarder.rate_waited)
        yield waited
        yield from _per_instance("source", data["sources"], SOURCE_METRICS)
        counters = CounterMetricFamily(
            "edge_agent_source_counter",
            "A source's own counts (inotify overflows, bytes dropped...), by name.",
            labels=["source", "counter"],
        )
        for source, values in data["sources"].items():
            for counter, count in values["counters"].items():
                counters.add_metric([source, counter], count)
        yield counters
        yield from _per_instance("processor", data["processors"], PROCESSOR_METRICS)


#: Per-instance metrics: status key → (metric name, help, counter or gauge).
SINK_METRICS = {
    "backlog": ("edge_agent_sink_backlog_events", "Events a sink has not confirmed.", "gauge"),
    "connected": ("edge_agent_sink_connected", "1 while the sink is connected.", "gauge"),
    "confirmed": ("edge_agent_sink_confirmed_events", "Events the sink confirmed.", "counter"),
    "bytes": (
        "edge_agent_sink_confirmed_bytes",
        "Data bytes (JSON, as queued) of the events the sink confirmed.",
        "counter",
    ),
    "reconnects": ("edge_agent_sink_reconnects", "Connections after the first.", "counter"),
    "refused": ("edge_agent_sink_refused_events", "Events the destination refused.", "counter"),
    "dead_letters": (
        "edge_agent_sink_dead_letters",
        "Dead letters of a sink now: events it could never deliver, set aside.",
        "gauge",
    ),
    "dead_lettered": (
        "edge_agent_sink_dead_lettered_events",
        "Events a sink set aside as dead letters since start.",
        "counter",
    ),
    "dead_letters_dropped": (
        "edge_agent_sink_dead_letters_dropped",
        "Dead letters of a sink dropped by the queue's bounds (full, max_age).",
        "counter",
    ),
    "errors": (
        "edge_agent_sink_errors",
        "Failed connects and publishes, and rounds of which nothing was confirmed.",
        "counter",
    ),
    "warnings": (
        "edge_agent_sink_warnings",
        "Warnings and errors the sink plugin logged.",
        "counter",
    ),
}
SOURCE_METRICS = {
    "events": ("edge_agent_source_events", "Events committed per source.", "counter"),
    "bytes": (
        "edge_agent_source_bytes",
        "Data bytes (JSON, as queued) committed per source.",
        "counter",
    ),
    "restarts": (
        "edge_agent_source_restarts",
        "Times a source was restarted after failing.",
        "counter",
    ),
    "errors": (
        "edge_agent_source_errors",
        "Failures (run() raised) and refused commits of a source.",
        "counter",
    ),
    "gaps": (
        "edge_agent_source_gaps",
        "Gap events (a known loss, type <kind>.gap) a source committed.",
        "counter",
    ),
    "warnings": (
        "edge_agent_source_warnings",
        "Warnings and errors the source plugin logged.",
        "counter",
    ),
}
PROCESSOR_METRICS = {
    "dropped": ("edge_agent_processor_dropped_events", "Events a processor dropped.", "counter"),
    "errors": ("edge_agent_processor_errors", "Exceptions a processor raised.", "counter"),
    "warnings": (
        "edge_agent_processor_warnings",
        "Warnings and errors the processor plugin logged.",
        "counter",
    ),
}


def _per_instance(
    kind: str, instances: dict[str, dict[str, Any]], described: dict[str, tuple[str, str, str]]
) -> Iterator[Any]:
    """One metric family per key of ``described``, a sample per instance, labelled ``kind``."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    families = {
        key: (GaugeMetricFamily if form == "gauge" else CounterMetricFamily)(
            name, help_text, labels=[kind]
        )
        for key, (name, help_text, form) in described.items()
    }
    for instance, values in instances.items():
        for key, family in families.items():
            family.add_metric([instance], float(values[key]))
    yield from families.values()


def _age(time_text: str | None) -> float:
    if not time_text:
        return 0.0
    from datetime import UTC, datetime

    then = datetime.strptime(time_text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - then).total_seconds())


#: Connections held at once (waiting for their request, queued or being answered); past
#: it, the one that waited longest without a byte is closed.
MAX_CONNECTIONS = 64
#: Threads that answer requests: a connection gets one only once its request has begun.
WORKERS = 4
#: Seconds a connection may stay without sending its request.
IDLE_TIMEOUT = 10.0
#: Seconds from a request's first byte to the end of the answer; a slower client is cut off.
REQUEST_TIMEOUT = 10.0


def health(agent: Any) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for ``/health``: 200 while the queue writer and every sink's
    forwarder make progress (the systemd watchdog's rule, :meth:`Agent.stuck`), else 503."""
    try:
        stuck = agent.stuck()
    except Exception as exc:  # a probe must answer, whatever happened
        return 503, {"status": "unknown", "reason": f"cannot tell: {exc}"}
    if stuck is None:
        return 200, {"status": "ok"}
    what, seconds = stuck
    if seconds == float("inf"):
        reason = f"{what} has stopped"
    else:
        reason = f"{what} made no progress for {seconds:.0f}s"
    return 503, {"status": "stuck", "reason": reason}


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers one request: ``/metrics``, ``/health``, or 404."""

    server: MetricsServer  # type: ignore[assignment]
    server_version = "edge-agent"
    timeout = REQUEST_TIMEOUT

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            from prometheus_client.exposition import choose_encoder

            # The format the scraper asks for (OpenMetrics or text), as prometheus-client does.
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._answer(200, content_type, encoder(self.server.registry))
        elif path == "/health":
            code, body = health(self.server.agent)
            self._answer(code, "application/json", json.dumps(body).encode() + b"\n")
        else:
            text = f"not found: {path}; this endpoint serves /metrics and /health\n"
            self._answer(404, "text/plain; charset=utf-8", text.encode())

    def do_HEAD(self) -> None:
        self.do_GET()

    def _answer(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would flood the journal


class MetricsServer:
    """The metrics listener: one thread waits on every connection (a selector), and a
    connection gets one of :data:`WORKERS` threads only once its request has begun.

    An idle connection costs a file descriptor until :data:`IDLE_TIMEOUT`; at most
    :data:`MAX_CONNECTIONS` are held (past it the longest idle is closed); a request
    that takes more than :data:`REQUEST_TIMEOUT` to read and answer is cut off.
    """

    def __init__(self, agent: Any, registry: Any, host: str, port: int) -> None:
        self.agent = agent
        self.registry = registry
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.socket, selectors.EVENT_READ)
        self._idle: dict[socket.socket, float] = {}  # waiting for a request: since when
        self._busy: dict[socket.socket, float] = {}  # handed to a worker: its deadline
        self._lock = threading.Lock()
        self._workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="metrics")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, _mask in self._selector.select(0.25):
                if key.fileobj is self.socket:
                    self._accept()
                else:
                    self._dispatch(key.fileobj)  # type: ignore[arg-type]
            self._expire()

    def _accept(self) -> None:
        try:
            conn, _address = self.socket.accept()
        except OSError:
            return
        with self._lock:
            held = len(self._idle) + len(self._busy)
        if held >= MAX_CONNECTIONS and self._idle:
            self._close_idle(min(self._idle, key=self._idle.__getitem__))
        elif held >= MAX_CONNECTIONS:
            conn.close()  # every slot is answering a request: come back later
            return
        conn.setblocking(False)
        self._idle[conn] = time.monotonic()
        self._selector.register(conn, selectors.EVENT_READ)

    def _dispatch(self, conn: socket.socket) -> None:
        self._selector.unregister(conn)
        del self._idle[conn]
        conn.setblocking(True)
        with self._lock:
            self._busy[conn] = float("inf")  # its time starts when a worker takes it
        self._workers.submit(self._handle, conn)

    def _handle(self, conn: socket.socket) -> None:
        with self._lock:
            self._busy[conn] = time.monotonic() + REQUEST_TIMEOUT
        try:
            _Handler(conn, conn.getpeername(), self)  # type: ignore[arg-type]
        except Exception as exc:  # a broken client must not end the worker
            log.debug("metrics request failed: %s", exc)
        finally:
            with self._lock:
                self._busy.pop(conn, None)
            with contextlib.suppress(OSError):
                conn.close()

    def _close_idle(self, conn: socket.socket) -> None:
        self._selector.unregister(conn)
        del self._idle[conn]
        conn.close()

    def _expire(self) -> None:
        now = time.monotonic()
        for conn, since in list(self._idle.items()):
            if now - since > IDLE_TIMEOUT:
                self._close_idle(conn)
        with self._lock:
            late = [conn for conn, deadline in self._busy.items() if now > deadline]
        for conn in late:  # the worker's read or write ends at once; it closes the socket
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def connections(self) -> tuple[int, int]:
        """(idle, busy) connections held now."""
        with self._lock:
            return len(self._idle), len(self._busy)

    def shutdown(self) -> None:
        """Stop listening and close every connection."""
        self._stop.set()
        self._thread.join(5.0)
        for conn in list(self._idle):
            self._close_idle(conn)
        self._selector.close()
        self.socket.close()
        self._workers.shutdown(wait=False, cancel_futures=True)


def serve(agent: Any, listen: str) -> MetricsServer:
    """Start the endpoint on ``host:port``; returns the server (``shutdown()`` stops it)."""
    from prometheus_client import ProcessCollector
    from prometheus_client.core import CollectorRegistry

    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, _resident_memory_bytes...
    server = MetricsServer(agent, registry, host.strip("[]"), int(port))
    log.info("serving Prometheus metrics on http://%s/metrics (health: /health)", listen)
    return server
