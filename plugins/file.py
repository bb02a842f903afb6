"""The ``file`` source: files created, changed, closed, deleted or moved in folders.

Uses watchdog (inotify on Linux). Events are collected by watchdog's thread
and committed in batches by the source's own thread, so a burst of new files
costs one transaction, not one per file.
"""

from __future__ import annotations

import base64
import fnmatch
import os
import queue
import time
from dataclasses import dataclass
from typing import Literal

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

from agent import Duration, Event, Source, hookimpl, option
from agent.backoff import Backoff
from agent.errors import QueueError

EventKind = Literal["created", "modified", "closed", "deleted", "moved"]
BATCH_MAX = 500


def _safe_path(path: str) -> tuple[str, str | None]:
    """The path as valid UTF-8 text, and the raw name as base64 when it was not UTF-8."""
    try:
        path.encode("utf-8")
        return path, None
    except UnicodeEncodeError:
        raw = os.fsencode(path)
        return raw.decode("utf-8", "replace"), base64.b64encode(raw).decode("ascii")


class _Collector(FileSystemEventHandler):
    """Runs in watchdog's thread: filter, then hand over to the source's thread."""

    def __init__(self, source: FileSource, root: str) -> None:
        self.source = source
        self.root = root

    def on_any_event(self, event: FileSystemEvent) -> None:
        source = self.source
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


class FileSource(Source):
    """Emits ``file.created|modified|closed|deleted|moved`` for files under ``paths``."""

    announces_listening = True

    @dataclass(kw_only=True)
    class Config:
        paths: list[str] = option(doc="Folders (or single files) to watch.")
        recursive: bool = option(True, doc="Watch sub-folders too.")
        include: list[str] = option(
            [],
            doc='Glob patterns a file name or relative path must match, e.g. ["*.csv"].'
            " Empty: every file.",
        )
        exclude: list[str] = option(
            [], doc='Glob patterns to ignore, e.g. [".*", "*.tmp"]. Checked after include.'
        )
        events: list[EventKind] = option(
            ["created", "closed", "deleted", "moved"],
            doc='Which changes to report. "modified" fires on every write, so it is off by'
            ' default; "closed" tells that a writer finished a file.',
        )
        directories: bool = option(False, doc="Report folders being created, deleted or moved too.")
        retry_missing: Duration = option(
            10.0, doc="How often to look again for a watched path that does not exist yet."
        )

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pending: queue.Queue = queue.Queue(maxsize=10_000)
        self._unsent: list[Event] | None = None
        self._retry = Backoff(0.5, 30.0)
        # Events name absolute paths, whatever the working directory was.
        self.paths = [os.path.abspath(p) for p in self.config.paths]

    def wanted(self, path: str, root: str) -> bool:
        """True if ``path`` passes the include and exclude patterns."""
        name = os.path.basename(path)
        relative = os.path.relpath(path, root) if root != path else name

        def matches(patterns: list[str]) -> bool:
            return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(relative, p) for p in patterns)

        if self.config.include and not matches(self.config.include):
            return False
        return not (self.config.exclude and matches(self.config.exclude))

    def run(self) -> None:
        observer = Observer()
        observer.daemon = True
        watches: dict[str, ObservedWatch] = {}
        problems: dict[str, str] = {}
        observer.start()
        try:
            next_check = 0.0
            while not self.stopping.is_set():
                if time.monotonic() >= next_check:
                    self._check_paths(observer, watches, problems)
                    self.listening()
                    next_check = time.monotonic() + self.config.retry_missing
                self._emit_pending(timeout=min(1.0, self.config.retry_missing))
            self._emit_pending(timeout=0)  # commit what was collected before stopping
        finally:
            observer.stop()
            observer.join(5.0)

    def _check_paths(
        self, observer: Observer, watches: dict[str, ObservedWatch], problems: dict[str, str]
    ) -> None:
        """Start watching paths that appeared; notice watched paths that went away."""
        for path in self.paths:
            watch = watches.get(path)
            if watch is not None:
                if os.path.exists(path):
                    continue
                observer.unschedule(watch)
                del watches[path]
            reason = self._unwatchable(path)
            if reason is None:
                try:
                    watches[path] = observer.schedule(
                        _Collector(self, path), path, recursive=self.config.recursive
                    )
                except OSError as exc:
                    reason = exc.strerror or str(exc)
            if reason is None:
                if path in problems:
                    self.log.info("watching %s now (it was: %s)", path, problems.pop(path))
                else:
                    below = " and its subfolders" if self.config.recursive else ""
                    self.log.info("watching %s%s", path, below)
                continue
            if problems.get(path) != reason:
                problems[path] = reason
                self.log.warning(
                    "cannot watch %s: %s; looking again every %gs, the other paths are watched",
                    path,
                    reason,
                    self.config.retry_missing,
                )

    @staticmethod
    def _unwatchable(path: str) -> str | None:
        if not os.path.exists(path):
            return "no such file or folder"
        if not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)):
            return "permission denied (the agent's user cannot read it)"
        return None

    def _emit_pending(self, timeout: float) -> None:
        """Commit what watchdog collected; on a queue failure keep it and try again later."""
        if self._unsent is None:
            try:
                first = self.pending.get(timeout=timeout) if timeout else self.pending.get_nowait()
            except queue.Empty:
                return
            batch = [first]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self.pending.get_nowait())
                except queue.Empty:
                    break
            self._unsent = [self._to_event(event) for event in batch]
        try:
            self.emit_many(self._unsent)
        except QueueError as exc:
            delay = self._retry.next()
            self.log.warning(
                "could not commit %d file events: %s; trying again in %.1fs",
                len(self._unsent),
                exc,
                delay,
            )
            if timeout:
                self.stopping.wait(delay)
            return
        self._unsent = None
        self._retry.reset()

    def _to_event(self, event: FileSystemEvent) -> Event:
        kind = event.event_type
        moved = kind == "moved"
        fs_path = os.fsdecode(event.dest_path if moved else event.src_path)
        path, raw = _safe_path(fs_path)
        data: dict = {"path": path}
        if raw is not None:
            data["path_base64"] = raw
            self.log.warning(
                "file name is not valid UTF-8: %s; sent with replacement characters, the raw"
                " name is in data.path_base64",
                path,
            )
        if moved:
            src, src_raw = _safe_path(os.fsdecode(event.src_path))
            data["src_path"] = src
            if src_raw is not None:
                data["src_path_base64"] = src_raw
        if event.is_directory:
            data["is_directory"] = True
        if kind != "deleted" and not event.is_directory:
            try:
                data["size"] = os.stat(fs_path).st_size
            except FileNotFoundError:
                self.log.info(
                    "%s vanished before it could be read; reported without its size", path
                )
            except OSError as exc:
                self.log.warning(
                    "cannot read %s: %s; reported without its size", path, exc.strerror
                )
        return self.event(f"file.{kind}", data, subject=path)


@hookimpl
def register_sources(register):
    register("file", FileSource)
