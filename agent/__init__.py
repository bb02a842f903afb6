"""edge-agent: capture local events, commit them to a SQLite queue, forward them.

What a plugin author imports::

    from edge_agent import Source, Sink, Processor, Event, QueuedEvent, hookimpl
    from edge_agent import option, Duration, ByteSize, OptionError
"""

from edge_agent.api import Processor, Rejection, Sink, Source, SourceContext
from edge_agent.errors import SinkUnavailable
from edge_agent.event import Event, QueuedEvent
from edge_agent.hookspecs import hookimpl
from edge_agent.schema import ByteSize, Duration, OptionError, option

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
