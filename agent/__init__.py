"""edge-agent: capture local events, commit them to a SQLite queue, forward them.

What a plugin author imports::

    from agent import Source, Sink, Processor, Event, QueuedEvent, hookimpl, option, Duration
"""

from agent.api import Processor, Rejection, Sink, Source, SourceContext
from agent.errors import SinkUnavailable
from agent.event import Event, QueuedEvent
from agent.hookspecs import hookimpl
from agent.schema import ByteSize, Duration, option

__version__ = "0.1.0"

__all__ = [
    "ByteSize",
    "Duration",
    "Event",
    "Processor",
    "QueuedEvent",
    "Rejection",
    "Sink",
    "SinkUnavailable",
    "Source",
    "SourceContext",
    "__version__",
    "hookimpl",
    "option",
]
