"""edge-agent: capture local events, commit them to a SQLite queue, forward them.

What a plugin author imports::

    from agent import Source, Sink, Processor, Event, QueuedEvent, hookimpl
    from agent import option, Duration, ByteSize, OptionError
"""

from agent.api import Processor, Rejection, Sink, Source, SourceContext
from agent.errors import SinkUnavailable
from agent.event import Event, QueuedEvent
from agent.hookspecs import hookimpl
from agent.schema import ByteSize, Duration, OptionError, option

__version__ = "0.1.0"

__all__ = [
    "ByteSize",
    "Duration",
    "Event",
    "OptionError",
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
