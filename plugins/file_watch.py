"""watchdog's side of the ``file`` and ``tail`` sources: the handlers that run in its thread.

Imported when one of those sources runs, so that ``edge-agent check`` and
``edge-agent plugins`` start without importing watchdog.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import TYPE_CHECKING

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

if TYPE_CHECKING:
    from edge_agent.plugins.file import FileSource

#: The watchdog events each reported kind comes from (the folder ones only with
#: ``directories``). A watch asks inotify for these alone: a file written, opened or
#: read costs nothing when nobody asked for it.
_WATCHDOG_EVENTS: dict[str, tuple[type[FileSystemEvent], ...]] = {
    "created": (FileCreatedEvent, DirCreatedEvent),
    "modified": (FileModifiedEvent, DirModifiedEvent),
    "closed": (FileClosedEvent,),
    "deleted": (FileDeletedEvent, DirDeletedEvent),
    "moved": (FileMovedEvent, DirMovedEvent),
}


def event_filter(config: FileSource.Config) -> list[type[FileSystemEvent]]:
    """The watchdog events to ask for: the configured kinds, and always deletions (a
    watched root that is deleted must be noticed)."""
    wanted = {*config.events, "deleted"}
    classes = [cls for kind in sorted(wanted) for cls in _WATCHDOG_EVENTS[kind]]
    if not config.directories:  # a folder's own events matter only for its deletion
        classes = [cls for cls in classes if not cls.is_directory or cls is DirDeletedEvent]
    return classes


class Collector(FileSystemEventHandler):
    """Runs in watchdog's thread: filter, then hand over to the source's thread."""

    def __init__(self, source: FileSource, root: str) -> None:
        self.source = source
        self.root = root

    def on_any_event(self, event: FileSystemEvent) -> None:
        source = self.source
        source.last_event_at = time.time()
        if event.event_type == "deleted" and os.fsdecode(event.src_path) == self.root:
            source.root_lost(self.root)
        if event.event_type not in source.config.events:
            return
        if event.is_directory and not source.config.directories:
            return
        path = os.fsdecode(event.dest_path if event.event_type == "moved" else event.src_path)
        if not source.wanted(path, self.root):
            return
        while not source.stopping.is_set():
            try:
                source.pending.put(event, timeout=0.5)
                return
            except queue.Full:
                continue  # backpressure: watchdog waits while the queue catches up


class ParentWatch(FileSystemEventHandler):
    """Watches the nearest existing parent of a missing root, to notice it coming back."""

    def __init__(self, source: FileSource, root: str) -> None:
        self.source = source
        self.root = root

    def on_any_event(self, event: FileSystemEvent) -> None:
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            path = os.fsdecode(raw)
            if path and (path == self.root or self.root.startswith(path + os.sep)):
                self.source.wake()
                return


class Wake(FileSystemEventHandler):
    """Sets ``event`` on anything that happens in the watched folder (the tail source)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.event.set()
