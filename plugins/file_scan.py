"""The ``file`` source's catch-up: an index of what it reported, and scans against it.

The index is one checkpoint per file (and per folder below a recursive watch):
key ``["<folder>","<name>"]`` (JSON text), value ``"<dev>:<inode> <size>
<mtime_ns>"`` for a file, ``"<dev>:<inode> dir <mtime_ns>"`` for a folder. A folder's
entries are one key range, so a scan compares the index with the disk one folder
at a time (a merge of two sorted lists) and never holds the whole index in memory.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _json_string
from typing import TYPE_CHECKING, Any

from edge_agent import Event

if TYPE_CHECKING:
    from edge_agent.plugins.file import FileSource

#: Checkpoint rows per commit: a big baseline never holds the queue's writer for long.
ROWS_PER_COMMIT = 5_000
#: Events per commit.
EVENTS_PER_COMMIT = 500
#: New files (and vanished entries) held back to pair them up as moves; beyond
#: this, they are reported as created (deleted) at once.
MOVE_CANDIDATES_MAX = 10_000
#: A file found by a scan is reported closed only once its mtime is this old:
#: a scan cannot tell whether its writer is done.
SETTLE_SECONDS = 2.0
#: Files waiting to settle; beyond this, they are reported closed at once.
UNSETTLED_MAX = 10_000


def _text(name: str) -> str:
    """``name`` as UTF-8-safe text: itself, or NUL + base64 of its bytes when it is not UTF-8."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return "\0" + base64.b64encode(os.fsencode(name)).decode("ascii")


def _untext(text: str) -> str:
    return os.fsdecode(base64.b64decode(text[1:])) if text.startswith("\0") else text


def folder_prefix(folder: str) -> str:
    """The prefix every index key of an entry directly in ``folder`` starts with."""
    return f"[{_json_string(_text(folder))},"


def index_key(folder: str, name: str, prefix: str | None = None) -> str:
    """The index key of ``name`` in ``folder`` (``prefix``: its folder_prefix, if known):
    the JSON text ``["<folder>","<name>"]``."""
    return f"{prefix or folder_prefix(folder)}{_json_string(_text(name))}]"


def key_path(key: str) -> str:
    folder, name = json.loads(key)
    return os.path.join(_untext(folder), _untext(name))


def baseline_key(root: str) -> str:
    """The key saying that ``root``'s index is complete (its first scan ended)."""
    return "baseline:" + _text(root)


def entry_value(st: os.stat_result) -> str:
    if stat.S_ISDIR(st.st_mode):
        return f"{st.st_dev}:{st.st_ino} dir {st.st_mtime_ns}"
    return f"{st.st_dev}:{st.st_ino} {st.st_size} {st.st_mtime_ns}"


def identity(value: str) -> str:
    return value.split(" ", 1)[0]


def is_dir_value(value: str) -> bool:
    return value.split(" ", 2)[1] == "dir"


def _same_file(old: str, new: str) -> bool:
    """Could ``new`` be ``old`` renamed? The same inode, size (a file's) and mtime: a
    rename changes none of them, and a deleted file's inode number is soon reused."""
    return old == new


@dataclass
class ScanResult:
    """What a scan found, for the log line and the benchmark."""

    files: int = 0
    folders: int = 0
    created: int = 0
    changed: int = 0
    deleted: int = 0
    moved: int = 0
    unreadable: list[str] = field(default_factory=list)

    @property
    def reported(self) -> int:
        return self.created + self.changed + self.deleted + self.moved


class _Stopped(Exception):
    """The source was told to stop during a scan."""


@dataclass(slots=True)
class _Found:
    key: str
    path: str
    value: str
    root: str
    drains: int = 0  # Scan.drains when it was found


class Scan:
    """One pass over some watched roots, reporting what differs from the index.

    ``silent``: record a baseline, report nothing. ``use_index`` False: no
    index at all (catch_up off); every file found is new (a folder that came
    back). ``between_folders`` is called after each folder, so live events
    keep flowing during a long scan.
    """

    def __init__(
        self,
        source: FileSource,
        *,
        silent: bool = False,
        use_index: bool = True,
        between_folders: Callable[[], None] | None = None,
    ) -> None:
        self.source = source
        self.config = source.config
        self.silent = silent
        self.use_index = use_index
        self.between_folders = between_folders or (lambda: None)
        self.result = ScanResult()
        self._events: list[Event] = []
        self._updates: dict[str, str | None] = {}
        self._appeared: dict[str, _Found] = {}
        self._vanished: dict[str, _Found] = {}
        #: How many times live events were handled during the scan so far.
        self.drains = 0

    # -- walking -----------------------------------------------------------------

    def run(self, roots: list[str]) -> bool:
        """Scan ``roots``; False if the source was told to stop first (nothing is lost:
        what was not committed is found again by the next scan)."""
        try:
            for root in roots:
                self._scan_root(root)
            self._flush_candidates()
            self._commit()
        except _Stopped:
            return False
        return True

    def _scan_root(self, root: str) -> None:
        if os.path.isdir(root):
            stack = [root]
            only = None
        elif os.path.lexists(root):
            stack = [os.path.dirname(root)]
            only = os.path.basename(root)
        else:
            return  # gone: looked at again when it comes back
        while stack:
            if self.source.stopping.is_set():
                raise _Stopped
            folder = stack.pop()
            subfolders = self._scan_folder(root, folder, only)
            stack.extend(sorted(subfolders, reverse=True))
            # Commit before live events are handled, so that theirs come last in the index.
            if self.source.pending.qsize():
                self._commit()
                self.between_folders()
                self.drains += 1
            else:
                self._commit_if_full()

    def _scan_folder(self, root: str, folder: str, only: str | None) -> list[str]:
        """Compare one folder with its index range; return the sub-folders to scan."""
        config = self.config
        keep_folders = config.recursive or config.directories
        subfolders: list[str] = []
        disk: list[tuple[str, str]] = []  # (key, value): lean, a folder may hold millions
        prefix = folder_prefix(folder)
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if only is not None and entry.name != only:
                        continue
                    if self.source.stopping.is_set():
                        return []  # nothing of this folder committed: the next scan does it
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                        if is_dir:
                            if config.recursive:
                                subfolders.append(entry.path)
                            if not keep_folders:
                                continue
                        elif not self.source.wanted(entry.path, root):
                            continue
                        value = entry_value(entry.stat(follow_symlinks=False))
                    except FileNotFoundError:
                        continue  # gone since the listing
                    disk.append((index_key(folder, entry.name, prefix), value))
        except FileNotFoundError:
            return []  # the folder went away: its parent's next scan sees it
        except OSError as exc:
            self.result.unreadable.append(f"{folder}: {exc.strerror}")
            return []
        self.result.folders += 1
        self.result.files += sum(not is_dir_value(value) for _, value in disk)
        disk.sort()

        def found(key: str, value: str) -> _Found:
            name = _untext(json.loads(key[len(prefix) : -1]))
            return _Found(key, os.path.join(folder, name), value, root, self.drains)

        if not self.use_index:
            for key, value in disk:
                self._appear(found(key, value))
            return subfolders
        indexed = self.source.checkpoint_range(
            prefix if only is None else index_key(folder, only, prefix)
        )
        on_disk = iter(disk)
        here = next(on_disk, None)
        row = next(indexed, None)
        while here is not None or row is not None:
            if row is None or (here is not None and here[0] < row[0]):
                self._appear(found(*here))
                here = next(on_disk, None)
            elif here is None or row[0] < here[0]:
                self._vanish(root, row[0], row[1])
                row = next(indexed, None)
            else:
                if here[1] != row[1]:
                    self._compare(root, found(*here), row[1])
                here = next(on_disk, None)
                row = next(indexed, None)
            self._commit_if_full()  # a folder of a million files is not one transaction
        return subfolders

    # -- differences -------------------------------------------------------------

    def _compare(self, root: str, found: _Found, old: str) -> None:
        if is_dir_value(found.value) and is_dir_value(old):
            # The same folder, or one made again: its entries are compared when it is scanned.
            self._updates[found.key] = found.value
            return
        if identity(found.value) != identity(old) or is_dir_value(found.value) != is_dir_value(old):
            self._vanish(root, found.key, old)
            self._appear(found)
            return
        self._updates[found.key] = found.value
        if self.silent or is_dir_value(found.value):
            return
        events = self.config.events
        if "modified" in events:
            self._report("file.modified", found.path, found.value)
        elif "closed" in events:
            self._closed(found)
        else:
            return
        self.result.changed += 1

    def _appear(self, found: _Found) -> None:
        if self.silent:
            self._updates[found.key] = found.value
            return
        ident = identity(found.value)
        gone = self._vanished.pop(ident, None)
        if gone is not None and _same_file(gone.value, found.value):
            self._moved(gone, found)
            return
        if gone is not None:
            self._deleted(gone)
        earlier = self._appeared.pop(ident, None)  # a hard link: both are new
        if earlier is not None:
            self._created(earlier)
        self._appeared[ident] = found
        if len(self._appeared) > MOVE_CANDIDATES_MAX:
            self._flush_appeared()

    def _vanish(self, root: str, key: str, value: str) -> None:
        path = key_path(key)
        if is_dir_value(value):
            for sub_key, sub_value in list(self.source.checkpoint_range(folder_prefix(path))):
                self._vanish(root, sub_key, sub_value)
        if self.silent or not (is_dir_value(value) or self.source.wanted(path, root)):
            self._updates[key] = None
            return
        gone = _Found(key, path, value, root, self.drains)
        ident = identity(value)
        new = self._appeared.pop(ident, None)
        if new is not None and _same_file(value, new.value):
            self._moved(gone, new)
            return
        if new is not None:
            self._created(new)
        earlier = self._vanished.pop(ident, None)
        if earlier is not None:
            self._deleted(earlier)
        self._vanished[ident] = gone
        if len(self._vanished) > MOVE_CANDIDATES_MAX:
            self._flush_vanished()

    def _flush_appeared(self) -> None:
        appeared, self._appeared = self._appeared, {}
        for found in appeared.values():
            self._created(found)

    def _flush_vanished(self) -> None:
        vanished, self._vanished = self._vanished, {}
        for gone in vanished.values():
            self._deleted(gone)

    def _flush_candidates(self) -> None:
        self._flush_vanished()
        self._flush_appeared()

    def _current(self, found: _Found) -> str | None:
        """The entry's value now, or None if it is gone or another file took its place.

        Looked at again only if live events were handled since it was found: else
        a change since is still to come as a live event, after this one.
        """
        if found.drains == self.drains:
            return found.value
        try:
            value = entry_value(os.lstat(found.path))
        except OSError:
            return None
        return value if identity(value) == identity(found.value) else None

    def _created(self, found: _Found) -> None:
        value = self._current(found)
        if value is None:
            return  # gone again: live events (or the next scan) tell
        found.value = value
        if self.use_index:
            self._updates[found.key] = value
        is_dir = is_dir_value(value)
        if is_dir and not (self.config.directories and self.source.wanted(found.path, found.root)):
            return
        events = self.config.events
        if "created" in events:
            self._report("file.created", found.path, value)
        if "closed" in events and not is_dir:
            self._closed(found)
        self.result.created += 1

    def _deleted(self, gone: _Found) -> None:
        if os.path.lexists(gone.path):
            return  # something is there again: live events (or the next scan) tell
        self._updates[gone.key] = None
        if is_dir_value(gone.value) and not self.config.directories:
            return
        if "deleted" in self.config.events:
            self._report("file.deleted", gone.path, gone.value, size=False)
        self.result.deleted += 1

    def _moved(self, gone: _Found, new: _Found) -> None:
        value = self._current(new)
        if value is None:
            self._deleted(gone)
            return
        new.value = value
        self._updates[gone.key] = None
        self._updates[new.key] = value
        if is_dir_value(value) and not self.config.directories:
            return
        if "moved" in self.config.events:
            self._report("file.moved", new.path, value, src_path=gone.path)
        self.result.moved += 1

    def _closed(self, found: _Found) -> None:
        mtime = int(found.value.rsplit(" ", 1)[1]) / 1e9
        source = self.source
        if time.time() - mtime >= SETTLE_SECONDS or len(source.unsettled) >= UNSETTLED_MAX:
            self._report("file.closed", found.path, found.value)
        else:
            source.unsettled[found.path] = (found.key, found.value)
            if self.use_index:
                # Indexed with mtime 0 until file.closed is sent: if the agent stops
                # first, the next scan sees a change and reports it then.
                self._updates[found.key] = found.value.rsplit(" ", 1)[0] + " 0"

    def _report(self, type: str, path: str, value: str, *, size: bool = True, **extra: Any) -> None:
        self._events.append(scan_event(self.source, type, path, value, size=size, **extra))

    def _commit_if_full(self) -> None:
        if len(self._events) >= EVENTS_PER_COMMIT or len(self._updates) >= ROWS_PER_COMMIT:
            self._commit()

    def _commit(self) -> None:
        """Commit what the scan found so far; _Stopped if the source is stopping first."""
        events, self._events = self._events, []
        updates, self._updates = self._updates, {}
        if not self.use_index:
            updates = {}
        if not self.source.commit_retrying(events, updates):
            raise _Stopped


def scan_event(
    source: FileSource, type: str, path: str, value: str, *, size: bool = True, **extra: Any
) -> Event:
    """An event found by a scan: like a live one, with ``"scan": true``."""
    data = source.path_data(path)
    if "src_path" in extra:
        src = source.path_data(extra.pop("src_path"))
        data["src_path"] = src["path"]
        if "path_base64" in src:
            data["src_path_base64"] = src["path_base64"]
    if is_dir_value(value):
        data["is_directory"] = True
    elif size:
        data["size"] = int(value.split(" ")[1])
    data["scan"] = True
    return source.event(type, data, subject=data["path"])
