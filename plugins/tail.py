"""The ``tail`` source: follow log files line by line, like ``tail -F``.

Each file's read position is committed in the same SQLite transaction as the
lines read up to it, so after a crash or a power cut reading resumes exactly
where the committed events end: no line lost, none repeated by the source.

Files are known by identity (device and inode) and by a fingerprint of their
first bytes, not by name. Rotation by rename is followed: the old file is read
to its end (for ``rotate_wait`` after it was renamed, in case a writer still
appends), then every generation rotated after it that was never read
(``app.log.1``, ``app.log-20261201``...), oldest first, then the new file
under the old name from its start. A file truncated in place (copytruncate),
or truncated and regrown past the read position, is read again from its
start, after the rest of its copy when the copy is found. A generation that
was deleted or compressed before it was read to its end is reported as a
``log.gap`` event. inotify wakes the reader at once; a stat every
``poll_interval`` is the fallback.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import glob
import itertools
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Literal

from edge_agent import ByteSize, Duration, Event, Source, hookimpl, option
from edge_agent.errors import QueueError
from edge_agent.event import make_events
from edge_agent.plugins.tail_files import (
    FINGERPRINT_BYTES,
    Tailed,
    compressed_head,
    digest,
    generation_rank,
    generations,
    identity,
    rfc3339,
)

READ_CHUNK = 256 * 1024
#: Most lines per commit: a chunk of short lines is committed in parts, so that one
#: commit never asks a nearly full disk for more room than the queue's usual groups.
LINES_PER_COMMIT = 1000
#: Checkpoint key saying this source has run before (files it meets later are new).
STARTED_KEY = "started"
WARN_EVERY = 60.0
#: A str as a JSON string, non-ASCII kept as it is (what the queue's own encoder does).
_quote = json.encoder.encode_basestring


class TailSource(Source):
    """Emits ``log.line`` for every line appended to the files under ``paths``."""

    announces_listening = True

    @dataclass(kw_only=True)
    class Config:
        paths: list[str] = option(
            doc='Files to follow; globs allowed ("/var/log/app/*.log").',
            example=["/var/log/syslog"],
        )
        start_at: Literal["beginning", "end"] = option(
            "end",
            doc='For files present the first time the source runs: "end" sends only new'
            ' lines, "beginning" sends what is there too. Files that appear later are always'
            " read from their start.",
        )
        encoding: str = option("utf-8", doc="Text encoding; invalid bytes become U+FFFD.")
        max_line_bytes: ByteSize = option(
            65536, min=1, doc="Longer lines are cut to this; the rest is dropped and counted."
        )
        poll_interval: Duration = option(
            1.0, above=0, doc="How often to look for new, rotated or grown files without a wake-up."
        )
        rotate_wait: Duration = option(
            5.0, min=0, doc="How long to keep reading a file after it was renamed or deleted."
        )

        def __post_init__(self) -> None:
            if not self.paths:
                raise ValueError("paths is empty: give at least one file (or glob) to follow")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        try:
            codecs.lookup(self.config.encoding)
        except LookupError:
            raise ValueError(
                f"source {self.name}: unknown encoding {self.config.encoding!r}"
            ) from None
        self._wake = threading.Event()
        self._last_warning = 0.0
        self._reported_missing: set[str] = set()
        self._order = 0

    def stop(self) -> None:
        super().stop()
        self._wake.set()

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        # watchdog is imported here, so that `edge-agent check` and `plugins` start without it.
        from watchdog.observers import Observer

        from edge_agent.plugins.file_watch import Wake

        observer = Observer()
        observer.daemon = True
        for folder in {os.path.dirname(os.path.abspath(p)) for p in self.config.paths}:
            if not glob.has_magic(folder) and os.path.isdir(folder):
                observer.schedule(Wake(self._wake), folder, recursive=False)
        observer.start()
        tailed: dict[str, Tailed] = {}
        try:
            first_run = STARTED_KEY not in self.checkpoints()
            self._resume(tailed)
            # The first scan records where each file starts being read, and
            # "started" with it: a line written after this commit is read.
            self._scan(tailed, first_run=first_run)
            self.listening()
            next_scan = time.monotonic() + self.config.poll_interval
            while not self.stopping.is_set():
                now = time.monotonic()
                if now >= next_scan or self._wake.is_set():
                    self._wake.clear()
                    self._scan(tailed, first_run=False)
                    next_scan = now + self.config.poll_interval
                busy = False
                for item in sorted(tailed.values(), key=lambda i: (i.rotated_at is None, i.order)):
                    if item.rotated_at is not None:  # older generations first, to their end
                        while self._read(item) and not self.stopping.is_set():
                            busy = True
                    elif self._truncated(tailed, item):
                        busy = True  # its copy's rest goes first, in the next round
                    else:
                        busy |= self._read(item)
                    self._retire_if_done(tailed, item)
                if not busy:
                    self._wake.wait(self.config.poll_interval)
        finally:
            observer.stop()
            for item in tailed.values():
                item.handle.close()

    def _next_order(self) -> int:
        self._order += 1
        return self._order

    # -- finding files again ----------------------------------------------------

    def _resume(self, tailed: dict[str, Tailed]) -> None:
        """Reopen the files of the committed checkpoints, by identity, at their offsets,
        with every generation rotated after them; report those that are lost."""
        saved = {k: json.loads(v) for k, v in self.checkpoints().items() if k != STARTED_KEY}
        rotated: list[tuple[tuple, Tailed]] = []
        after: dict[str, list[tuple]] = {}  # followed path -> what its unread generations follow
        known = set(saved)
        fingerprints = [(s.get("head", 0), s.get("fingerprint", "")) for s in saved.values()]
        for key, state in saved.items():
            path, offset = state["path"], state["offset"]
            where = self._find(key, path)
            item = self._open(where, key, offset) if where is not None else None
            if item is not None:
                item.path, item.saved_at = path, state.get("time", item.saved_at)
                item.head, item.fingerprint = state.get("head", 0), state.get("fingerprint", "")
                item.skipping = item.skipping_committed = state.get("skipping", False)
                same = os.fstat(item.handle.fileno()).st_size >= offset and item.same_start(
                    item.head, item.fingerprint
                )
                if same and where != path:
                    self.log.info("%s was rotated to %s; reading the rest of it", path, where)
                    rank = generation_rank(path, where)
                    rotated.append((rank or (0,), item))
                    if rank is not None:
                        after.setdefault(path, []).append(("rank", rank))
                    elif "time" in state:  # renamed to a name that is no generation's
                        after.setdefault(path, []).append(("time", state["time"]))
                    continue
                if where == path:
                    tailed[key] = item
                    if not same:
                        self._restarted(item, state, rotated, after, known)
                    continue
                item.handle.close()  # a generation's name, but another file's content:
                known.discard(key)  # the inode was reused; that file is read as a new one
            self._report_lost(state, checkpoint={key: None})
            if "time" in state:
                after.setdefault(path, []).append(("time", state["time"]))
        for path, marks in after.items():
            rotated += self._unread_generations(path, marks, known, fingerprints)
        self.save_checkpoint(self._adopt(tailed, rotated))

    def _restarted(
        self,
        item: Tailed,
        state: dict,
        rotated: list[tuple[tuple, Tailed]],
        after: dict[str, list[tuple]],
        known: set[str],
    ) -> None:
        """The file under a followed name starts with other bytes than were read from it."""
        path = item.path
        copy = self._find_copy(known, path, state)
        item.reset()
        if copy is not None:  # copytruncate: the rest is in the copy
            self.log.info(
                "%s was truncated while the agent was stopped; reading the rest"
                " from its copy, then it from its start",
                path,
            )
            rotated.append(copy)
            known.add(copy[1].key)
            after.setdefault(path, []).append(("rank", copy[0]))
            self.save_checkpoint({item.key: item.checkpoint()})
        elif self._written_since(path, state.get("time"), known):
            # Rotated away, deleted, and its inode given to the new file.
            self._report_lost(state, checkpoint={item.key: item.checkpoint()})
            after.setdefault(path, []).append(("time", state["time"]))
        else:
            self._report_lost(
                state, checkpoint={item.key: item.checkpoint()}, truncated=True, stopped=True
            )

    def _adopt(
        self, tailed: dict[str, Tailed], rotated: list[tuple[tuple, Tailed]]
    ) -> dict[str, str | None]:
        """Follow rotated generations, oldest first; their checkpoints, to be saved."""
        saves: dict[str, str | None] = {}
        for _, item in sorted(rotated, key=lambda pair: pair[0]):
            item.rotated_at, item.order = time.monotonic(), self._next_order()
            tailed[item.key] = item
            saves[item.key] = item.checkpoint()
        return saves

    @staticmethod
    def _written_since(path: str, since: float | None, known: set[str]) -> bool:
        """True if a generation of ``path`` that is not followed was written after ``since``."""
        if since is None:
            return False
        for _, candidate, _ in generations(path):
            with contextlib.suppress(OSError):
                stat = os.stat(candidate)
                if stat.st_mtime > since and identity(stat) not in known:
                    return True
        return False

    def _report_lost(
        self,
        state: dict,
        *,
        checkpoint: dict[str, str | None],
        truncated: bool = False,
        stopped: bool = False,
    ) -> None:
        """A followed file is gone before it was read to its end: one log.gap.

        ``truncated``: the file is still there but was truncated (or replaced), and no
        plain copy of it was found. A gap if a compressed copy is found, or if that
        happened while the agent was ``stopped`` (what was written to it meanwhile
        cannot be known); seen while running, only a log line.
        """
        path, head, fingerprint = state["path"], state.get("head", 0), state.get("fingerprint")
        data: dict = {"path": path, "from_offset": state["offset"]}
        compressed = [
            candidate
            for _, candidate, is_compressed in reversed(generations(path))
            if is_compressed and head and digest(compressed_head(candidate, head)) == fingerprint
        ]
        if truncated and not compressed and not stopped:
            self.log.info("%s was truncated or replaced; reading it from its start", path)
            self.save_checkpoint(checkpoint)
            return
        if truncated and not compressed:
            # Truncated in place, or deleted and made again (its inode number can come
            # back) while the agent was down: lines written after from_offset before
            # that cannot be known, so the loss is possible, and consumers are told.
            data["reason"] = (
                "truncated or replaced while the agent was stopped, and no copy of it was"
                " found: lines written to it after from_offset before that were not read;"
                " it is read again from its start"
            )
        elif truncated:
            data["compressed"] = compressed[0]
            data["reason"] = (
                f"truncated after it was copied to {compressed[0]}, which is compressed and"
                " not read; lines after from_offset are lost"
            )
        elif compressed:
            data["compressed"] = compressed[0]
            data["reason"] = (
                f"rotated and compressed to {compressed[0]} while the agent was stopped;"
                " compressed generations are not read, so lines after from_offset are lost"
            )
        else:
            data["reason"] = (
                "deleted (after a rotation, or replaced) while the agent was stopped; lines"
                " written to it after from_offset were not read"
            )
        if "time" in state:
            data["since"] = rfc3339(state["time"])
        data["until"] = rfc3339(time.time())
        self.report_gap("log.gap", data, subject=path, checkpoint=checkpoint)

    def _unread_generations(
        self,
        path: str,
        after: list[tuple],
        known: set[str],
        fingerprints: list[tuple[int, str]],
    ) -> list[tuple[tuple, Tailed]]:
        """Open the generations of ``path`` rotated after a followed file, never read yet.

        ``after`` holds ("rank", r) for a followed file found as a generation of rank
        r, and ("time", t) for one that is gone, last saved at wall time t: generations
        newer than it, or written after t, are unread. A compressed one is a gap.
        """
        opened = []
        for rank, candidate, compressed in generations(path):
            try:
                stat = os.stat(candidate)
            except OSError:
                continue
            key = identity(stat)
            unread = any(
                (kind == "rank" and rank > value) or (kind == "time" and stat.st_mtime > value)
                for kind, value in after
            )
            if not unread or key in known:
                continue
            known.add(key)
            if compressed:
                head = compressed_head(candidate, FINGERPRINT_BYTES)
                if not head or any(
                    n and digest(head[:n]) == fingerprint for n, fingerprint in fingerprints
                ):
                    continue  # empty, unreadable, or a copy of a file followed or reported
                self.report_gap(
                    "log.gap",
                    {
                        "path": path,
                        "from_offset": 0,
                        "compressed": candidate,
                        "reason": f"a generation was compressed to {candidate} before it was"
                        " read; compressed generations are not read",
                        "until": rfc3339(time.time()),
                    },
                    subject=path,
                )
                continue
            item = self._open(candidate, key, 0)
            if item is not None:
                self.log.info("reading %s, rotated from %s before it was read", candidate, path)
                item.path = path
                opened.append((rank, item))
        return opened

    def _find_copy(
        self, known: set[str] | dict, path: str, state: dict
    ) -> tuple[tuple, Tailed] | None:
        """The copy of a truncated file (copytruncate), opened where reading stopped."""
        head, fingerprint = state.get("head", 0), state.get("fingerprint", "")
        offset = state["offset"]
        if not head:
            return None
        for rank, candidate, compressed in reversed(generations(path)):
            try:
                stat = os.stat(candidate)
            except OSError:
                continue
            key = identity(stat)
            if compressed or key in known or stat.st_size < offset:
                continue
            item = self._open(candidate, key, offset)
            if item is None:
                continue
            if item.same_start(head, fingerprint):
                self.log.info("reading the rest of %s from its copy %s", path, candidate)
                item.path, item.head, item.fingerprint = path, head, fingerprint
                item.skipping = item.skipping_committed = state.get("skipping", False)
                return rank, item
            item.handle.close()
        return None

    @staticmethod
    def _find(key: str, path: str) -> str | None:
        """Where the file ``key`` is now: its old name, a generation's, or another sibling's."""
        candidates = [path] + [candidate for _, candidate, _ in reversed(generations(path))]
        folder = os.path.dirname(path)
        with contextlib.suppress(OSError):
            candidates += [os.path.join(folder, n) for n in sorted(os.listdir(folder))]
        for candidate in candidates:
            try:
                if identity(os.stat(candidate)) == key:
                    return candidate
            except OSError:
                continue
        return None

    def _open(self, path: str, key: str, offset: int) -> Tailed | None:
        try:
            handle = open(path, "rb")  # noqa: SIM115 (kept open while followed)
        except OSError as exc:
            self.log.warning("cannot open %s: %s; trying again", path, exc.strerror)
            return None
        stat = os.fstat(handle.fileno())
        if identity(stat) != key:  # replaced between stat and open: next scan
            handle.close()
            return None
        handle.seek(min(offset, stat.st_size))
        return Tailed(path=path, key=key, handle=handle, offset=min(offset, stat.st_size))

    def _scan(self, tailed: dict[str, Tailed], *, first_run: bool) -> None:
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
                current[identity(stat)] = path
            if not found and pattern not in self._reported_missing:
                self._reported_missing.add(pattern)
                self.log.warning("%s: no such file yet; following it once it appears", pattern)
            elif found:
                self._reported_missing.discard(pattern)
        saves: dict[str, str | None] = {STARTED_KEY: "1"} if first_run else {}
        for key, path in current.items():
            item = tailed.get(key)
            if item is None:
                item = self._open(path, key, 0)
                if item is not None:
                    if first_run and self.config.start_at == "end":
                        item.offset = item.handle.seek(0, os.SEEK_END)
                        item.refresh_fingerprint()
                    tailed[key] = item
                    saves[key] = item.checkpoint()
                continue
            if item.rotated_at is not None and item.path == path:
                item.rotated_at = None  # renamed back
        if saves:
            self.save_checkpoint(saves)
        for key, item in list(tailed.items()):
            if key not in current and item.rotated_at is None:
                item.rotated_at = time.monotonic()
                item.order = self._next_order()
                self._follow_rotation(tailed, item)

    def _truncated(self, tailed: dict[str, Tailed], item: Tailed) -> bool:
        """If ``item`` was truncated, or truncated and regrown, since it was last read,
        start it again from its start, after the rest of its copy if one is found."""
        read = item.offset + len(item.partial)  # a partial line is read, not committed
        if os.fstat(item.handle.fileno()).st_size >= read and item.same_start(
            item.head, item.fingerprint
        ):
            return False
        path = item.path
        state = {"path": path, "offset": item.offset, "time": item.saved_at}
        state.update(head=item.head, fingerprint=item.fingerprint, skipping=item.skipping_committed)
        copy = self._find_copy(tailed, path, state)
        if copy is None:
            item.reset()
            self._report_lost(state, checkpoint={item.key: item.checkpoint()}, truncated=True)
            return True
        self.log.info("%s was truncated; reading the rest from its copy, then it again", path)
        known = set(tailed) | {copy[1].key}
        fingerprints = [(item.head, item.fingerprint)]
        newer = self._unread_generations(path, [("rank", copy[0])], known, fingerprints)
        saves = self._adopt(tailed, [copy, *newer])
        item.reset()
        saves[item.key] = item.checkpoint()
        self.save_checkpoint(saves)
        return True

    def _follow_rotation(self, tailed: dict[str, Tailed], item: Tailed) -> None:
        """``item`` was just rotated away: also read the generations rotated after it."""
        where = self._find(item.key, item.path)
        rank = generation_rank(item.path, where) if where is not None else None
        after = [("rank", rank)] if rank is not None else [("time", item.saved_at)]
        fingerprints = [(other.head, other.fingerprint) for other in tailed.values()]
        opened = self._unread_generations(item.path, after, set(tailed), fingerprints)
        if opened:
            self.save_checkpoint(self._adopt(tailed, opened))

    def _retire_if_done(self, tailed: dict[str, Tailed], item: Tailed) -> None:
        if item.rotated_at is None or not item.at_eof:
            return
        if time.monotonic() - item.rotated_at < self.config.rotate_wait:
            return
        if item.partial:  # the writer is gone: its last line will never end
            events = self._line_events(item, [item.partial], [item.offset])
            self._commit(item, events, len(item.partial))
        item.handle.close()
        del tailed[item.key]
        self.save_checkpoint({item.key: None})

    # -- reading ----------------------------------------------------------------

    def _read(self, item: Tailed) -> bool:
        """Read one chunk and commit its complete lines; True if there was data.

        The chunk's lines are split, decoded and made into events a whole list at a
        time (not one Python step per byte range), and committed in parts of at most
        LINES_PER_COMMIT lines, each with the offset just past its last line.
        """
        chunk = item.handle.read(READ_CHUNK)
        item.at_eof = not chunk
        if not chunk:
            return False
        data = item.partial + chunk
        limit = self.config.max_line_bytes
        consumed = 0
        if item.skipping:  # inside a line longer than allowed: drop the rest of it
            end = data.find(b"\n")
            consumed = len(data) if end < 0 else end + 1
            self.count("dropped_bytes", len(data) if end < 0 else end)
            item.skipping = end < 0
        lines: list[bytes] = []
        if not item.skipping:
            last = data.rfind(b"\n", consumed)
            if last >= 0:
                lines = data[consumed:last].split(b"\n")
            if len(data) - (last + 1) > limit:  # a line longer than allowed, not ended yet
                lines.append(data[last + 1 :])
                item.skipping = True
        # Where each line starts in the file, and the bytes read through its end.
        starts = list(itertools.accumulate((len(line) + 1 for line in lines), initial=consumed))
        if lines:
            consumed = len(data) if item.skipping else starts[-1]
        if lines and max(map(len, lines)) > limit:
            for i, line in enumerate(lines):
                if len(line) > limit:
                    self.count("truncated_lines")
                    self.count("dropped_bytes", len(line) - limit)
                    lines[i] = line[:limit]
        item.partial = data[consumed:]
        if consumed:
            events = self._line_events(item, lines, [item.offset + at for at in starts])
            skipping = item.skipping  # where the chunk ends; a cut before it ends a line
            done = 0
            for first in range(0, max(len(events), 1), LINES_PER_COMMIT):
                end = first + LINES_PER_COMMIT
                through = consumed if end >= len(events) else starts[end]
                item.skipping = skipping if through == consumed else False
                if not self._commit(item, events[first:end], through - done):
                    break  # rewound: the rest is read again
                done = through
        if self.counters["truncated_lines"] and time.monotonic() - self._last_warning >= WARN_EVERY:
            self._last_warning = time.monotonic()
            self.log.warning(
                "%d lines were longer than max_line_bytes (%d) and were cut; %d bytes dropped"
                " so far",
                self.counters["truncated_lines"],
                limit,
                self.counters["dropped_bytes"],
            )
        return True

    def _line_events(self, item: Tailed, lines: list[bytes], offsets: list[int]) -> list[Event]:
        """``log.line`` events for ``lines`` (without their newline) starting at ``offsets``."""
        encoding, path = self.config.encoding, item.path
        texts = [line.decode(encoding, errors="replace").removesuffix("\r") for line in lines]
        data = [
            {"path": path, "line": text, "offset": offset}
            for text, offset in zip(texts, offsets, strict=False)
        ]
        if not _decodes_cleanly(encoding) or not _is_utf8(path):
            # Text that may hold lone surrogates: the queue's own check says what is wrong.
            return make_events("log.line", self.name, data, subject=path)
        return make_events(
            "log.line", self.name, data, subject=path, data_json=line_json(path, texts, offsets)
        )

    def _commit(self, item: Tailed, events: list[Event], consumed: int) -> bool:
        """Commit lines and the new offset together; on failure, rewind to read them again."""
        committed = (item.offset, item.skipping_committed, item.head, item.fingerprint)
        item.offset += consumed
        item.refresh_fingerprint()
        try:
            self.emit_many(events, checkpoint={item.key: item.checkpoint()})
        except QueueError as exc:
            item.offset, item.skipping, item.head, item.fingerprint = committed
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


def line_json(path: str, texts: list[str], offsets: list[int]) -> list[str]:
    """Each line's data as the JSON text ``encode_data`` makes of it, built as text: a
    fraction of what encoding each dict costs. The texts must be valid UTF-8 (no lone
    surrogates)."""
    head = f'{{"path":{_quote(path)},"line":'
    return [
        f'{head}{_quote(text)},"offset":{offset}}}'
        for text, offset in zip(texts, offsets, strict=False)
    ]


@functools.cache
def _decodes_cleanly(encoding: str) -> bool:
    """True if text decoded from ``encoding`` with errors="replace" never holds a lone
    surrogate (UTF-7 and the escape codecs can make one)."""
    name = codecs.lookup(encoding).name
    return name in _CLEAN_CODECS or name.startswith(("iso8859-", "cp", "mac-", "koi8"))


_CLEAN_CODECS = {"utf-8", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"}
_CLEAN_CODECS |= {"utf-32-be", "ascii", "latin-1"}


def _is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # an undecodable file name
        return False
    return True


@hookimpl
def register_sources(register):
    register("tail", TailSource)
