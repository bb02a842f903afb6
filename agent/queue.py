"""The SQLite queue: every accepted event is committed here before anything else.

One file, ``queue.db`` in the state directory, in WAL mode with
``synchronous`` FULL (or NORMAL, when the config says so) set and read back on
every connection. Each thread that touches the queue opens its own connection:
the writer (inserts, deletes of confirmed events) and one per forwarder
(reads, its own cursor). Every write is an explicit ``BEGIN IMMEDIATE …
COMMIT`` on a connection in autocommit mode, so no statement joins a
transaction by accident.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlite_utils import Database

from edge_agent import dead_letters
from edge_agent.clock import AgeClock
from edge_agent.errors import QueueCorrupt, QueueError, QueueVanished
from edge_agent.event import Event, QueuedEvent, encode_attributes
from edge_agent.migrations import migrations
from edge_agent.routing import EVERYTHING, Route, register_functions, selective

log = logging.getLogger("edge_agent.queue")

QUEUE_FILE = "queue.db"
#: What the agent knew of a queue file that vanished under it; read at the next start.
LOST_FILE = "queue.lost.json"

#: (source instance name, key, value); a value of None deletes the key.
Checkpoint = tuple[str, str, str | None]
#: A checkpoint key of the agent's own, never shown to the source: the plugin and a
#: digest of the settings the source last ran with, so that a source renamed while
#: the agent was stopped is recognised (agent/reload.py). It moves with a rename.
INSTANCE_KEY = "edge-agent:instance"
BUSY_TIMEOUT_MS = 10_000
#: The size of the checkpoints table is measured again at most this often (seconds).
CHECKPOINT_SIZE_EVERY = 10.0
#: After a checkpoint, the WAL file is cut back to this size.
WAL_SIZE_LIMIT = 8 * 1024 * 1024
#: Events per INSERT statement. One statement of many rows is one sqlite3_step,
#: so Python's sqlite3 lets go of the interpreter lock and takes it back once,
#: where executemany does so for every row; under load another thread holds the
#: lock by then, and each row waited for it.
INSERT_ROWS = 64
#: How often (on the age clock) the writer notes which event was accepted when.
AGE_MARK_EVERY = 60.0


@dataclass(frozen=True)
class Usage:
    """How big the queue is now: events (dead letters included), bytes in live pages,
    bytes of the WAL file."""

    events: int
    live_bytes: int
    wal_bytes: int


@dataclass(frozen=True)
class QueueStats:
    """What the queue holds: event count, oldest and newest positions and times."""

    events: int
    oldest_time: str | None
    newest_time: str | None
    sink_backlog: dict[str, int]
    #: Dead letters per sink (see :mod:`edge_agent.dead_letters`).
    dead_letters: dict[str, int] = field(default_factory=dict)


class QueueStore:
    """The queue file: opening it, its schema, and connections to it."""

    def __init__(self, state_dir: str, *, sync: str = "full") -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, QUEUE_FILE)
        self.sync = sync
        #: Set by :meth:`open` when it moved a damaged queue aside.
        self.moved_aside: dict[str, Any] | None = None
        #: Set by :meth:`open` from the record of a queue that vanished while the
        #: agent ran (see :meth:`QueueWriter.record_lost`); None if there was none.
        self.lost: dict[str, Any] | None = None
        self.lost_path = os.path.join(state_dir, LOST_FILE)
        #: The highest position the bounds dropped (drop_oldest, max_age) in this
        #: process: forwarders forget what they hold in memory up to it.
        self.dropped_through = 0

    def connect(self, *, sync: str | None = None) -> sqlite3.Connection:
        """A new connection for the calling thread, with the durability settings checked.

        ``sync`` overrides the configured level for this connection only.
        """
        sync = sync or self.sync
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise QueueError(f"cannot open the queue {self.path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            register_functions(conn)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute(f"PRAGMA synchronous = {sync.upper()}")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            level = conn.execute("PRAGMA synchronous").fetchone()[0]
        except sqlite3.Error as exc:
            conn.close()
            if _is_corruption(exc):
                raise QueueCorrupt(f"the queue {self.path} is damaged: {exc}") from exc
            raise QueueError(f"cannot open the queue {self.path}: {exc}") from exc
        expected = {"full": 2, "normal": 1}[sync]
        if mode.lower() != "wal" or level != expected:
            conn.close()
            raise QueueError(
                f"the queue {self.path} refused WAL mode or synchronous={sync}"
                f" (got journal_mode={mode}, synchronous={level}); is it on a local filesystem?"
            )
        return conn

    def open(self) -> str | None:
        """Create the state directory and the schema; check the file is sound.

        A damaged file is moved aside (with its -wal and -shm files) as
        ``queue.db.corrupt-<timestamp>`` and a fresh queue is started; the
        path it was moved to is returned, else None. What could be read of it
        is then in :attr:`moved_aside` (for the ``queue.gap`` event).
        """
        try:
            os.makedirs(self.state_dir, exist_ok=True)
        except OSError as exc:
            raise QueueError(
                f"cannot create the state directory {self.state_dir}: {exc.strerror};"
                " set [agent] state_dir to a writable local folder"
            ) from exc
        try:
            self._open_checked()
            self._take_lost_record()
            return None
        except QueueCorrupt as exc:
            aside = self._move_aside()
            log.error(
                "%s. It was moved aside to %s and a new, empty queue was started: events that"
                " were waiting in it were NOT sent. Inspect it (sqlite3 %s '.recover') and"
                " delete it when done.",
                exc,
                aside,
                aside,
            )
            self._open_checked()
            self._take_lost_record()
            self.moved_aside = {"moved_to": aside, **salvage_stats(aside)}
            self._carry_sequences(self.moved_aside.pop("sequences", {}))
            return aside

    def _take_lost_record(self) -> None:
        """A queue vanished under the last run: carry its numbering and checkpoints over.

        Sources go on numbering where it stopped, so the loss shows as a jump in
        ``sequence``, and read on from their checkpoints in it, so what it had
        sent is not read and sent again under new ids. A queue that has
        checkpoints of its own (a file put back by an operator) keeps them.
        The record stays until :meth:`forget_lost` (after the gap event is
        committed), so a crash in between only reports the loss twice.
        """
        try:
            with open(self.lost_path, encoding="utf-8") as handle:
                record = json.load(handle)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error(
                "cannot read %s (what the last run knew of a queue that vanished): %s;"
                " delete it once read",
                self.lost_path,
                exc,
            )
            return
        conn = self.connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO source_sequences (source, last) VALUES (?, ?)"
                " ON CONFLICT (source) DO UPDATE SET last = MAX(last, excluded.last)",
                list(record.get("sequences", {}).items()),
            )
            conn.executemany(
                "INSERT OR IGNORE INTO checkpoints (source, key, value) VALUES (?, ?, ?)",
                [tuple(row) for row in record.get("checkpoints", [])],
            )
            conn.execute("COMMIT")
        except (sqlite3.Error, TypeError, ValueError) as exc:
            log.error("cannot carry over %s: %s", self.lost_path, exc)
        finally:
            conn.close()
        self.lost = {k: v for k, v in record.items() if k not in ("sequences", "checkpoints")}

    def forget_lost(self) -> None:
        """The vanished queue was reported: delete its record."""
        self.lost = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.lost_path)

    def _carry_sequences(self, sequences: dict[str, int]) -> None:
        """Go on with each source's numbering after a damaged queue (readable part of it),
        so consumers see the loss as a jump in ``sequence``, not a restart at 1."""
        if not sequences:
            return
        conn = self.connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT OR REPLACE INTO source_sequences (source, last) VALUES (?, ?)",
                sequences.items(),
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.warning("could not carry the sources' sequence numbers over: %s", exc)
        finally:
            conn.close()

    def _open_checked(self) -> None:
        conn = self.connect()
        try:
            if conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
                # Only possible before the first table: lets freed pages go back to the
                # disk. In WAL mode it takes a VACUUM (instant on an empty file).
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                conn.execute("VACUUM")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise QueueCorrupt(f"the queue {self.path} is damaged: {check}")
            migrations.apply(Database(conn, execute_plugins=False))
        except sqlite3.DatabaseError as exc:
            if _is_corruption(exc):
                raise QueueCorrupt(f"the queue {self.path} is damaged: {exc}") from exc
            raise QueueError(f"the queue {self.path} cannot be used: {exc}") from exc
        finally:
            conn.close()

    def _move_aside(self) -> str:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = f"{self.path}.corrupt-{stamp}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, aside + suffix)
        return aside

    def damaged_copies(self) -> list[str]:
        """Damaged queues moved aside earlier and not yet deleted by an operator."""
        try:
            names = os.listdir(self.state_dir)
        except OSError:
            return []
        return sorted(
            os.path.join(self.state_dir, n)
            for n in names
            if n.startswith(QUEUE_FILE + ".corrupt-") and not n.endswith(("-wal", "-shm"))
        )


def _is_corruption(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    return name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or "malformed" in str(exc)


_COLUMNS = 8  # of an event row, as _insert_sql lists them
_SPAN = "SELECT (SELECT MIN(position) FROM events), (SELECT MAX(position) FROM events)"


def _span(conn: sqlite3.Connection) -> tuple[int | None, int | None]:
    """(oldest, newest) position queued, (None, None) if none: two index look-ups
    (SQLite answers a lone MIN or MAX from the index; both in one SELECT scan the table)."""
    return conn.execute(_SPAN).fetchone()


def _holes(conn: sqlite3.Connection) -> tuple[int, int]:
    """(positions gone between the oldest and the newest event, the highest of them)."""
    try:
        row = conn.execute("SELECT holes, through FROM queue_holes WHERE id = 1").fetchone()
    except sqlite3.OperationalError:  # a file of a version before routes
        return 0, 0
    return (0, 0) if row is None else (row[0], row[1])


#: Positions per block of a selecting sink's counted backlog (see _routed_backlog).
COUNT_BLOCK = 8192
#: (queue file, sink) → (its route, {block: events of the sink's in it}), for read_stats;
#: forgotten when the route changes (the events it no longer held may be gone since).
_block_counts: dict[tuple[str, str], tuple[Route, dict[int, int]]] = {}
_block_counts_lock = threading.Lock()


def _backlog(
    conn: sqlite3.Connection,
    cursor: int,
    route: Route,
    span: tuple[int | None, int | None],
    holes: tuple[int, int],
    blocks: dict[int, int] | None = None,
) -> int:
    """Events after ``cursor`` that a sink with ``route`` wants.

    A sink that wants everything: from index look-ups (positions are
    consecutive above the highest hole); one that selects: its events counted
    (``blocks``: counts kept from an earlier call, see :func:`_routed_backlog`).
    """
    low, high = span
    if low is None or high is None or cursor >= high:
        return 0
    if not route.everything:
        return _routed_backlog(
            conn, max(cursor + 1, low), high, route, {} if blocks is None else blocks
        )
    count, through = holes
    below = 0
    if count and cursor < through:
        below = conn.execute(
            "SELECT COUNT(*) FROM events WHERE position > ? AND position <= ?", (cursor, through)
        ).fetchone()[0]
        cursor = through
    return below + max(0, high - max(cursor, low - 1))


@functools.lru_cache(maxsize=INSERT_ROWS)
def _insert_sql(rows: int) -> str:
    """INSERT of ``rows`` events in one statement."""
    columns = "id, source, type, time, subject, sequence, data, attributes"
    return f"INSERT INTO events ({columns}) VALUES " + ",".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * rows)


class QueueWriter:
    """Inserts events and deletes confirmed ones. Owned by the writer thread."""

    def __init__(self, store: QueueStore, *, clock: AgeClock | None = None) -> None:
        self.conn = store.connect()
        self.store = store
        self.sync = store.sync
        # The file this connection has open; a path that stops naming it means
        # the queue was deleted or replaced (see check_file).
        info = os.stat(store.path)
        self._identity = (info.st_dev, info.st_ino)
        self._relaxed = False  # synchronous is NORMAL for a delete and not yet restored
        self.wal_path = store.path + "-wal"
        self._sequences: dict[str, int] = dict(
            self.conn.execute("SELECT source, last FROM source_sequences").fetchall()
        )
        #: Dead letters dropped by the bounds since start, per sink.
        self.dead_letters_dropped: Counter[str] = Counter()
        #: Positions gone between the oldest and the newest event, and the highest of
        #: them (see migration m004_routing); (0, 0) while no sink selects events.
        self._holes, self._holes_through = _holes(self.conn)
        #: (the lagging routed sinks' cursors and routes, the position swept through):
        #: what delete_confirmed left of (oldest cursor, position] is wanted by them.
        self._swept: tuple[Any, int] = ((), 0)
        self._checkpoints_size = 0
        self._checkpoints_changed = True
        self._checkpoints_measure_at = 0.0
        saved = self.conn.execute("SELECT boot_id, offset, last FROM age_clock").fetchone()
        #: What max_age is measured on (agent/clock.py); injectable for tests.
        self.clock = clock or AgeClock.resume(saved)
        self._next_mark = 0.0  # on self.clock
        self._unmarked = False  # events committed after the last age mark
        self._start_clock()

    def _start_clock(self) -> None:
        """Save this boot's clock; give events queued before age marks existed one.

        Not fsynced (the next commit of events makes it durable) and not fatal:
        without it, ages are only noted later (events may then live longer).
        """
        now = self.clock.now()
        try:
            self._relax_sync()
            self.conn.execute("BEGIN IMMEDIATE")
            self._save_clock(now)
            # Events of an older version, or after the last mark: accepted by now.
            self.conn.execute(
                "INSERT OR REPLACE INTO age_marks (position, clock)"
                " SELECT MAX(position), ? FROM events HAVING COUNT(*) > 0",
                (now,),
            )
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            log.warning(
                "cannot note the queue's age clock yet: %s; trying with the next commit", exc
            )
        finally:
            with contextlib.suppress(QueueError):  # append() tries again, and refuses if not
                self._restore_sync()

    def _save_clock(self, now: float) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO age_clock (id, boot_id, offset, last) VALUES (1, ?, ?, ?)",
            (self.clock.boot, self.clock.offset, now),
        )

    def _mark_age(self) -> None:
        """Inside append's transaction: every event so far was accepted by now, on the age
        clock. About once a minute; mark_age() notes the rest when no more events come."""
        now = self.clock.now()
        if now < self._next_mark:
            self._unmarked = True
            return
        self.conn.execute(
            "INSERT OR REPLACE INTO age_marks (position, clock)"
            " VALUES ((SELECT MAX(position) FROM events), ?)",
            (now,),
        )
        self._save_clock(now)
        self._next_mark = now + AGE_MARK_EVERY
        self._unmarked = False

    def mark_age(self) -> None:
        """Between commits: note events committed since the last age mark, once it is due."""
        if not self._unmarked or self.clock.now() < self._next_mark:
            return
        try:
            self._relax_sync()  # not worth an fsync: the next commit of events makes it durable
            self.conn.execute("BEGIN IMMEDIATE")
            self._mark_age()
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            log.debug("age mark not written: %s", exc)
        finally:
            with contextlib.suppress(QueueError):
                self._restore_sync()

    def append(
        self, events: Sequence[tuple[Event, str]], checkpoints: Sequence[Checkpoint] = ()
    ) -> None:
        """Commit events (each with its data as JSON text) and checkpoints in one transaction.

        Gives each event the next ``sequence`` of its source. On failure
        nothing of the batch is kept and QueueError is raised.
        """
        if self._relaxed:
            self._restore_sync()  # QueueError: this batch is not accepted
        sequences = dict(self._sequences)
        values: list = []  # the rows' columns, one after the other
        for event, data_json in events:
            sequence = sequences.get(event.source, 0) + 1
            sequences[event.source] = sequence
            values += (
                event.id,
                event.source,
                event.type,
                event.time,
                event.subject,
                sequence,
                data_json,
                encode_attributes(event) if event.attributes else None,
            )
        step = INSERT_ROWS * _COLUMNS
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            for start in range(0, len(values), step):
                part = values[start : start + step]
                self.conn.execute(_insert_sql(len(part) // _COLUMNS), part)
            if events:
                self._mark_age()
            self.conn.executemany(
                "INSERT INTO source_sequences (source, last) VALUES (?, ?)"
                " ON CONFLICT (source) DO UPDATE SET last = excluded.last",
                [
                    (source, last)
                    for source, last in sequences.items()
                    if self._sequences.get(source) != last
                ],
            )
            self.conn.executemany(
                "INSERT INTO checkpoints (source, key, value) VALUES (?, ?, ?)"
                " ON CONFLICT (source, key) DO UPDATE SET value = excluded.value",
                [row for row in checkpoints if row[2] is not None],
            )
            self.conn.executemany(
                "DELETE FROM checkpoints WHERE source = ? AND key = ?",
                [row[:2] for row in checkpoints if row[2] is None],
            )
            self.conn.execute("COMMIT")
        except Exception as exc:
            self._rollback()
            raise QueueError(f"cannot commit {len(events)} events to the queue: {exc}") from exc
        self._sequences = sequences
        if checkpoints:
            self._checkpoints_changed = True

    @property
    def sequences(self) -> Mapping[str, int]:
        """Each source's last sequence, as committed (read it right after :meth:`append`)."""
        return self._sequences

    def skip_sequences(self, counts: Counter[str]) -> None:
        """Numbers for events dropped before they were queued: the loss shows in ``sequence``.

        Stored with the next commit of the same source.
        """
        for source, count in counts.items():
            self._sequences[source] = self._sequences.get(source, 0) + count

    def check_file(self) -> None:
        """Raise QueueVanished if the queue's path no longer names the file being written.

        A deleted file (or state directory) takes every commit with it, and the
        next start would begin from nothing. One ``stat``: cheap enough for
        every commit (bench/queue.py measures it).
        """
        path = self.store.path
        try:
            info = os.stat(path)
        except FileNotFoundError:
            what = (
                "was deleted"
                if os.path.isdir(self.store.state_dir)
                else ("was deleted with its state directory")
            )
        except OSError as exc:
            what = f"cannot be looked at ({exc.strerror})"
        else:
            if (info.st_dev, info.st_ino) == self._identity:
                return
            what = "was replaced by another file"
        raise QueueVanished(f"the queue file {path} {what} while the agent was using it")

    def record_lost(self, reason: str, routes: Mapping[str, Route] | None = None) -> dict[str, Any]:
        """Write what this (vanished) queue held next to where it was, for the next start.

        Read through the connection still open on the vanished file: its
        events (the loss), each source's last ``sequence`` and its checkpoints.
        The state directory is made again if it was deleted. Returns the
        record; raises OSError if it cannot be written.
        """
        record: dict[str, Any] = {
            "reason": reason,
            "path": self.store.path,
            "detected": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        with contextlib.suppress(sqlite3.Error):
            stats = _read_stats(self.conn, routes)
            record.update(
                # Not sent to every sink: what is lost (confirmed events wait for deletion).
                events=max(stats.sink_backlog.values(), default=stats.events),
                oldest=stats.oldest_time,
                newest=stats.newest_time,
                sinks=stats.sink_backlog,
            )
        with contextlib.suppress(sqlite3.Error):
            record["sequences"] = dict(
                self.conn.execute("SELECT source, last FROM source_sequences")
            )
        with contextlib.suppress(sqlite3.Error):
            record["checkpoints"] = self.conn.execute(
                "SELECT source, key, value FROM checkpoints"
            ).fetchall()
        os.makedirs(self.store.state_dir, exist_ok=True)
        temporary = self.store.lost_path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.store.lost_path)
        return record

    def delete_confirmed(
        self, sinks: Sequence[str], routes: Mapping[str, Route] | None = None
    ) -> int:
        """Delete events every one of ``sinks`` that wants them has confirmed; return how many.

        ``routes`` gives the selection of sinks that select events (a sink not in
        it wants everything). Without one, or without holes left by one, this is
        a prefix of the queue up to the oldest cursor (one DELETE of a rowid
        range); else see :meth:`_delete_routed`.
        """
        if not sinks:
            return 0
        routed = selective(dict(routes or {}), sinks)
        if routed or self._holes:
            return self._delete_routed(sinks, routed)
        marks = ",".join("?" * len(sinks))
        # A delete lost to a power cut only means those events are sent again (at
        # least once), so it skips the fsync: the next commit of events (FULL)
        # makes it durable with them. append() restores FULL first, whatever happens here.
        try:
            self._relax_sync()
            self.conn.execute("BEGIN IMMEDIATE")
            row = self.conn.execute(
                f"SELECT MIN(position), COUNT(*) FROM sink_cursors WHERE sink IN ({marks})",
                list(sinks),
            ).fetchone()
            if row[1] < len(sinks) or row[0] is None:
                self.conn.execute("COMMIT")
                return 0
            deleted = self.conn.execute(
                "DELETE FROM events WHERE position <= ?", (row[0],)
            ).rowcount
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise QueueError(f"cannot delete confirmed events: {exc}") from exc
        finally:
            with contextlib.suppress(QueueError):  # append() tries again, and refuses if not
                self._restore_sync()
        return deleted

    def _delete_routed(self, sinks: Sequence[str], routed: dict[str, Route]) -> int:
        """Delete what no sink that wants it still needs, also behind the oldest cursor.

        A sink's cursor means: every event at or below it is confirmed by the
        sink or not wanted by it. With M the oldest cursor and U the oldest
        cursor of the sinks that want everything (the newest event if none
        does), every event up to M goes, as without routes; an event in (M, U]
        goes unless a selecting sink whose cursor is below it wants it. The
        newest event always stays until a prefix delete takes it, so the newest
        position is the last one given and holes are counted from index
        look-ups. What a pass kept is not scanned again while the lagging
        selecting sinks' cursors and routes stay as they were (one offline for
        weeks costs only the new events).
        """
        marks = ",".join("?" * len(sinks))
        deleted = 0
        try:
            self._relax_sync()
            self.conn.execute("BEGIN IMMEDIATE")
            cursors = dict(
                self.conn.execute(
                    f"SELECT sink, position FROM sink_cursors WHERE sink IN ({marks})", list(sinks)
                ).fetchall()
            )
            low, high = _span(self.conn)
            if len(cursors) < len(sinks) or low is None:
                self.conn.execute("COMMIT")
                return 0
            count = high - low + 1 - self._holes
            oldest = min(cursors.values())
            if oldest >= low:
                deleted += self.conn.execute(
                    "DELETE FROM events WHERE position <= ?", (oldest,)
                ).rowcount
            wanting_all = [cursors[s] for s in sinks if s not in routed]
            upper = min(min(wanting_all, default=high), high - 1)
            lagging = tuple(
                sorted((s, cursors[s], r) for s, r in routed.items() if cursors[s] < upper)
            )
            key, swept = self._swept
            start = max(oldest, swept) if key == lagging else oldest
            middle = 0
            if upper > start:
                where = ["position > ?", "position <= ?"]
                args: list[Any] = [start, upper]
                for _sink, cursor, route in lagging:
                    clause, clause_args = route.sql()
                    where.append(f"NOT (position > ? AND {clause})")
                    args += [cursor, *clause_args]
                middle = self.conn.execute(
                    "DELETE FROM events WHERE " + " AND ".join(where), args
                ).rowcount
                deleted += middle
            self._swept = (lagging, max(upper, start))
            holes, through = self._holes, self._holes_through
            if deleted:
                through = max(through, upper) if middle else through
                holes, through = self._holes_left(count - deleted, through)
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self._swept = ((), 0)
            raise QueueError(f"cannot delete confirmed events: {exc}") from exc
        finally:
            with contextlib.suppress(QueueError):  # append() tries again, and refuses if not
                self._restore_sync()
        self._holes, self._holes_through = holes, through
        return deleted

    def _holes_left(self, count: int, through: int) -> tuple[int, int]:
        """Inside a delete's transaction: (holes, highest hole) now that ``count`` events
        are left; written to queue_holes when they changed."""
        low, high = _span(self.conn)
        holes = 0 if low is None else high - low + 1 - count
        through = through if holes else 0
        if (holes, through) != (self._holes, self._holes_through):
            self.conn.execute(
                "INSERT OR REPLACE INTO queue_holes (id, holes, through) VALUES (1, ?, ?)",
                (holes, through),
            )
        return holes, through

    def _relax_sync(self) -> None:
        """synchronous=NORMAL for a write that need not be durable at once (no fsync in WAL
        mode); append() restores the configured level before the next events."""
        self._relaxed = True
        self.conn.execute("PRAGMA synchronous = NORMAL")

    def _restore_sync(self) -> None:
        """Back to the configured synchronous level after a delete; QueueError if not."""
        try:
            self._rollback()  # the level cannot change inside a transaction
            self.conn.execute(f"PRAGMA synchronous = {self.sync.upper()}")
            level = self.conn.execute("PRAGMA synchronous").fetchone()[0]
        except sqlite3.Error as exc:
            raise QueueError(f"cannot restore synchronous={self.sync}: {exc}") from exc
        if level != {"full": 2, "normal": 1}[self.sync]:
            raise QueueError(f"the queue refused synchronous={self.sync}")
        self._relaxed = False

    def usage(self) -> Usage:
        """Cheap to ask before every commit: page counts and one stat."""
        conn = self.conn
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        # Deletes only ever remove a prefix of positions, so the span is the count.
        # Two subqueries: SQLite answers a lone MIN or MAX from the index, but
        # MIN and MAX together scan the whole table.
        low, high = conn.execute(
            "SELECT (SELECT MIN(position) FROM events), (SELECT MAX(position) FROM events)"
        ).fetchone()
        events = 0 if low is None else high - low + 1 - self._holes
        events += conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        try:
            wal = os.stat(self.wal_path).st_size
        except OSError:
            wal = 0
        live = max(0, (pages - free) * page_size - self._checkpoint_bytes())
        return Usage(events, live, wal)

    def _checkpoint_bytes(self) -> int:
        """Bytes the checkpoints take: not part of the backlog that max_bytes bounds (the
        file source keeps an index of every file there). Measured again after they
        changed, at most every CHECKPOINT_SIZE_EVERY seconds or 100 times as long as the
        last measurement took (it reads every page of the table: 0.2 s for a million)."""
        now = time.monotonic()
        if not self._checkpoints_changed or now < self._checkpoints_measure_at:
            return self._checkpoints_size
        try:
            self._checkpoints_size = self.conn.execute(
                "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat('main', 1)"
                " WHERE name IN ('checkpoints', 'sqlite_autoindex_checkpoints_1')"
            ).fetchone()[0]
        except sqlite3.Error:  # an SQLite built without dbstat: checkpoints count too
            self._checkpoints_size = 0
        took = time.monotonic() - now
        self._checkpoints_changed = False
        self._checkpoints_measure_at = now + max(CHECKPOINT_SIZE_EVERY, 100 * took)
        return self._checkpoints_size

    def drop_oldest(self, count: int) -> Counter[str]:
        """Delete the ``count`` oldest events and dead letters; return events per source.

        Dead letters are taken by their event's place in the queue, with the
        events; how many per sink is added to :attr:`dead_letters_dropped`.
        """
        if count <= 0:
            return Counter()
        dropped, dead = self._drop_through(
            "SELECT position FROM (SELECT position FROM events UNION ALL"
            " SELECT position FROM dead_letters) ORDER BY position LIMIT 1 OFFSET ?",
            (count - 1,),
        )
        if not dropped and not dead:  # fewer than `count`: all of them
            dropped, dead = self._drop_through(
                "SELECT MAX(position) FROM (SELECT MAX(position) AS position FROM events"
                " UNION ALL SELECT MAX(position) FROM dead_letters)",
                (),
            )
        return dropped

    def drop_older_than(self, max_age: float) -> Counter[str]:
        """Delete the events (and dead letters) accepted more than ``max_age`` seconds ago
        on the age clock; return the events deleted per source.

        Ages are measured on a clock the wall clock's steps do not move
        (agent/clock.py), so NTP fixing a device's time never expires a
        backlog. A mark (P, C) says every event up to position P was accepted
        by clock C; one is written about once a minute, so an event may live
        up to about a minute past ``max_age``, never less than it.
        """
        cutoff = self.clock.now() - max_age
        row = self.conn.execute(
            "SELECT MAX(position) FROM age_marks WHERE clock <= ?", (cutoff,)
        ).fetchone()
        if row[0] is None:
            return Counter()
        # Dead letters go with the events accepted as long ago (by their place in the queue).
        return self._drop_through("SELECT ?", (row[0],))[0]

    def forget_age_marks(self) -> None:
        """Delete the age marks that cover only events and dead letters already gone."""
        try:
            self.conn.execute(
                "DELETE FROM age_marks WHERE position < (SELECT COALESCE(MIN(position), 1e18)"
                " FROM (SELECT MIN(position) AS position FROM events"
                " UNION ALL SELECT MIN(position) FROM dead_letters))"
            )
        except sqlite3.Error as exc:
            log.debug("old age marks not deleted: %s", exc)

    def checkpoint_wal(self) -> None:
        """Copy the WAL into the database and cut it to zero bytes, if no reader is in the way."""
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            log.debug("WAL checkpoint skipped: %s", exc)

    def _drop_through(self, position_query: str, args: tuple) -> tuple[Counter[str], Counter[str]]:
        """Delete events and dead letters up to the position the query gives.

        Returns (events deleted per source, dead letters deleted per sink); the
        latter are also added to :attr:`dead_letters_dropped`.
        """
        counts: Counter[str] = Counter()
        dead: Counter[str] = Counter()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            row = self.conn.execute(position_query, args).fetchone()
            if row is None or row[0] is None:
                self.conn.execute("COMMIT")
                return counts, dead
            counts.update(
                dict(
                    self.conn.execute(
                        "SELECT source, COUNT(*) FROM events WHERE position <= ? GROUP BY source",
                        (row[0],),
                    ).fetchall()
                )
            )
            holes = self._holes
            if holes:
                low, high = _span(self.conn)
                count = high - low + 1 - holes
            self.conn.execute("DELETE FROM events WHERE position <= ?", (row[0],))
            if holes:
                holes, _ = self._holes_left(count - sum(counts.values()), self._holes_through)
            dead.update(
                dict(
                    self.conn.execute(
                        "SELECT sink, COUNT(*) FROM dead_letters WHERE position <= ? GROUP BY sink",
                        (row[0],),
                    ).fetchall()
                )
            )
            self.conn.execute("DELETE FROM dead_letters WHERE position <= ?", (row[0],))
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise QueueError(f"cannot drop old events: {exc}") from exc
        if not holes:
            self._holes = self._holes_through = 0
        else:
            self._holes = holes
        self.dead_letters_dropped.update(dead)
        if counts or dead:
            self.store.dropped_through = max(self.store.dropped_through, row[0])
        return counts, dead

    def vacuum_step(self, min_free_pages: int, step_pages: int, keep_bytes: int = 0) -> None:
        """Give up to ``step_pages`` free pages back to the filesystem, once enough are free.

        Small steps, so a large drained backlog shrinks the file without
        stalling inserts; ``keep_bytes`` worth of free pages are kept for
        events expected soon.
        """
        free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        page_size = self.conn.execute("PRAGMA page_size").fetchone()[0]
        free -= keep_bytes // page_size
        if free < min_free_pages:
            return
        step_pages = min(step_pages, free)
        try:
            # executescript steps the pragma to the end; execute() frees one page only.
            self.conn.executescript(f"PRAGMA incremental_vacuum({int(step_pages)});")
        except sqlite3.Error as exc:
            log.debug("incremental vacuum skipped: %s", exc)

    def _rollback(self) -> None:
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def close(self) -> None:
        self.conn.close()


class SinkCursor:
    """One sink's view of the queue: what it has confirmed, and what comes next.

    Owned by that sink's forwarder thread.
    """

    def __init__(
        self, store: QueueStore, sink: str, agent_id: str, route: Route = EVERYTHING
    ) -> None:
        #: The events this sink wants (agent/routing.py); it never reads the others.
        self.route = route
        #: After :meth:`read`: the position up to which the queue was looked through;
        #: every event this sink wants up to it was in what read returned.
        self.seen_through = 0
        # A cursor lost to a power cut only means events are sent again (at
        # least once), so its commits skip the fsync: in WAL mode the next
        # synchronous=FULL commit of events makes them durable anyway.
        self.conn = store.connect(sync="normal")
        self.sink = sink
        self.agent_id = agent_id
        # A sink seen for the first time starts at the oldest event still queued.
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute(
            "INSERT OR IGNORE INTO sink_cursors (sink, position)"
            " VALUES (?, (SELECT IFNULL(MIN(position), (SELECT IFNULL(MAX(seq), 0)"
            " FROM sqlite_sequence WHERE name = 'events') + 1) - 1 FROM events))",
            (sink,),
        )
        self.conn.execute("COMMIT")
        self.position: int = self.conn.execute(
            "SELECT position FROM sink_cursors WHERE sink = ?", (sink,)
        ).fetchone()[0]
        self._saved = self.position
        self._flushed_at = 0.0

    def read(self, after: int, limit: int) -> list[QueuedEvent]:
        """Up to ``limit`` events this sink wants after position ``after``, in queue order.

        Sets :attr:`seen_through`: the last event's position, or, when fewer than
        ``limit`` came, the newest position queued (events between that the sink
        does not want are passed over with them).
        """
        if self.route.everything:
            rows = self.conn.execute(
                "SELECT position, id, source, type, time, subject, sequence, data, attributes"
                " FROM events"
                " WHERE position > ? ORDER BY position LIMIT ?",
                (after, limit),
            ).fetchall()
            self.seen_through = rows[-1][0] if rows else after
        else:
            # The newest position first: an event committed after it has a higher one.
            high = self.conn.execute("SELECT MAX(position) FROM events").fetchone()[0] or after
            clause, args = self.route.sql()
            rows = self.conn.execute(
                "SELECT position, id, source, type, time, subject, sequence, data, attributes"
                " FROM events"
                f" WHERE position > ? AND position <= ? AND {clause} ORDER BY position LIMIT ?",
                [after, high, *args, limit],
            ).fetchall()
            self.seen_through = rows[-1][0] if len(rows) >= limit else max(high, after)
        agent_id = self.agent_id
        return [QueuedEvent(*row[:8], agent_id=agent_id, attributes_json=row[8]) for row in rows]

    def advance(self, position: int, *, flush_after: float = 0.0) -> None:
        """Every event up to ``position`` is confirmed by this sink.

        The position is written to disk at once, or, with ``flush_after``, at
        most that often (seconds): each write takes the database's write lock
        from the writer, and a position lost to a crash only means events
        are sent again. Call :meth:`flush` before closing.
        """
        if position > self.position:
            self.position = position
        if time.monotonic() - self._flushed_at >= flush_after:
            self.flush()

    def flush(self) -> bool:
        """Write the confirmed position to disk if it moved; take a purge made meanwhile.

        ``edge-agent queue purge`` moves a cursor forward in the database; the
        position never moves back, and the forwarder skips what was purged.
        Returns whether a new position was written. Raises QueueError.
        """
        if self.position == self._saved and time.monotonic() - self._flushed_at < 1.0:
            return False
        moved = self.position != self._saved
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute(
                "UPDATE sink_cursors SET position = MAX(position, ?) WHERE sink = ?",
                (self.position, self.sink),
            )
            stored = self.conn.execute(
                "SELECT position FROM sink_cursors WHERE sink = ?", (self.sink,)
            ).fetchone()[0]
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise QueueError(f"cannot record confirmations of sink {self.sink}: {exc}") from exc
        self.position = self._saved = max(self.position, stored)
        self._flushed_at = time.monotonic()
        return moved

    def backlog(self) -> int:
        """Events this sink wants and has not confirmed yet (index look-ups only, unless
        the sink selects events or others left holes behind it)."""
        return _backlog(self.conn, self.position, self.route, _span(self.conn), _holes(self.conn))

    def close(self) -> None:
        self.conn.close()


def _routed_backlog(
    conn: sqlite3.Connection, start: int, high: int, route: Route, blocks: dict[int, int]
) -> int:
    """A selecting sink's events in positions [start, high], counted by blocks of
    COUNT_BLOCK positions; a whole block above the sink's cursor and below the newest
    event is counted once and kept in ``blocks``.

    Such a block never changes while the sink's cursor is below it: new events
    come above the newest one, a confirmation deletes only what this sink is
    past or does not want, and the bounds drop from the oldest on (the block
    with the oldest event, like the one with the cursor, is counted each time).
    A status every few seconds then reads a few blocks, not a backlog of millions.
    """
    clause, args = route.sql()
    sql = f"SELECT COUNT(*) FROM events WHERE position >= ? AND position <= ? AND {clause}"
    first, last = start // COUNT_BLOCK, high // COUNT_BLOCK
    for gone in [b for b in blocks if b <= first]:
        del blocks[gone]
    total = 0
    for block in range(first, last + 1):
        lo, hi = block * COUNT_BLOCK, block * COUNT_BLOCK + COUNT_BLOCK - 1
        if block in (first, last):
            total += conn.execute(sql, [max(lo, start), min(hi, high), *args]).fetchone()[0]
            continue
        if block not in blocks:
            blocks[block] = conn.execute(sql, [lo, hi, *args]).fetchone()[0]
        total += blocks[block]
    return total


def read_checkpoints(store: QueueStore, source: str) -> dict[str, str]:
    """The committed checkpoint values of one source instance."""
    conn = store.connect()
    try:
        rows = conn.execute(
            "SELECT key, value FROM checkpoints WHERE source = ? AND key != ?",
            (source, INSTANCE_KEY),
        )
        return dict(rows.fetchall())
    finally:
        conn.close()


def move_checkpoints(store: QueueStore, old: str, new: str) -> tuple[int, int]:
    """Give source ``new`` the checkpoints of source ``old``, in one transaction.

    Call it only while neither instance runs (the writer commits no rows of
    either meanwhile). Checkpoints ``new`` already had are replaced. Returns
    (moved, replaced), not counting the instance record.
    """
    conn = store.connect()
    try:
        conn.execute("BEGIN IMMEDIATE")
        replaced = conn.execute(
            "DELETE FROM checkpoints WHERE source = ? AND key != ?", (new, INSTANCE_KEY)
        ).rowcount
        conn.execute("DELETE FROM checkpoints WHERE source = ?", (new,))
        moved = conn.execute(
            "UPDATE checkpoints SET source = ? WHERE source = ? AND key != ?",
            (new, old, INSTANCE_KEY),
        ).rowcount
        conn.execute("DELETE FROM checkpoints WHERE source = ?", (old,))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise QueueError(
            f"cannot move the checkpoints of source {old} to {new} in {store.path}: {exc}"
        ) from exc
    finally:
        conn.close()
    return moved, replaced


def checkpoint_owners(store: QueueStore) -> dict[str, tuple[int, str | None]]:
    """Every source name with rows in the checkpoints table: (how many checkpoints, the
    instance record it last ran with, see :data:`INSTANCE_KEY`)."""
    conn = store.connect()
    try:
        rows = conn.execute(
            "SELECT source, SUM(key != ?), MAX(CASE WHEN key = ? THEN value END)"
            " FROM checkpoints GROUP BY source",
            (INSTANCE_KEY, INSTANCE_KEY),
        ).fetchall()
    except sqlite3.Error as exc:
        raise QueueError(f"cannot read the checkpoints in {store.path}: {exc}") from exc
    finally:
        conn.close()
    return {source: (count, record) for source, count, record in rows}


def salvage_stats(path: str) -> dict[str, Any]:
    """What can still be read of a damaged queue file: events, oldest, newest.

    For the ``queue.gap`` event that reports it. Reads the file read-only and
    gives up quietly on what it cannot read (the file is damaged).
    """
    found: dict[str, Any] = {}
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return found
    try:
        with contextlib.suppress(sqlite3.Error):
            found["sequences"] = dict(conn.execute("SELECT source, last FROM source_sequences"))
        with contextlib.suppress(sqlite3.Error):
            stats = _read_stats(conn)
            found.update(events=stats.events, oldest=stats.oldest_time, newest=stats.newest_time)
    finally:
        conn.close()
    return found


def iter_checkpoints(store: QueueStore, source: str, prefix: str) -> Iterator[tuple[str, str]]:
    """One source's checkpoints whose key starts with ``prefix``, in key order (by code
    point), read in pages from an index range: a large set never sits in memory at once."""
    conn = store.connect()
    try:
        upper = _after_prefix(prefix)
        if upper is None:
            cursor = conn.execute(
                "SELECT key, value FROM checkpoints WHERE source = ? AND key >= ?"
                " AND substr(key, 1, ?) = ? AND key != ? ORDER BY key",
                (source, prefix, len(prefix), prefix, INSTANCE_KEY),
            )
        else:
            cursor = conn.execute(
                "SELECT key, value FROM checkpoints WHERE source = ? AND key >= ? AND key < ?"
                " AND key != ? ORDER BY key",
                (source, prefix, upper, INSTANCE_KEY),
            )
        while rows := cursor.fetchmany(1000):
            yield from rows
    finally:
        conn.close()


def _after_prefix(prefix: str) -> str | None:
    """The smallest text above every text starting with ``prefix`` (None: no upper bound
    is cheap to write, for an empty prefix or one ending in the last code points)."""
    if not prefix:
        return None
    last = ord(prefix[-1]) + 1
    if last > 0x10FFFF or 0xD800 <= last <= 0xDFFF:
        return None
    return prefix[:-1] + chr(last)


def read_stats(store: QueueStore, routes: Mapping[str, Route] | None = None) -> QueueStats:
    """Counts for ``queue stats`` and ``status``; opens and closes its own connection.

    Each sink's backlog counts the events it wants (``routes``: the selection
    of each sink that selects some; the others want all). Index look-ups
    only for a sink that wants everything, so it stays cheap with millions of
    events queued; a sink that selects has its events counted.
    """
    conn = store.connect()
    try:
        return _read_stats(conn, routes, store.path)
    except sqlite3.Error as exc:
        raise QueueError(f"cannot read the queue {store.path}: {exc}") from exc
    finally:
        conn.close()


def _read_stats(
    conn: sqlite3.Connection, routes: Mapping[str, Route] | None = None, path: str = ""
) -> QueueStats:
    routes = routes or {}
    low, high = _span(conn)
    holes = _holes(conn)
    try:
        dead = dead_letters.counts(conn)
    except sqlite3.OperationalError:  # a damaged file of a version before dead letters
        dead = {}
    if low is None:
        backlog = {sink: 0 for (sink,) in conn.execute("SELECT sink FROM sink_cursors")}
        return QueueStats(0, None, None, backlog, dead)
    time_at = "SELECT time FROM events WHERE position = ?"
    oldest = conn.execute(time_at, (low,)).fetchone()[0]
    newest = conn.execute(time_at, (high,)).fetchone()[0]
    backlog = {}
    for sink, position in conn.execute("SELECT sink, position FROM sink_cursors").fetchall():
        route = routes.get(sink, EVERYTHING)
        with _block_counts_lock:
            blocks = None
            if path:
                kept = _block_counts.get((path, sink))
                if kept is None or kept[0] != route:
                    kept = _block_counts[(path, sink)] = (route, {})
                blocks = kept[1]
            backlog[sink] = _backlog(conn, position, route, (low, high), holes, blocks)
    return QueueStats(high - low + 1 - holes[0], oldest, newest, backlog, dead)


def peek(
    store: QueueStore,
    count: int,
    agent_id: str,
    sink: str | None = None,
    route: Route = EVERYTHING,
) -> list[QueuedEvent]:
    """The ``count`` oldest queued events; with ``sink``, the oldest that sink wants
    (``route``) and has not confirmed yet."""
    clause, args = route.sql()
    conn = store.connect()
    try:
        after = 0
        if sink is not None:
            row = conn.execute(
                "SELECT position FROM sink_cursors WHERE sink = ?", (sink,)
            ).fetchone()
            after = 0 if row is None else row[0]
        rows = conn.execute(
            "SELECT position, id, source, type, time, subject, sequence, data, attributes"
            " FROM events"
            f" WHERE position > ? AND {clause} ORDER BY position LIMIT ?",
            [after, *args, count],
        ).fetchall()
    finally:
        conn.close()
    return [QueuedEvent(*row[:8], agent_id=agent_id, attributes_json=row[8]) for row in rows]


def purge_plan(
    store: QueueStore, sink: str, before: str, route: Route = EVERYTHING
) -> tuple[int, int]:
    """(events a purge would take from ``sink``'s backlog, the position it would move to).

    Only a prefix is purged: events up to the last one, in queue order, whose
    ``time`` is before ``before`` (RFC 3339, UTC) with none younger in between.
    Only the events the sink wants (``route``) are looked at and counted.
    """
    clause, args = route.sql()
    conn = store.connect()
    try:
        row = conn.execute("SELECT position FROM sink_cursors WHERE sink = ?", (sink,)).fetchone()
        if row is None:
            raise QueueError(f"the queue has no sink named {sink!r}")
        cursor = row[0]
        through = cursor
        for position, event_time in conn.execute(
            f"SELECT position, time FROM events WHERE position > ? AND {clause} ORDER BY position",
            [cursor, *args],
        ):
            if event_time >= before:
                break
            through = position
        taken = conn.execute(
            f"SELECT COUNT(*) FROM events WHERE position > ? AND position <= ? AND {clause}",
            [cursor, through, *args],
        ).fetchone()[0]
    finally:
        conn.close()
    return taken, through


def purge(store: QueueStore, sink: str, through: int) -> None:
    """Count every event up to ``through`` as confirmed by ``sink`` (never moves back)."""
    conn = store.connect()
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "UPDATE sink_cursors SET position = MAX(position, ?) WHERE sink = ?", (through, sink)
        )
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise QueueError(f"cannot purge: {exc}") from exc
    finally:
        conn.close()


def count_events(path: str) -> int:
    """Events in the queue file at ``path`` (0 if it does not exist yet), read-only."""
    if not os.path.exists(path):
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        low, high = _span(conn)
        return 0 if low is None else high - low + 1 - _holes(conn)[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()
