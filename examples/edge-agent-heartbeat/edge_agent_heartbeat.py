"""An edge-agent plugin: a ``heartbeat`` source and a ``jsonl`` file sink.

The heartbeat source emits ``heartbeat.beat`` every ``interval`` with the
agent's uptime; the jsonl sink appends each event as one JSON line to a file
and confirms it once the line is fsynced.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from edge_agent import Duration, QueuedEvent, Sink, Source, hookimpl, option


class Heartbeat(Source):
    """Emits ``heartbeat.beat`` every ``interval``: proof of life for the device."""

    @dataclass(kw_only=True)
    class Config:
        interval: Duration = option(10.0, doc='Time between beats, e.g. "30s".')
        message: str = option("alive", doc="Text carried in each beat.")

    def run(self) -> None:
        started = time.monotonic()
        beats = 0
        while not self.stopping.wait(self.config.interval):
            beats += 1
            self.emit(
                "heartbeat.beat",
                {
                    "message": self.config.message,
                    "beat": beats,
                    "uptime": round(time.monotonic() - started, 3),
                },
            )


class JsonLines(Sink):
    """Appends events as JSON lines to a file; an event is confirmed once fsynced."""

    @dataclass(kw_only=True)
    class Config:
        path: str = option(doc="The file to append to; created if missing.")

    max_batch = 500

    @property
    def target(self) -> str:
        return self.config.path

    def open(self) -> None:
        self.handle = open(self.config.path, "a", encoding="utf-8")  # noqa: SIM115

    def publish(self, events: list[QueuedEvent]) -> list[QueuedEvent]:
        self.handle.write("".join(event.to_cloudevent_json() + "\n" for event in events))
        self.handle.flush()
        os.fsync(self.handle.fileno())
        return events

    def close(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None:
            handle.close()


@hookimpl
def register_sources(register):
    register("heartbeat", Heartbeat)


@hookimpl
def register_sinks(register):
    register("jsonl", JsonLines)
