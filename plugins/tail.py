"""The ``tail`` source: follow log files line by line, like ``tail -F``.

Each file's read position is committed in the same SQLite transaction as the
lines read up to it, so after a crash or a power cut reading resumes exactly
where the committed events end: no line lost, none repeated by the source.

Files are known by identity (device and inode), not by name, so rotation by
rename is followed: the old file is read to its end (for ``rotate_wait``
after it was renamed, in case a writer still appends), and the new file under
the old name is read from its start. A file truncated in place (copytruncate)
is read again from its start. inotify wakes the reader at once; a stat every
``poll_interval`` is the fallback.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from agent import ByteSize, Duration, Event, Source, hookimpl, option
from agent.errors import QueueError

READ_CHUNK = 256 * 1024
#: Checkpoint key saying this source has run before (files it meets later are new).
STARTED_KEY = "started"
WARN_EVERY = 60.0


@dataclass
class _Tailed:
    """One open file being followed."""

    path: str
    key: str  # "dev:ino"
    handle: object
    offset: int  # committed: everything before it is in the queue
    skipping: bool = False  # inside an over-long line, dropping until its end
    skipping_committed: bool = False
    at_eof: bool = False
    rotated_at: float | None = None
    partial: bytes = field(default=b"", repr=False)

    def checkpoint(self) -> str:
        return json.dumps({"path": self.path, "offset": self.offset, "skipping": self.skipping})


class _Wake(FileSystemEventHandler):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.event.set()


def _identity(stat: os.stat_result) -> str:
    return f"{stat.st_dev}:{stat.st_ino}"


class TailSource(Source):
    """Emits ``log.line`` for every line appended to the files under ``paths``."""

    announces_listening = True

    @dataclass(kw_only=True)
    class Config:
        paths: list[str] = option(doc='Files to follow; globs allowed ("/var/log/app/*.log").')
        start_at: Literal["beginning", "end"] = option(
            "end",
            doc='For files present the first time the source runs: "end" sends only new'
            ' lines, "beginning" sends what is there too. Files that appear later are always'
            " read from their start.",
        )
        encoding: str = option("utf-8", doc="Text encoding; invalid bytes become U+FFFD.")
        max_line_bytes: ByteSize = option(
            65536, doc="Longer lines are cut to this; the rest is dropped and counted."
        )
        poll_interval: Duration = option(
            1.0, doc="How often to look for new, rotated or grown files without a wake-up."
        )
        rotate_wait: Duration = option(
            5.0, doc="How long to keep reading a file after it was renamed or deleted."
        )

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        try:
            codecs.lookup(self.config.encoding)
        except LookupError:
            raise ValueError(
                f"source {self.name}: unknown encoding {self.config.encoding!r}"
            ) from None
        self._wake = threading.Event()
        self.dropped_bytes = 0
        self.truncated_lines = 0
        self._last_warning = 0.0
        self._reported_missing: set[str] = set()

    def stop(self) -> None:
        super().stop()
        self._wake.set()

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        observer = Observer()
        observer.daemon = True
        for folder in {os.path.dirname(os.path.abspath(p)) for p in self.config.paths}:
            if not glob.has_magic(folder) and os.path.isdir(folder):
                observer.schedule(_Wake(self._wake), folder, recursive=False)
        observer.start()
        tailed: dict[str, _Tailed] = {}
        try:
            first_run = STARTED_KEY not in self.checkpoints()
            self._resume(tailed)
            if first_run:
                self.save_checkpoint({STARTED_KEY: "1"})
            next_scan = 0.0
            while not self.stopping.is_set():
                now = time.monotonic()
                if now >= next_scan or self._wake.is_set():
                    self._wake.clear()
                    self._scan(tailed, start_at_end=first_run and self.config.start_at == "end")
                    first_run = False
                    self.listening()
                    next_scan = now + self.config.poll_interval
                busy = False
                for item in list(tailed.values()):
                    busy |= self._read(item)
                    self._retire_if_done(tailed, item)
                if not busy:
                    self._wake.wait(self.config.poll_interval)
        finally:
            observer.stop()
            for item in tailed.values():
                item.handle.close()

    def _resume(self, tailed: dict[str, _Tailed]) -> None:
        """Reopen the files of the committed checkpoints, by identity, at their offsets."""
        saved = {k: v for k, v in self.checkpoints().items() if k != STARTED_KEY}
        gone = {}
        for key, value in saved.items():
            state = json.loads(value)
            path = self._find(key, state["path"])
            if path is None:
                self.log.warning(
                    "%s (last read at byte %d) is gone; lines written after that are lost",
                    state["path"],
                    state["offset"],
                )
                gone[key] = None
                continue
            item = self._open(path, key, state["offset"])
            if item is not None:
                item.skipping = item.skipping_committed = state.get("skipping", False)
                if path != state["path"]:
                    item.rotated_at = time.monotonic()
                    self.log.info(
                        "%s was rotated to %s; reading the rest of it", state["path"], path
                    )
                    item.path = state["path"]
                tailed[key] = item
        if gone:
            self.save_checkpoint(gone)

    @staticmethod
    def _find(key: str, path: str) -> str | None:
        """Where the file ``key`` is now: its old name, or a sibling's after rotation."""
        candidates = [path]
        folder = os.path.dirname(path)
        with contextlib.suppress(OSError):
            candidates += [os.path.join(folder, n) for n in sorted(os.listdir(folder))]
        for candidate in candidates:
            try:
                if _identity(os.stat(candidate)) == key:
                    return candidate
            except OSError:
                continue
        return None

    def _open(self, path: str, key: str, offset: int) -> _Tailed | None:
        try:
            handle = open(path, "rb")  # noqa: SIM115 (kept open while followed)
        except OSError as exc:
            self.log.warning("cannot open %s: %s; trying again", path, exc.strerror)
            return None
        size = os.fstat(handle.fileno()).st_size
        if offset > size:
            self.log.info("%s is shorter than where reading stopped; reading from its start", path)
            offset = 0
        handle.seek(offset)
        return _Tailed(path=path, key=key, handle=handle, offset=offset)

    def _scan(self, tailed: dict[str, _Tailed], *, start_at_end: bool) -> None:
        """Pick up new files, notice renamed, deleted and truncated ones."""
        current: dict[str, str] = {}
        for pattern in self.config.paths:
            matches = glob.glob(pattern) if glob.has_magic(pattern) else [pattern]
            found = False
            for path in matches:
                path = os.path.abspath(path)
                try:
                    stat = os.stat(path)
                except OSError:
                    continue
                if not os.path.isfile(path):
                    continue
                found = True
                current[_identity(stat)] = path
            if not found and pattern not in self._reported_missing:
                self._reported_missing.add(pattern)
                self.log.warning("%s: no such file yet; following it once it appears", pattern)
            elif found:
                self._reported_missing.discard(pattern)
        for key, path in current.items():
            item = tailed.get(key)
            if item is None:
                stat_size = os.stat(path).st_size if start_at_end else 0
                item = self._open(path, key, stat_size)
                if item is not None:
                    tailed[key] = item
                    self.save_checkpoint({key: item.checkpoint()})
                continue
            if item.rotated_at is not None and item.path == path:
                item.rotated_at = None  # renamed back
            size = os.fstat(item.handle.fileno()).st_size
            if size < item.offset:
                self.log.info("%s was truncated; reading it again from the start", path)
                item.offset, item.partial, item.skipping = 0, b"", False
                item.handle.seek(0)
                self.save_checkpoint({key: item.checkpoint()})
        for key, item in tailed.items():
            if key not in current and item.rotated_at is None:
                item.rotated_at = time.monotonic()

    def _retire_if_done(self, tailed: dict[str, _Tailed], item: _Tailed) -> None:
        if item.rotated_at is None or not item.at_eof:
            return
        if time.monotonic() - item.rotated_at < self.config.rotate_wait:
            return
        if item.partial:  # the writer is gone: its last line will never end
            self._commit(
                item, [self._line_event(item, item.offset, item.partial)], len(item.partial)
            )
        item.handle.close()
        del tailed[item.key]
        self.save_checkpoint({item.key: None})

    # -- reading ----------------------------------------------------------------

    def _read(self, item: _Tailed) -> bool:
        """Read one chunk and commit its complete lines; True if there was data."""
        chunk = item.handle.read(READ_CHUNK)
        item.at_eof = not chunk
        if not chunk:
            return False
        data = item.partial + chunk
        events: list[Event] = []
        consumed = 0
        limit = self.config.max_line_bytes
        while True:
            end = data.find(b"\n", consumed)
            if item.skipping:
                if end < 0:
                    self.dropped_bytes += len(data) - consumed
                    consumed = len(data)
                    break
                self.dropped_bytes += end - consumed
                consumed = end + 1
                item.skipping = False
                continue
            if end < 0:
                if len(data) - consumed > limit:  # a line longer than allowed: cut it
                    events.append(
                        self._line_event(
                            item, item.offset + consumed, data[consumed : consumed + limit]
                        )
                    )
                    self.truncated_lines += 1
                    self.dropped_bytes += len(data) - consumed - limit
                    consumed = len(data)
                    item.skipping = True
                break
            line = data[consumed:end]
            if len(line) > limit:
                self.truncated_lines += 1
                self.dropped_bytes += len(line) - limit
                line = line[:limit]
            events.append(self._line_event(item, item.offset + consumed, line))
            consumed = end + 1
        item.partial = data[consumed:]
        if consumed:
            self._commit(item, events, consumed)
        if self.truncated_lines and time.monotonic() - self._last_warning >= WARN_EVERY:
            self._last_warning = time.monotonic()
            self.log.warning(
                "%d lines were longer than max_line_bytes (%d) and were cut; %d bytes dropped"
                " so far",
                self.truncated_lines,
                limit,
                self.dropped_bytes,
            )
        return True

    def _line_event(self, item: _Tailed, offset: int, raw: bytes) -> Event:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        text = raw.decode(self.config.encoding, errors="replace")
        return self.event(
            "log.line", {"path": item.path, "line": text, "offset": offset}, subject=item.path
        )

    def _commit(self, item: _Tailed, events: list[Event], consumed: int) -> bool:
        """Commit lines and the new offset together; on failure, rewind to read them again."""
        committed = (item.offset, item.skipping_committed)
        item.offset += consumed
        try:
            self.emit_many(events, checkpoint={item.key: item.checkpoint()})
        except QueueError as exc:
            item.offset, item.skipping = committed
            item.partial = b""
            item.handle.seek(item.offset)
            self.log.warning(
                "could not commit %d lines of %s: %s; reading them again shortly",
                len(events),
                item.path,
                exc,
            )
            self.stopping.wait(1.0)
            return False
        item.skipping_committed = item.skipping
        return True


@hookimpl
def register_sources(register):
    register("tail", TailSource)
