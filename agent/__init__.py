"""edge-agent: capture local events, commit them to a SQLite queue, forward them.

What a plugin author imports::

    from agent import Source, Sink, Event, QueuedEvent, hookimpl, option, Duration, ByteSize
"""

from agent.api import Sink, Source
from agent.errors import SinkUnavailable
from agent.event import Event, QueuedEvent
from agent.hookspecs import hookimpl
from agent.schema import ByteSize, Duration, option

__version__ = "0.1.0"

__all__ = [
    "ByteSize",
    "Duration",
    "Event",
    "QueuedEvent",
    "Sink",
    "SinkUnavailable",
    "Source",
    "__version__",
    "hookimpl",
    "option",
]
