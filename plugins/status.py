"""The ``status`` source: the agent's own health, as an event every ``interval``.

Like Telegraf's ``internal`` input or Fluent Bit's ``fluentbit_metrics``: the
counters ``edge-agent status`` shows (queue depth and age, each sink's state,
backlog, errors and publish latency, each source's events and errors) travel
as ``agent.status`` events through the queue to every sink, so a fleet can be
watched from the broker. With the MQTT sink's default topic template they
land on ``edge/{agent}/status/agent.status``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent import Duration, Source, hookimpl, option

#: Keys of the snapshot left out of the event: they say nothing a fleet needs.
LEFT_OUT = ("pid", "interval")


class StatusSource(Source):
    """Emits ``agent.status`` every ``interval`` (and once at start with ``at_start``)."""

    @dataclass(kw_only=True)
    class Config:
        interval: Duration = option(60.0, doc="Time between two status events.")
        at_start: bool = option(True, doc="Send one at start, not only after the first interval.")

        def __post_init__(self) -> None:
            if self.interval < 1:
                raise ValueError(f"interval must be at least 1s, got {self.interval:g}s")

    def run(self) -> None:
        if not self.config.at_start:
            self.stopping.wait(self.config.interval)
        while not self.stopping.is_set():
            events = [self.event("agent.status", self.status_data())]
            # A status that cannot be queued now (a full disk) is simply skipped:
            # the next one says the same, newer.
            try:
                self.emit_many(events)
            except Exception as exc:
                self.log.warning("could not queue the status event: %s; skipping this one", exc)
            self.stopping.wait(self.config.interval)

    def status_data(self) -> dict[str, Any]:
        data = self.agent_status()
        for key in LEFT_OUT:
            data.pop(key, None)
        return data


@hookimpl
def register_sources(register):
    register("status", StatusSource)
