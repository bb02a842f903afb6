"""The queue file itself: commits, sequences, cursors, deletion."""

from __future__ import annotations

import uuid

from edge_agent.event import Event, new_event_id
from edge_agent.queue import (
    QueueStore,
    QueueWriter,
    SinkCursor,
    count_events,
    iter_checkpoints,
    read_stats,
)


def events(source: str, count: int) -> list[tuple[Event, str]]:
    return [
        (Event(type="test.tick", source=source, data={"i": i}), f'{{"i":{i}}}')
        for i in range(count)
    ]


def test_event_ids_are_uuid7_and_sort_in_creation_order():
    ids = [new_event_id() for _ in range(10_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert {uuid.UUID(i).version for i in ids} == {7}


def test_durability_settings_are_set_on_every_connection(tmp_path):
    for sync, level in (("full", 2), ("normal", 1)):
        store = QueueStore(str(tmp_path / sync), sync=sync)
        store.open()
        conn = store.connect()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == level
        conn.close()


def test_sequences_count_per_source_and_survive_a_restart(tmp_path):
    store = QueueStore(str(tmp_path))
    store.open()
    writer = QueueWriter(store)
    writer.append(events("a", 3) + events("b", 2))
    writer.close()
    writer = QueueWriter(store)  # as after a restart
    writer.append(events("a", 1))
    writer.close()
    cursor = SinkCursor(store, "s", "gw")
    got = [(e.source, e.sequence) for e in cursor.read(0, 100)]
    assert got == [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("a", 4)]


def test_confirmed_events_are_deleted_only_when_every_sink_confirmed(tmp_path):
    store = QueueStore(str(tmp_path))
    store.open()
    writer = QueueWriter(store)
    one, two = SinkCursor(store, "one", "gw"), SinkCursor(store, "two", "gw")
    for _ in range(5):
        writer.append(events("a", 2))  # five commits of two: rows are deleted whole
    batch = one.read(one.position, 100)
    one.advance(batch[-1].position)
    assert writer.delete_confirmed(["one", "two"]) == 0
    two.advance(two.read(two.position, 4)[-1].position)
    assert writer.delete_confirmed(["one", "two"]) == 4
    stats = read_stats(store)
    assert stats.events == 6
    assert stats.sink_backlog == {"one": 0, "two": 6}
    # The deletion really committed: another connection sees it.
    assert count_events(store.path) == 6
    # Deletes skip the fsync (a lost one only means a resend); commits of events
    # on the same connection are back to synchronous=FULL (2) afterwards.
    assert writer.conn.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_a_partly_confirmed_commit_loses_exactly_its_confirmed_part(tmp_path):
    store = QueueStore(str(tmp_path))
    store.open()
    writer = QueueWriter(store)
    cursor = SinkCursor(store, "s", "gw")
    writer.append(events("a", 10))
    cursor.advance(cursor.read(cursor.position, 7)[-1].position)
    assert writer.delete_confirmed(["s"]) == 7
    assert [e.sequence for e in cursor.read(cursor.position, 100)] == [8, 9, 10]
    assert count_events(store.path) == 3
    cursor.advance(10)
    assert writer.delete_confirmed(["s"]) == 3
    assert count_events(store.path) == 0


def test_reads_cross_commits_and_respect_the_limit(tmp_path):
    store = QueueStore(str(tmp_path))
    store.open()
    writer = QueueWriter(store)
    for size in (3, 1, 4):
        writer.append(events("a", size))
    cursor = SinkCursor(store, "s", "gw")
    assert [e.position for e in cursor.read(0, 5)] == [1, 2, 3, 4, 5]
    assert [e.position for e in cursor.read(2, 3)] == [3, 4, 5]
    assert [e.position for e in cursor.read(5, 100)] == [6, 7, 8]
    assert cursor.read(8, 100) == []


def test_a_new_sink_starts_with_what_is_still_queued(tmp_path):
    store = QueueStore(str(tmp_path))
    store.open()
    writer = QueueWriter(store)
    old = SinkCursor(store, "old", "gw")
    for _ in range(5):
        writer.append(events("a", 1))
    old.advance(old.read(old.position, 2)[-1].position)
    writer.delete_confirmed(["old"])
    new = SinkCursor(store, "new", "gw")
    assert [e.sequence for e in new.read(new.position, 100)] == [3, 4, 5]
    # A sink added to an empty queue does not go back to deleted events.
    old.advance(5)
    writer.delete_confirmed(["old", "new"])
    new.advance(5)
    writer.delete_confirmed(["old", "new"])
    latest = SinkCursor(store, "latest", "gw")
    assert latest.read(latest.position, 100) == []
    writer.append(events("a", 1))
    assert [e.sequence for e in latest.read(latest.position, 100)] == [6]


def test_cloudevent_json_holds_the_stored_data_unchanged(tmp_path):
    store = QueueStore(str(tmp_path))
    store.open()
    writer = QueueWriter(store)
    event = Event(
        type="file.created", source="inbox", data={"path": "/x/ü.csv"}, subject="/x/ü.csv"
    )
    writer.append([(event, '{"path":"/x/ü.csv"}')])
    queued = SinkCursor(store, "s", "gw-01").read(0, 1)[0]
    import json

    body = json.loads(queued.to_cloudevent_json())
    assert body == {
        "specversion": "1.0",
        "id": event.id,
        "source": "edge-agent://gw-01/inbox",
        "type": "file.created",
        "time": event.time,
        "sequence": "00000000000000000001",
        "datacontenttype": "application/json",
        "subject": "/x/ü.csv",
        "data": {"path": "/x/ü.csv"},
    }


def test_event_times_are_kept_in_one_form():
    from edge_agent.event import canonical_time

    assert canonical_time("2026-11-26T23:59:01.123456Z") == "2026-11-26T23:59:01.123456Z"
    assert canonical_time("2026-11-26T23:59:01Z") == "2026-11-26T23:59:01.000000Z"
    assert canonical_time("2026-11-27T01:59:01+02:00") == "2026-11-26T23:59:01.000000Z"
    import pytest

    with pytest.raises(ValueError, match="RFC 3339"):
        canonical_time("yesterday")


def test_a_commit_of_events_is_never_left_at_synchronous_normal(tmp_path):
    store = QueueStore(str(tmp_path))
    store.open()
    writer = QueueWriter(store)
    writer.append(events("a", 2))
    assert writer.delete_confirmed(["nobody"]) == 0  # the early way out restores it too
    assert writer.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    # As if restoring after a delete had failed: the next commit puts FULL back first.
    writer.conn.execute("PRAGMA synchronous = NORMAL")
    writer._relaxed = True
    writer.append(events("a", 1))
    assert writer.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert count_events(store.path) == 3


def test_a_checkpoint_range_is_read_in_key_order_and_only_that_range(tmp_path):
    store = QueueStore(str(tmp_path))
    store.open()
    writer = QueueWriter(store)
    keys = ['["/a","x"]', '["/a","b"]', '["/a/b","c"]', '["/a-b","d"]', "other", "\U0010ffff"]
    writer.append([], [("src", key, key.upper()) for key in keys] + [("other", '["/a","z"]', "1")])
    writer.close()
    assert list(iter_checkpoints(store, "src", '["/a","')) == [
        ('["/a","b"]', '["/A","B"]'),
        ('["/a","x"]', '["/A","X"]'),
    ]
    assert [key for key, _ in iter_checkpoints(store, "src", "")] == sorted(keys)
    assert [key for key, _ in iter_checkpoints(store, "src", "\U0010ffff")] == ["\U0010ffff"]
