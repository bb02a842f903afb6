"""The ``file`` source: files created, changed, closed, deleted or moved in folders.

Uses watchdog (inotify on Linux). Events are collected by watchdog's thread
and committed in batches by the source's own thread, so a burst of new files
costs one transaction, not one per file.

With ``catch_up`` (the default) the source keeps an index of what it reported
in the queue database (see :mod:`edge_agent.plugins.file_scan`), and scans against it at
start, after the kernel dropped events (an inotify queue overflow) and when a
watched folder comes back: what changed meanwhile is reported with
``"scan": true``.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from stat import S_ISLNK
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from edge_agent import Duration, Event, Source, hookimpl, option
from edge_agent.backoff import Backoff
from edge_agent.errors import QueueError
from edge_agent.plugins.file_scan import (
    EVENTS_PER_COMMIT,
    SETTLE_SECONDS,
    Scan,
    ScanResult,
    baseline_key,
    entry_value,
    index_key,
    scan_event,
)

if TYPE_CHECKING:
    # watchdog is imported when a file source runs (plugins.file_watch), so that
    # `edge-agent check` and `edge-agent plugins` start without it.
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer
    from watchdog.observers.api import ObservedWatch

EventKind = Literal["created", "modified", "closed", "deleted", "moved"]
BATCH_MAX = 500
#: At most one overflow warning per this many seconds (the others are counted in it).
OVERFLOW_LOG_INTERVAL = 60.0
#: How many names that are not UTF-8 the source remembers having warned about.
NOT_UTF8_REMEMBERED = 10_000
#: After an overflow, rescan once none came for this many seconds...
OVERFLOW_QUIET = 1.0
#: ... or this long after the first one, if they keep coming.
OVERFLOW_WAIT_MAX = 30.0
_WAKE = object()  # put in the hand-off to wake the source's thread
T = TypeVar("T")


def _safe_path(path: str) -> tuple[str, str | None]:
    """The path as valid UTF-8 text, and the raw name as base64 when it was not UTF-8."""
    try:
        path.encode("utf-8")
        return path, None
    except UnicodeEncodeError:
        raw = os.fsencode(path)
        return raw.decode("utf-8", "replace"), base64.b64encode(raw).decode("ascii")


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _OverflowListener(logging.Handler):
    """Tells file sources that the kernel's inotify queue overflowed (events were lost).

    watchdog does not call event handlers on IN_Q_OVERFLOW: 7.x logs "Inotify
    queue overflowed ..." on its own logger, from the thread that reads the
    inotify descriptor, and rebuilds its watches. Its log is therefore the
    signal, recognised by that text (case-insensitive "queue overflow"), which
    does not depend on watchdog's internal classes. Which source it concerns is
    told by the thread that logged it: each source notes the threads its
    observer started (see :func:`_threads_started_by`). A record from a thread
    no source owns goes to every file source, since a needless rescan costs
    time and a missed one loses events.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._lock = threading.Lock()
        self._sources: dict[FileSource, set[int]] = {}
        self._installed = False

    def register(self, source: FileSource, threads: set[int]) -> None:
        with self._lock:
            self._sources.setdefault(source, set()).update(threads)
            if not self._installed:
                logging.getLogger("watchdog").addHandler(self)
                self._installed = True
                from watchdog.version import VERSION_INFO as WATCHDOG_VERSION

                if WATCHDOG_VERSION < (7, 1):
                    source.log.warning(
                        "watchdog %s does not say when the kernel's inotify queue overflowed:"
                        " events lost in a burst go unnoticed until the next start."
                        " Install watchdog 7.1 or later (pip install 'watchdog>=7.1')",
                        ".".join(map(str, WATCHDOG_VERSION)),
                    )

    def unregister(self, source: FileSource) -> None:
        with self._lock:
            self._sources.pop(source, None)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if "queue overflow" not in record.getMessage().lower():
                return
            with self._lock:
                owners = [s for s, threads in self._sources.items() if record.thread in threads]
                targets = owners or list(self._sources)
            for source in targets:
                source.overflowed(record.created)
        except Exception:  # a logging handler must never raise into watchdog's thread
            self.handleError(record)


_OVERFLOWS = _OverflowListener()
_THREADS_LOCK = threading.Lock()


def _threads_started_by(action: Callable[[], T]) -> tuple[T, set[int]]:
    """Run ``action``; return its result and the ids of the threads it started.

    File sources take turns (a lock), so one source's new threads are not
    taken for another's.
    """
    with _THREADS_LOCK:
        before = {thread.ident for thread in threading.enumerate()}
        result = action()
        after = {thread.ident for thread in threading.enumerate()}
    return result, {ident for ident in after - before if ident is not None}


class FileSource(Source):
    """Emits ``file.created|modified|closed|deleted|moved`` for files under ``paths``."""

    announces_listening = True

    @dataclass(kw_only=True)
    class Config:
        paths: list[str] = option(
            doc="Folders (or single files) to watch.", example=["/var/spool/inbox"]
        )
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
            10.0, above=0, doc="How often to look again for a watched path that does not exist yet."
        )
        catch_up: bool = option(
            True,
            doc="Keep an index of the files reported, and report what changed while the agent"
            " was not running or events were lost (a scan). false: no index (for folders too"
            " big to index); a loss is then reported as a file.gap event.",
        )

        def __post_init__(self) -> None:
            if not self.paths:
                raise ValueError("paths is empty: give at least one folder or file to watch")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pending: queue.Queue = queue.Queue(maxsize=10_000)
        self._unsent: tuple[list[Event], dict[str, str | None]] | None = None
        self._retry = Backoff(0.5, 30.0)
        # Events name absolute paths, whatever the working directory was.
        self.paths = [os.path.abspath(p) for p in self.config.paths]
        #: Files found by a scan, waiting for their mtime to settle before file.closed.
        self.unsettled: dict[str, tuple[str, str]] = {}  # path: (index key, value)
        #: When the source last received an event from watchdog (for file.gap's "from").
        self.last_event_at = time.time()
        self._wake = threading.Event()
        self._lost: set[str] = set()
        self._overflow = threading.Event()
        self._overflow_at = 0.0
        self._gap_from = 0.0
        self._overflows_unlogged = 0
        self._overflow_logged = -OVERFLOW_LOG_INTERVAL
        self._loss_first: float | None = None  # monotonic: first overflow not yet recovered
        self._loss_due: float | None = None  # monotonic: when to recover
        self._loss_from = self._loss_to = 0.0  # wall clock: the loss's window
        #: Names not valid UTF-8 already warned about.
        self._named_not_utf8: set[str] = set()

    def wanted(self, path: str, root: str) -> bool:
        """True if ``path`` passes the include and exclude patterns."""
        if not self.config.include and not self.config.exclude:
            return True
        name = os.path.basename(path)
        if path.startswith(root + os.sep):
            relative = path[len(root) + 1 :]
        else:
            relative = os.path.relpath(path, root) if root != path else name

        def matches(patterns: list[str]) -> bool:
            return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(relative, p) for p in patterns)

        if self.config.include and not matches(self.config.include):
            return False
        return not (self.config.exclude and matches(self.config.exclude))

    # -- signals from watchdog's threads ---------------------------------------------

    def wake(self) -> None:
        """Make the source look at its paths now (a watched root went or came back)."""
        self._wake.set()
        # If the hand-off is full, the source is busy with events and sees the flag soon.
        with contextlib.suppress(queue.Full):
            self.pending.put_nowait(_WAKE)

    def root_lost(self, root: str) -> None:
        """A watched root was deleted: its watch is gone, even if it is made again at once."""
        self._lost.add(root)
        self.wake()

    def overflowed(self, at: float) -> None:
        """The kernel dropped events of this source's watches (see _OverflowListener)."""
        if not self._overflow.is_set():
            self._gap_from = min(self.last_event_at, at)
        self._overflow_at = at
        self._overflow.set()
        self.wake()

    # -- the source's thread ----------------------------------------------------------

    def run(self) -> None:
        observer, threads = _threads_started_by(self._start_observer)
        _OVERFLOWS.register(self, threads)
        watches: dict[str, ObservedWatch] = {}
        parents: dict[str, ObservedWatch] = {}
        problems: dict[str, str] = {}
        first = True
        try:
            next_check = 0.0
            while not self.stopping.is_set():
                # A watched folder deleted right after it was watched again can go
                # without an event: one stat a second per watched path notices it.
                gone = any(not os.path.exists(path) for path in watches)
                if gone or self._wake.is_set() or time.monotonic() >= next_check:
                    self._wake.clear()
                    back = self._check_paths(observer, watches, parents, problems)
                    self.listening()
                    if first:
                        first = False
                        if self.config.catch_up:
                            self._scan(list(watches), "start")
                    elif back:
                        self._scan(back, "back")
                    next_check = time.monotonic() + self.config.retry_missing
                if self._overflow.is_set():
                    self._noticed_overflow(list(watches))
                if self._loss_due is not None and time.monotonic() >= self._loss_due:
                    self._recover(list(watches))
                if self.unsettled:
                    self._check_unsettled()
                wait = 0.5 if self.unsettled or self._loss_due else 1.0
                self._emit_pending(timeout=min(wait, self.config.retry_missing))
            self._emit_pending(timeout=0)  # commit what was collected before stopping
        finally:
            _OVERFLOWS.unregister(self)
            observer.stop()
            observer.join(5.0)

    @staticmethod
    def _start_observer() -> Observer:
        from watchdog.observers import Observer

        observer = Observer()
        observer.daemon = True
        observer.start()
        return observer

    def _check_paths(
        self,
        observer: Observer,
        watches: dict[str, ObservedWatch],
        parents: dict[str, ObservedWatch],
        problems: dict[str, str],
    ) -> list[str]:
        """Start watching paths that appeared; notice watched paths that went away.

        Returns the paths watched again after they had gone or could not be
        watched. Once ``schedule`` returns, every folder below a recursive
        watch is watched (watchdog walks the tree before returning).
        """
        from edge_agent.plugins import file_watch

        back = []
        for path in self.paths:
            watch = watches.get(path)
            if watch is not None:
                if os.path.exists(path) and path not in self._lost:
                    continue
                observer.unschedule(watch)
                del watches[path]
                problems.setdefault(path, "deleted")
            self._lost.discard(path)
            reason = self._unwatchable(path)
            if reason is None:
                try:
                    watches[path] = self._schedule(
                        observer,
                        file_watch.Collector(self, path),
                        path,
                        event_filter=file_watch.event_filter(self.config),
                    )
                except OSError as exc:
                    reason = exc.strerror or str(exc)
            if reason is None:
                parent = parents.pop(path, None)
                if parent is not None:
                    observer.unschedule(parent)
                if path in problems:
                    self.log.info("watching %s now (it was: %s)", path, problems.pop(path))
                    back.append(path)
                else:
                    below = " and its subfolders" if self.config.recursive else ""
                    self.log.info("watching %s%s", path, below)
                continue
            if path not in parents:
                self._watch_parent(observer, path, parents)
            if problems.get(path) != reason:
                problems[path] = reason
                self.log.warning(
                    "cannot watch %s: %s; watching for it to come back (and looking again every"
                    " %gs), the other paths are watched",
                    path,
                    reason,
                    self.config.retry_missing,
                )
        return back

    def _schedule(
        self,
        observer: Observer,
        handler: FileSystemEventHandler,
        path: str,
        recursive: bool | None = None,
        event_filter: list[type[FileSystemEvent]] | None = None,
    ) -> ObservedWatch:
        if recursive is None:
            recursive = self.config.recursive
        watch, threads = _threads_started_by(
            lambda: observer.schedule(handler, path, recursive=recursive, event_filter=event_filter)
        )
        _OVERFLOWS.register(self, threads)
        return watch

    def _watch_parent(
        self, observer: Observer, root: str, parents: dict[str, ObservedWatch]
    ) -> None:
        """Watch the nearest existing folder above ``root``, so its return is seen at once."""
        from edge_agent.plugins import file_watch

        parent = os.path.dirname(root)
        while parent != os.path.dirname(parent) and not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        try:
            parents[root] = self._schedule(
                observer, file_watch.ParentWatch(self, root), parent, recursive=False
            )
        except OSError as exc:
            self.log.info("cannot watch %s for %s to come back: %s", parent, root, exc.strerror)
        if os.path.exists(root):
            self.wake()  # it came back before the watch on its parent was set

    @staticmethod
    def _unwatchable(path: str) -> str | None:
        if not os.path.exists(path):
            return "no such file or folder"
        if not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)):
            return "permission denied (the agent's user cannot read it)"
        return None

    # -- catch-up ---------------------------------------------------------------------

    def _scan(self, roots: list[str], why: str) -> ScanResult | None:
        """Report what changed under ``roots`` since the index (or, without catch_up, every
        file in a root that came back: all of it is new)."""
        if not roots:
            return None
        catch_up = self.config.catch_up
        baselined = {r for r in roots if catch_up and self._has_baseline(r)}
        silent = why == "start"
        result = ScanResult()
        started = time.monotonic()
        # A root's first scan at start is a silent baseline; a root seen again
        # (or after an overflow) is compared, and what it holds reported.
        for group, quiet in ((sorted(baselined), False), (sorted(set(roots) - baselined), silent)):
            if not group:
                continue
            scan = Scan(
                self,
                silent=quiet,
                use_index=catch_up,
                between_folders=lambda: self._emit_pending(timeout=0),
            )
            if not scan.run(group):
                return None
            if catch_up and not all(r in baselined for r in group):
                self.commit_retrying([], {baseline_key(r): "1" for r in group})
            for name in ("files", "folders", "created", "changed", "deleted", "moved"):
                setattr(result, name, getattr(result, name) + getattr(scan.result, name))
            result.unreadable += scan.result.unreadable
        took = time.monotonic() - started
        what = {"start": "at start", "back": "after it came back", "overflow": "after lost events"}
        if silent and not baselined:
            self.log.info(
                "indexed %d files in %d folders under %s in %.1fs (a first baseline: nothing"
                " reported for files already there)",
                result.files,
                result.folders,
                ", ".join(roots),
                took,
            )
        else:
            self.log.info(
                "scanned %s %s in %.1fs: %d files; reported %d created, %d changed, %d deleted,"
                " %d moved",
                ", ".join(roots),
                what[why],
                took,
                result.files,
                result.created,
                result.changed,
                result.deleted,
                result.moved,
            )
        for problem in result.unreadable:
            self.log.warning("cannot scan %s; changes there are reported only live", problem)
        return result

    def _has_baseline(self, root: str) -> bool:
        key = baseline_key(root)
        return any(k == key for k, _ in self.checkpoint_range(key))

    def _noticed_overflow(self, roots: list[str]) -> None:
        """Count and log an overflow; recover once they stop (see OVERFLOW_QUIET)."""
        self._overflow.clear()
        self.count("overflows")
        self._overflows_unlogged += 1
        now = time.monotonic()
        if now - self._overflow_logged >= OVERFLOW_LOG_INTERVAL:
            self.log.warning(
                "the kernel's inotify queue overflowed %d time(s) watching %s: file events were"
                " lost; %s. A larger fs.inotify.max_queued_events (sysctl) makes it rarer",
                self._overflows_unlogged,
                ", ".join(roots),
                "rescanning to report them" if self.config.catch_up else "reported as file.gap",
            )
            self._overflow_logged = now
            self._overflows_unlogged = 0
        if self._loss_first is None:
            self._loss_first = now
            self._loss_from = self._gap_from
        self._loss_to = self._overflow_at
        # In a burst the queue overflows again and again: one scan once it is over
        # finds everything, where a scan after each overflow would be outdated at once.
        self._loss_due = min(self._loss_first + OVERFLOW_WAIT_MAX, now + OVERFLOW_QUIET)

    def _recover(self, roots: list[str]) -> None:
        """Rescan after overflows (or, without catch_up, report the loss as file.gap)."""
        self._loss_first = self._loss_due = None
        if self.config.catch_up:
            self._emit_pending(timeout=0)  # what arrived before the loss, first
            self._scan(roots, "overflow")
            return
        for root in roots:
            self.report_gap(
                "file.gap",
                {
                    "path": root,
                    "reason": "inotify queue overflowed",
                    "from": _rfc3339(self._loss_from),
                    "to": _rfc3339(self._loss_to),
                },
                subject=root,
            )

    def _check_unsettled(self) -> None:
        """Report file.closed for scanned files whose mtime has settled and not changed."""
        now = time.time()
        events = []
        updates: dict[str, str | None] = {}
        for path, (key, value) in list(self.unsettled.items()):
            if now - int(value.rsplit(" ", 1)[1]) / 1e9 < SETTLE_SECONDS:
                continue
            del self.unsettled[path]
            try:
                current = entry_value(os.lstat(path))
            except OSError:
                continue
            if current == value:  # else it is being written: its close is seen live
                events.append(scan_event(self, "file.closed", path, value))
                if self.config.catch_up:
                    updates[key] = value
        self.commit_retrying(events, updates)

    def commit_retrying(self, events: Sequence[Event], updates: Mapping[str, str | None]) -> bool:
        """Commit events and index updates, trying again while the queue cannot take them.

        Events go in transactions of at most EVENTS_PER_COMMIT (a scan that found
        tens of thousands of files never asks a nearly full disk for room for all
        of them at once), the index updates with the last. False if the source
        was told to stop first: the index was then not updated, and the next scan
        reports what was not committed (again, for events committed already).
        """
        if not events and not updates:
            return True
        size = EVENTS_PER_COMMIT
        parts = [events[start : start + size] for start in range(0, len(events), size)] or [[]]
        for number, part in enumerate(parts, start=1):
            last = number == len(parts)
            while True:
                if self.stopping.is_set():
                    return False
                try:
                    self.emit_many(part, checkpoint=(updates or None) if last else None)
                    self._retry.reset()
                    break
                except QueueError as exc:
                    delay = self._retry.next()
                    self.log.warning(
                        "could not commit %d file events: %s; trying again in %.1fs",
                        len(part),
                        exc,
                        delay,
                    )
                    self.stopping.wait(delay)
        return True

    # -- live events ------------------------------------------------------------------

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
            events: list[Event] = []
            updates: dict[str, str | None] = {}
            for item in batch:
                if item is not _WAKE:
                    events.append(self._to_event(item, updates))
            if not events:
                return
            self._unsent = (events, updates if self.config.catch_up else {})
        events, updates = self._unsent
        try:
            self.emit_many(events, checkpoint=updates or None)
        except QueueError as exc:
            delay = self._retry.next()
            self.log.warning(
                "could not commit %d file events: %s; trying again in %.1fs",
                len(events),
                exc,
                delay,
            )
            if timeout:
                self.stopping.wait(delay)
            return
        self._unsent = None
        self._retry.reset()

    def path_data(self, fs_path: str) -> dict[str, Any]:
        """``{"path": ...}`` for an event, with ``path_base64`` for a name that is not UTF-8."""
        path, raw = _safe_path(fs_path)
        data: dict[str, Any] = {"path": path}
        if raw is not None:
            data["path_base64"] = raw
            if fs_path not in self._named_not_utf8:  # once per name, not per event
                if len(self._named_not_utf8) >= NOT_UTF8_REMEMBERED:
                    self._named_not_utf8.clear()
                self._named_not_utf8.add(fs_path)
                self.log.warning(
                    "file name is not valid UTF-8: %s; its events are sent with replacement"
                    " characters, the raw name in data.path_base64 (said once for this name)",
                    path,
                )
        return data

    def _to_event(self, event: FileSystemEvent, updates: dict[str, str | None]) -> Event:
        """The event to report, and (in ``updates``) what it changes in the index."""
        kind = event.event_type
        moved = kind == "moved"
        fs_path = os.fsdecode(event.dest_path if moved else event.src_path)
        data = self.path_data(fs_path)
        if moved:
            src_path = os.fsdecode(event.src_path)
            src = self.path_data(src_path)
            data["src_path"] = src["path"]
            if "path_base64" in src:
                data["src_path_base64"] = src["path_base64"]
            if self.config.catch_up:
                updates[index_key(*os.path.split(src_path))] = None
        if event.is_directory:
            data["is_directory"] = True
        key = index_key(*os.path.split(fs_path)) if self.config.catch_up else ""
        if kind == "deleted":
            updates[key] = None
            return self.event(f"file.{kind}", data, subject=data["path"])
        try:
            st = os.lstat(fs_path)
            updates[key] = entry_value(st)
            if not event.is_directory:
                # The index keeps the link itself; the event tells the size of its target.
                data["size"] = os.stat(fs_path).st_size if S_ISLNK(st.st_mode) else st.st_size
        except FileNotFoundError:
            updates[key] = None
            self.log.info(
                "%s vanished before it could be read; reported without its size", data["path"]
            )
        except OSError as exc:
            self.log.warning(
                "cannot read %s: %s; reported without its size", data["path"], exc.strerror
            )
        return self.event(f"file.{kind}", data, subject=data["path"])


@hookimpl
def register_sources(register):
    register("file", FileSource)
