"""The ``status`` source: the agent's own health, as an event every ``interval``.

Like Telegraf's ``internal`` input or Fluent Bit's ``fluentbit_metrics``: the
counters ``edge-agent status`` shows (queue depth and age, each sink's state,
backlog, errors and publish latency, each source's events and errors) travel
as ``agent.status`` events through the queue to every sink, so a fleet can be
watched from the broker. With the MQTT sink's default topic template they
land on ``edge/{agent}/status/agent.status``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from edge_agent import Duration, Source, hookimpl, option

#: Keys of the snapshot left out of the event: they say nothing a fleet needs.
LEFT_OUT = ("pid", "interval")


class StatusSource(Source):
    """Emits ``agent.status`` every ``interval`` (and once at start with ``at_start``)."""

    @dataclass(kw_only=True)
    class Config:
        interval: Duration = option(60.0, min=1, doc="Time between two status events.")
        at_start: bool = option(True, doc="Send one at start, not only after the first interval.")

    def run(self) -> None:
        failing_since: float | None = None
        if not self.config.at_start:
            self.stopping.wait(self.config.interval)
        while not self.stopping.is_set():
            # A status that cannot be made or queued now (a full disk, a busy
            # database) is skipped: the next one says the same, newer.
            try:
                self.emit_many([self.event("agent.status", self.status_data())])
            except Exception as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    self.log.warning(
                        "could not queue the status event: %s; skipping status events"
                        " until it works again",
                        exc,
                    )
            else:
                if failing_since is not None:
                    self.log.info(
                        "status events are queued again, after %.0fs without",
                        time.monotonic() - failing_since,
                    )
                    failing_since = None
            self.stopping.wait(self.config.interval)

    def status_data(self) -> dict[str, Any]:
        data = self.agent_status()
        for key in LEFT_OUT:
            data.pop(key, None)
        data.get("queue", {}).pop("path", None)  # a local path says nothing to the fleet
        return data


@hookimpl
def register_sources(register):
    register("status", StatusSource)
