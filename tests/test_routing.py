"""Routing at the queue: which sink reads, counts and holds which events, and deletion."""

from __future__ import annotations

import fnmatch
import itertools

import pytest

from edge_agent import dead_letters
from edge_agent.event import Event
from edge_agent.queue import (
    QueueStore,
    QueueWriter,
    SinkCursor,
    count_events,
    peek,
    purge_plan,
    read_stats,
)
from edge_agent.routing import EVERYTHING, Route, parse_route

FILES = Route(types=("file.*",))
MQTT = Route(types=("mqtt.*",))


def events(source: str, type: str, count: int) -> list[tuple[Event, str]]:
    return [(Event(type=type, source=source, data={"i": i}), f'{{"i":{i}}}') for i in range(count)]


def drain(cursor: SinkCursor) -> list[str]:
    """Read and confirm all a cursor's sink wants, as a forwarder does; the types read."""
    seen = []
    while True:
        batch = cursor.read(cursor.position, 7)
        seen += [e.type for e in batch]
        cursor.advance(cursor.seen_through)
        if not batch:
            return seen


def remaining(store: QueueStore) -> list[tuple[str, int]]:
    conn = store.connect()
    try:
        return conn.execute("SELECT type, sequence FROM events ORDER BY position").fetchall()
    finally:
        conn.close()


@pytest.fixture
def store(tmp_path):
    store = QueueStore(str(tmp_path))
    store.open()
    return store


def test_a_sink_reads_and_counts_only_the_events_it_selects(store):
    writer = QueueWriter(store)
    files = SinkCursor(store, "files", "gw", FILES)
    sensors = SinkCursor(store, "sensors", "gw", Route(sources=("sensor?",)))
    writer.append(events("sensor1", "mqtt.message", 5) + events("inbox", "file.created", 2))
    writer.append(events("sensor22", "mqtt.message", 3) + events("inbox", "file.deleted", 1))
    routes = {"files": FILES, "sensors": sensors.route, "all": EVERYTHING}
    all_ = SinkCursor(store, "all", "gw")
    stats = read_stats(store, routes)
    assert stats.events == 11
    assert stats.sink_backlog == {"files": 3, "sensors": 5, "all": 11}
    assert files.backlog() == 3 and sensors.backlog() == 5 and all_.backlog() == 11
    assert drain(files) == ["file.created", "file.created", "file.deleted"]
    assert drain(sensors) == ["mqtt.message"] * 5
    # Having passed over what it does not want, a sink's cursor is at the newest event.
    assert files.position == sensors.position == 11
    assert read_stats(store, routes).sink_backlog == {"files": 0, "sensors": 0, "all": 11}
    assert [e.type for e in peek(store, 2, "gw", "files", FILES)] == []
    assert len(peek(store, 20, "gw")) == 11


def test_an_offline_sink_holds_only_the_events_it_wants(store):
    """Sink `files` selects file.* and never confirms; `cloud` wants all and confirms all:
    everything but the file events goes, however far behind `files`' cursor is."""
    writer = QueueWriter(store)
    sinks = ["cloud", "files"]
    routes = {"cloud": EVERYTHING, "files": FILES}
    cloud = SinkCursor(store, "cloud", "gw")
    SinkCursor(store, "files", "gw", FILES)  # offline from the start: cursor at 0
    for round_ in range(20):
        writer.append(events("mq", "mqtt.message", 50))
        if round_ % 5 == 0:
            writer.append(events("inbox", "file.created", 1))
        drain(cloud)
        writer.delete_confirmed(sinks, routes)
    # The newest event stays until a later pass (so positions can be counted).
    files = [("file.created", n) for n in (1, 2, 3, 4)]
    assert remaining(store) == [*files, ("mqtt.message", 1000)]
    writer.append(events("mq", "mqtt.message", 1))
    drain(cloud)
    writer.delete_confirmed(sinks, routes)
    assert [t for t, _ in remaining(store)] == ["file.created"] * 4 + ["mqtt.message"]
    stats = read_stats(store, routes)
    assert stats.events == count_events(store.path) == 5
    assert stats.sink_backlog == {"cloud": 0, "files": 4}
    usage = writer.usage()
    assert usage.events == 5
    # `files` comes back: it gets its four events, then the queue is empty.
    back = SinkCursor(store, "files", "gw", FILES)
    assert drain(back) == ["file.created"] * 4
    writer.delete_confirmed(sinks, routes)
    assert remaining(store) == []
    assert read_stats(store, routes).events == 0
    assert writer.usage().events == 0


def test_deletion_with_several_selecting_sinks_and_cursors(store):
    """Three sinks at different places: an event goes once each sink that wants it is past it."""
    writer = QueueWriter(store)
    routes = {"all": EVERYTHING, "files": FILES, "mqtt": MQTT, "logs": Route(types=("log.*",))}
    kinds = ["mqtt.message", "file.created", "log.line", "mqtt.message", "exec.output"] * 4
    for kind in kinds:
        writer.append(events("s", kind, 1))
    cursors = {name: SinkCursor(store, name, "gw", route) for name, route in routes.items()}
    cursors["all"].advance(15)
    cursors["mqtt"].advance(20)  # confirmed every mqtt event
    cursors["logs"].advance(8)  # confirmed the first two log lines
    # files: offline at 0
    writer.delete_confirmed(list(routes), routes)
    left = [(p, k) for p, k in enumerate(kinds, 1) if p > 15]
    for position, kind in enumerate(kinds[:15], 1):
        if kind == "file.created" or (kind == "log.line" and position > 8):
            left.append((position, kind))
    conn = store.connect()
    got = conn.execute("SELECT position, type FROM events ORDER BY position").fetchall()
    conn.close()
    assert got == sorted(left)
    stats = read_stats(store, routes)
    assert stats.events == len(left)
    assert stats.sink_backlog == {"all": 5, "files": 4, "mqtt": 0, "logs": 2}
    # A restart of the writer reads the holes back; the bounds drop the oldest correctly.
    writer.close()
    writer = QueueWriter(store)
    assert writer.usage().events == len(left)
    dropped = writer.drop_oldest(2)
    assert sum(dropped.values()) == 2
    assert writer.usage().events == len(left) - 2 == read_stats(store, routes).events


def test_a_sink_that_selects_nothing_keeps_todays_prefix_delete(store):
    writer = QueueWriter(store)
    writer.append(events("s", "file.created", 4))
    one, two = SinkCursor(store, "one", "gw"), SinkCursor(store, "two", "gw")
    one.advance(4)
    two.advance(2)
    statements = []
    writer.conn.set_trace_callback(statements.append)
    assert writer.delete_confirmed(["one", "two"], {"one": EVERYTHING, "two": EVERYTHING}) == 2
    writer.conn.set_trace_callback(None)
    assert "DELETE FROM events WHERE position <= 2" in statements
    assert not any("queue_holes" in s or "NOT (" in s for s in statements)


def test_a_new_selection_applies_to_queued_events(store):
    """A reload: the sink that now wants a type gets the queued events it has not passed."""
    writer = QueueWriter(store)
    writer.append(events("s", "log.line", 3) + events("s", "file.created", 2))
    logs = SinkCursor(store, "b", "gw", Route(types=("log.*",)))
    assert drain(logs) == ["log.line"] * 3
    assert logs.position == 5  # passed the file events too
    writer.append(events("s", "file.created", 1) + events("s", "log.line", 1))
    logs.flush()
    wider = SinkCursor(store, "b", "gw", Route(types=("log.*", "file.*")))
    assert drain(wider) == ["file.created", "log.line"]


def test_dead_letter_retries_and_purges_follow_the_selection(store):
    writer = QueueWriter(store)
    writer.append(events("s", "file.created", 2) + events("s", "log.line", 2))
    cursor = SinkCursor(store, "b", "gw")
    batch = cursor.read(0, 10)
    dead_letters.set_aside(cursor.conn, "b", [(e, "refused", 3) for e in batch])
    dead_letters.request_retry(cursor.conn, "b")
    assert len(dead_letters.retries(cursor.conn, "b", "gw", 10)) == 4
    assert [e.type for e in dead_letters.retries(cursor.conn, "b", "gw", 10, FILES)] == [
        "file.created"
    ] * 2
    taken, through = purge_plan(store, "b", "9999", FILES)
    assert (taken, through) == (2, 2)


GLOB_CHARS = "a^!]-[*?\\/"


def test_globs_mean_what_fnmatch_says_also_in_sql(store):
    """SQLite's GLOB writes a negation [^a] where fnmatch writes [!a]; the SQL must agree
    with fnmatch.fnmatchcase on every pattern, brackets included."""
    patterns = ["*", "a*", "[!a]*", "[^a]", "[!]a]", "[]", "[a-]", "[!^]", "a?", "*/*", "A*"]
    patterns += ["".join(p) for p in itertools.product("a[!^]*", repeat=3)]
    types = ["a", "^", "!", "]", "-", "b", "ab", "a/b", "[", "[]", "a]", "/", "", "A"]
    types = [t for t in types if t] + ["a\nb"]
    writer = QueueWriter(store)
    writer.append([(Event(type="x", source="s"), "{}") for _ in types])
    conn = store.connect()
    conn.execute("BEGIN IMMEDIATE")
    for position, kind in enumerate(types, 1):
        conn.execute("UPDATE events SET type = ? WHERE position = ?", (kind, position))
    conn.execute("COMMIT")
    conn.close()
    for pattern in patterns:
        route = Route(types=(pattern,))
        cursor = SinkCursor(store, f"s{abs(hash(pattern))}", "gw", route)
        got = [e.type for e in cursor.read(0, 100)]
        want = [t for t in types if fnmatch.fnmatchcase(t, pattern)]
        assert got == want, pattern
        assert [t for t in types if route.wants("s", t)] == want
        cursor.close()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("file.*", "expected a list of globs on event types"),
        ([], "got an empty list"),
        (["file.*", ""], "'' is not a glob"),
        (["file.*", 3], "3 is not a glob"),
    ],
)
def test_a_bad_selection_is_a_problem_naming_the_key_and_the_sink(value, message):
    problems: list[tuple[str, str]] = []
    table = {"types": value, "host": "x"}
    route = parse_route(table, "sinks.mqtt[1]", "cloud", problems)
    assert route == EVERYTHING and table == {"host": "x"}
    [(key, text)] = problems
    assert key == "sinks.mqtt[1].types"
    assert "sink 'cloud'" in text and message in text


def test_a_selecting_sinks_backlog_is_counted_by_blocks_that_stay_right(store, monkeypatch):
    """status reads it every few seconds: whole blocks above the cursor are counted once,
    and stay right while the sink confirms, others' events go and the bounds drop."""
    monkeypatch.setattr("edge_agent.queue.COUNT_BLOCK", 10)
    writer = QueueWriter(store)
    routes = {"all": EVERYTHING, "files": FILES}
    all_ = SinkCursor(store, "all", "gw")
    files = SinkCursor(store, "files", "gw", FILES)
    for round_ in range(12):
        writer.append(events("s", "file.created" if round_ % 3 else "log.line", 5))

    def truth() -> int:
        conn = store.connect()
        try:
            return conn.execute(
                "SELECT COUNT(*) FROM events WHERE position > ? AND type GLOB 'file.*'",
                (files.position,),
            ).fetchone()[0]
        finally:
            conn.close()

    assert read_stats(store, routes).sink_backlog["files"] == truth() == 40
    for _ in range(4):
        files.advance(files.read(files.position, 6)[-1].position)
        all_.advance(all_.position + 9)
        writer.delete_confirmed(list(routes), routes)
        assert read_stats(store, routes).sink_backlog["files"] == truth()
    writer.drop_oldest(25)
    assert read_stats(store, routes).sink_backlog["files"] == truth()
    writer.append(events("s", "file.created", 7))
    assert read_stats(store, routes).sink_backlog["files"] == truth()
    # Told to want log lines instead, it counts afresh.
    logs = {"all": EVERYTHING, "files": Route(types=("log.*",))}
    conn = store.connect()
    want = conn.execute(
        "SELECT COUNT(*) FROM events WHERE position > ? AND type = 'log.line'", (files.position,)
    ).fetchone()[0]
    conn.close()
    assert read_stats(store, logs).sink_backlog["files"] == want
