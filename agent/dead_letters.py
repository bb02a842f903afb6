"""Dead letters: events a sink can never deliver, set aside so the events behind them flow.

An event is dead for one sink only: the sink's cursor moves over it (as if
confirmed) and a copy goes to the ``dead_letters`` table with the sink, the
reason, the attempts and the time. The event itself stays in ``events`` until
every other sink has confirmed it or set it aside too; the copy outlives it.

Operators list, retry and purge dead letters (``edge-agent queue dead``). A
retry marks the copy; the sink's forwarder then sends it ahead of its other
events (it looks at start, and about once a second). Confirmed, it is
deleted; refused again, it is set aside again.

Dead letters count against the queue's bounds (``max_events``, ``max_bytes``)
and are dropped oldest first with the events (see :mod:`edge_agent.bounds`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from edge_agent.errors import QueueError
from edge_agent.event import QueuedEvent
from edge_agent.routing import EVERYTHING, Route

_COLUMNS = "sink, position, id, source, type, time, subject, sequence, data, reason, attempts,"
_COLUMNS += " dead_at, retry, attributes"


@dataclass(frozen=True)
class DeadLetter:
    """One event set aside for one sink."""

    sink: str
    position: int
    id: str
    source: str
    type: str
    time: str
    subject: str | None
    sequence: int
    data_json: str
    reason: str
    attempts: int
    dead_at: str
    retry: bool
    #: More CloudEvents attributes, as JSON (see :attr:`edge_agent.event.Event.attributes`).
    attributes_json: str | None = None

    def event(self, agent_id: str) -> QueuedEvent:
        """The event as the sink receives it (its position is its old place in the queue)."""
        return QueuedEvent(
            self.position,
            self.id,
            self.source,
            self.type,
            self.time,
            self.subject,
            self.sequence,
            self.data_json,
            agent_id=agent_id,
            attributes_json=self.attributes_json,
        )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def set_aside(
    conn: sqlite3.Connection, sink: str, dead: Sequence[tuple[QueuedEvent, str, int]]
) -> None:
    """Copy events (each with its reason and attempts) to the dead letters of ``sink``.

    An event set aside again (a retry that failed) keeps one row: its attempts
    add up, and the reason and time are the latest. Raises QueueError.
    """
    now = _now()
    rows = [
        (sink, e.position, e.id, e.source, e.type, e.time, e.subject, e.sequence, e.data_json,
         reason, attempts, now, e.attributes_json)
        for e, reason, attempts in dead
    ]  # fmt: skip
    _write(
        conn,
        f"INSERT INTO dead_letters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)"
        " ON CONFLICT (sink, position) DO UPDATE SET reason = excluded.reason,"
        " attempts = dead_letters.attempts + excluded.attempts, dead_at = excluded.dead_at,"
        " retry = 0",
        rows,
    )


def retries(
    conn: sqlite3.Connection, sink: str, agent_id: str, limit: int, route: Route = EVERYTHING
) -> list[QueuedEvent]:
    """Dead letters of ``sink`` an operator asked to send again, oldest first; only those
    the sink still wants (``route``: its selection may have changed since)."""
    clause, args = route.sql()
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM dead_letters WHERE sink = ? AND retry = 1 AND {clause}"
        " ORDER BY position LIMIT ?",
        [sink, *args, limit],
    ).fetchall()
    return [DeadLetter(*row).event(agent_id) for row in rows]


def delivered(conn: sqlite3.Connection, sink: str, positions: Iterable[int]) -> None:
    """Retried dead letters that ``sink`` has now confirmed: gone. Raises QueueError."""
    _write(
        conn,
        "DELETE FROM dead_letters WHERE sink = ? AND position = ?",
        [(sink, p) for p in positions],
    )


def _write(conn: sqlite3.Connection, sql: str, rows: list[tuple]) -> None:
    if not rows:
        return
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, rows)
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise QueueError(f"cannot write dead letters: {exc}") from exc


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Dead letters per sink."""
    return dict(conn.execute("SELECT sink, COUNT(*) FROM dead_letters GROUP BY sink").fetchall())


def _where(sink: str | None, before: str | None, ids: Sequence[str] = ()) -> tuple[str, list]:
    clauses, args = [], []
    if sink is not None:
        clauses.append("sink = ?")
        args.append(sink)
    if before is not None:
        clauses.append("dead_at < ?")
        args.append(before)
    if ids:
        clauses.append(f"id IN ({','.join('?' * len(ids))})")
        args += list(ids)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def listing(
    conn: sqlite3.Connection, sink: str | None = None, limit: int | None = None
) -> list[DeadLetter]:
    """Dead letters (of ``sink``, or all), oldest first."""
    where, args = _where(sink, None)
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM dead_letters{where} ORDER BY position, sink LIMIT ?",
        [*args, -1 if limit is None else limit],
    ).fetchall()
    return [DeadLetter(*row[:-2], retry=bool(row[-2]), attributes_json=row[-1]) for row in rows]


def request_retry(
    conn: sqlite3.Connection, sink: str | None = None, ids: Sequence[str] = ()
) -> int:
    """Mark dead letters (of ``sink``, with these event ``ids``, or all) to be sent again.

    The sink's forwarder sends them first (it looks at start, and about once
    a second). Returns how many were marked. Raises QueueError.
    """
    where, args = _where(sink, None, ids)
    try:
        conn.execute("BEGIN IMMEDIATE")
        marked = conn.execute(
            f"UPDATE dead_letters SET retry = 1{where}{' AND' if where else ' WHERE'} retry = 0",
            args,
        ).rowcount
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise QueueError(f"cannot mark dead letters for a retry: {exc}") from exc
    return marked


def purge_count(conn: sqlite3.Connection, sink: str | None, before: str | None) -> int:
    """How many dead letters :func:`purge` would delete."""
    where, args = _where(sink, before)
    return conn.execute(f"SELECT COUNT(*) FROM dead_letters{where}", args).fetchone()[0]


def purge(conn: sqlite3.Connection, sink: str | None, before: str | None) -> int:
    """Delete dead letters (of ``sink``, set aside before ``before``, or all); how many."""
    where, args = _where(sink, before)
    try:
        conn.execute("BEGIN IMMEDIATE")
        deleted = conn.execute(f"DELETE FROM dead_letters{where}", args).rowcount
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise QueueError(f"cannot purge dead letters: {exc}") from exc
    return deleted
