"""The few exception classes the agent raises on purpose.

Each carries a message written for an operator at a terminal: what happened,
where, and what to do. The command line turns them into one clear line and an
exit code; nothing else should need to catch them by type.
"""

from __future__ import annotations

from dataclasses import dataclass


class AgentError(Exception):
    """Base class of every error the agent raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a configuration file.

    ``key`` is the dotted key path inside the file (``sinks.mqtt[0].qos``), or
    empty for a problem with the file as a whole.
    """

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{where}: {self.message}"


class ConfigError(AgentError):
    """The configuration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class PluginError(AgentError):
    """A plugin could not be loaded or registered (a name clash, a bad class)."""


class QueueError(AgentError):
    """The on-disk queue cannot be opened or written."""


class TooManyAtOnce(QueueError):
    """More events in one commit than ``[queue] max_events`` lets the queue ever hold, with
    ``when_full = "block"``: none were accepted, and the same commit can never succeed."""


class QueueVanished(QueueError):
    """The queue file was deleted or replaced while the agent had it open."""


class QueueCorrupt(QueueError):
    """The queue file is damaged (not a database, or fails its integrity check)."""


class SinkUnavailable(AgentError):
    """A sink cannot deliver right now (no connection, refused, timed out).

    Sinks raise this from ``open()`` or ``publish()``; the forwarder keeps the
    events queued, logs the reason once and retries with backoff. ``busy=True``
    says the destination asked to be left alone for a while (MQTT 5 "server
    busy", "quota exceeded"): the forwarder then waits about ``retry_max``.
    """

    def __init__(self, message: str = "", *, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy
