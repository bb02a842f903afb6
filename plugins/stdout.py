"""The ``stdout`` sink: events as JSON lines on standard output, for trying things out."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from edge_agent import QueuedEvent, Sink, hookimpl, option


class StdoutSink(Sink):
    """Writes each event as one CloudEvents JSON line and confirms it once flushed."""

    @dataclass(kw_only=True)
    class Config:
        payload: Literal["cloudevent", "data"] = option(
            "cloudevent", doc='"cloudevent" for the whole envelope, "data" for the data only.'
        )

    max_batch = 500

    @property
    def target(self) -> str:
        return "stdout"

    def publish(self, events: list[QueuedEvent]) -> list[QueuedEvent]:
        data_only = self.config.payload == "data"
        lines = [e.data_json if data_only else e.to_cloudevent_json() for e in events]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        return events


@hookimpl
def register_sinks(register):
    register("stdout", StdoutSink)
