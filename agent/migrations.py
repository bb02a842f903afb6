"""The queue database schema, as named migration steps.

Steps are never edited once released: a change to the schema is a new step.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("edge_agent.queue")


@migrations()
def m001_queue(db: Database) -> None:
    # AUTOINCREMENT so a position is never reused after deletes: sink cursors
    # compare positions, and a reused one would skip or repeat events.
    db.execute(
        """
        CREATE TABLE events (
            position INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL,
            source TEXT NOT NULL,
            type TEXT NOT NULL,
            time TEXT NOT NULL,
            subject TEXT,
            sequence INTEGER NOT NULL,
            data TEXT NOT NULL
        )
        """
    )
    # The last sequence number given per source, so numbering survives restarts
    # and the deletion of every event of that source.
    db.execute("CREATE TABLE source_sequences (source TEXT PRIMARY KEY, last INTEGER NOT NULL)")
    # Per sink: every event at or below this position is confirmed by the sink.
    db.execute("CREATE TABLE sink_cursors (sink TEXT PRIMARY KEY, position INTEGER NOT NULL)")
    # Source checkpoints (a tailed file's offset), written in the same
    # transaction as the events they produced.
    db.execute(
        """
        CREATE TABLE checkpoints (
            source TEXT NOT NULL,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (source, key)
        )
        """
    )


@migrations()
def m002_age_clock(db: Database) -> None:
    # max_age is measured on a clock that never steps (agent/clock.py): its
    # offset for this boot, and marks "event at position P was accepted at
    # clock C", written about once a minute, that expiry compares against.
    db.execute(
        """
        CREATE TABLE age_clock (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            boot_id TEXT NOT NULL,
            offset REAL NOT NULL,
            last REAL NOT NULL
        )
        """
    )
    db.execute("CREATE TABLE age_marks (position INTEGER PRIMARY KEY, clock REAL NOT NULL)")


@migrations()
def m003_dead_letters(db: Database) -> None:
    # Events a sink could never deliver, set aside per sink so the events behind
    # them flow. A copy of the event, so it outlives the event's deletion from
    # `events` (once every other sink has it) and can be retried later.
    # `retry` = 1: an operator asked to send it again; the sink's forwarder
    # sends it ahead of its other events.
    db.execute(
        """
        CREATE TABLE dead_letters (
            sink TEXT NOT NULL,
            position INTEGER NOT NULL,
            id TEXT NOT NULL,
            source TEXT NOT NULL,
            type TEXT NOT NULL,
            time TEXT NOT NULL,
            subject TEXT,
            sequence INTEGER NOT NULL,
            data TEXT NOT NULL,
            reason TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            dead_at TEXT NOT NULL,
            retry INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (sink, position)
        )
        """
    )
    # Bounds drop the oldest first, by position, across events and dead letters.
    db.execute("CREATE INDEX dead_letters_position ON dead_letters (position)")


@migrations()
def m005_event_attributes(db: Database) -> None:
    # More CloudEvents attributes of an event, as JSON (NULL: none): those of an
    # event that came from elsewhere (an MQTT message that was a CloudEvent
    # already), its content type, extensions. See agent.event.Event.attributes.
    db.execute("ALTER TABLE events ADD COLUMN attributes TEXT")
    db.execute("ALTER TABLE dead_letters ADD COLUMN attributes TEXT")
