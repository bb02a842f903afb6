"""Built-in processors: drop, keep, enrich, rate_limit and dedupe.

They run in the order of their ``[[processors]]`` tables (``type = "drop"``) in
the configuration, between sources and the queue, in the emitting source's thread.
"""

from __future__ import annotations

import collections
import fnmatch
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from edge_agent import Duration, Event, Processor, hookimpl, option


def field_value(event: Event, path: str) -> Any:
    """``type``, ``source``, ``subject``, ``id``, ``time`` or ``data.a.b``; None if absent."""
    if path in ("type", "source", "subject", "id", "time"):
        return getattr(event, path)
    if path == "data":
        return event.data
    if not path.startswith("data."):
        return None
    value: Any = event.data
    for part in path[len("data.") :].split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _field_ok(path: str) -> bool:
    return path in ("type", "source", "subject", "id", "time", "data") or (
        path.startswith("data.") and len(path) > len("data.")
    )


@dataclass(kw_only=True)
class MatchConfig:
    """What ``drop`` and ``keep`` look at. Every criterion given must match."""

    types: list[str] = option([], doc='Event types, globs allowed: ["file.*"].')
    sources: list[str] = option([], doc="Source instance names, globs allowed.")
    match: dict[str, str] = option(
        {},
        example={"data.path": "*.tmp"},
        doc='Field globs: { "data.path" = "*.tmp", subject = "/var/*" }.',
    )

    def __post_init__(self) -> None:
        if not (self.types or self.sources or self.match):
            raise ValueError("give at least one of types, sources or match")
        bad = [f for f in self.match if not _field_ok(f)]
        if bad:
            raise ValueError(
                f"match knows type, source, subject, id, time and data.FIELD; not {', '.join(bad)}"
            )

    def matches(self, event: Event) -> bool:
        if self.types and not any(fnmatch.fnmatchcase(event.type, p) for p in self.types):
            return False
        if self.sources and not any(fnmatch.fnmatchcase(event.source, p) for p in self.sources):
            return False
        for path, pattern in self.match.items():
            value = field_value(event, path)
            if value is None or not fnmatch.fnmatchcase(str(value), pattern):
                return False
        return True


class Drop(Processor):
    """Drops the events that match; lets the others through."""

    Config = MatchConfig

    def process(self, event: Event) -> Event | None:
        return None if self.config.matches(event) else event


class Keep(Processor):
    """Keeps only the events that match; drops the others."""

    Config = MatchConfig

    def process(self, event: Event) -> Event | None:
        return event if self.config.matches(event) else None


class Enrich(Processor):
    """Adds static fields (site, device tags) and optionally the host name to ``data``."""

    @dataclass(kw_only=True)
    class Config:
        fields: dict[str, Any] = option(
            {}, example={"site": "berlin"}, doc='Fields to add: { site = "berlin", rack = 4 }.'
        )
        hostname: str = option(
            "", doc='Add the host name under this key, e.g. "host". Empty: do not.'
        )
        overwrite: bool = option(False, doc="Replace a field the event already has.")
        types: list[str] = option([], doc="Only events of these types (globs). Empty: all.")

        def __post_init__(self) -> None:
            if not self.fields and not self.hostname:
                raise ValueError("give fields, hostname or both")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.additions = dict(self.config.fields)
        if self.config.hostname:
            self.additions[self.config.hostname] = socket.gethostname()

    def process(self, event: Event) -> Event | None:
        types = self.config.types
        if types and not any(fnmatch.fnmatchcase(event.type, p) for p in types):
            return event
        if event.data is None:
            event.data = {}
        if not isinstance(event.data, dict):
            event.data = {"value": event.data}
        for key, value in self.additions.items():
            if self.config.overwrite or key not in event.data:
                event.data[key] = value
        return event


class RateLimit(Processor):
    """Lets at most ``rate`` events a second through per source (a token bucket); drops the rest."""

    @dataclass(kw_only=True)
    class Config:
        rate: float = option(above=0, example=10.0, doc="Events per second allowed, per source.")
        burst: int = option(
            0, min=0, doc="Events allowed at once after a quiet spell. Default: rate."
        )
        sources: list[str] = option([], doc="Only these sources (globs). Empty: all.")
        types: list[str] = option([], doc="Only events of these types (globs). Empty: all.")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.capacity = float(self.config.burst or max(1.0, self.config.rate))
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def process(self, event: Event) -> Event | None:
        config = self.config
        if config.sources and not any(fnmatch.fnmatchcase(event.source, p) for p in config.sources):
            return event
        if config.types and not any(fnmatch.fnmatchcase(event.type, p) for p in config.types):
            return event
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(event.source, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * config.rate)
            if tokens < 1.0:
                self._buckets[event.source] = (tokens, now)
                return None
            self._buckets[event.source] = (tokens - 1.0, now)
        return event


class Dedupe(Processor):
    """Drops an event equal to one let through within ``window`` (by the chosen fields)."""

    @dataclass(kw_only=True)
    class Config:
        window: Duration = option(
            above=0, example="10s", doc='How long a seen event suppresses equal ones, e.g. "10s".'
        )
        fields: list[str] = option(
            ["source", "type", "subject", "data"],
            doc="What makes two events equal: type, source, subject or data.FIELD.",
        )
        max_keys: int = option(
            10000, min=1, doc="Most events remembered; the oldest are forgotten."
        )

        def __post_init__(self) -> None:
            bad = [f for f in self.fields if not _field_ok(f)]
            if bad:
                raise ValueError(
                    f"fields knows type, source, subject, data and data.FIELD; not {bad}"
                )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._lock = threading.Lock()

    def process(self, event: Event) -> Event | None:
        key = json.dumps(
            [field_value(event, f) for f in self.config.fields], sort_keys=True, default=str
        )
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen < self.config.window:
                return None
            self._seen[key] = now
            self._seen.move_to_end(key)
            while len(self._seen) > self.config.max_keys:
                self._seen.popitem(last=False)
        return event


@hookimpl
def register_processors(register):
    register("drop", Drop)
    register("keep", Keep)
    register("enrich", Enrich)
    register("rate_limit", RateLimit)
    register("dedupe", Dedupe)
