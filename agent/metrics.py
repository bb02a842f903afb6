"""The optional Prometheus endpoint: ``[metrics] listen = "127.0.0.1:9108"``.

Off unless configured; it then serves the text exposition format on that
address only. Values are read from the running agent at each scrape, from the
same data as ``edge-agent status``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

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

        from agent import status

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


def serve(agent: Any, listen: str) -> Any:
    """Start the endpoint on ``host:port``; returns the server (``shutdown()`` stops it)."""
    from prometheus_client import start_http_server
    from prometheus_client.core import CollectorRegistry

    host, _, port = listen.rpartition(":")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    log.info("serving Prometheus metrics on http://%s/metrics", listen)
    return server
