"""Queue bounds and policies, on the real queue file, in-process."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta

import pytest

from edge_agent.bounds import Bounds, Limits
from edge_agent.clock import AgeClock
from edge_agent.errors import QueueError
from edge_agent.event import Event
from edge_agent.queue import QueueStore, QueueWriter, SinkCursor, read_checkpoints
from edge_agent.testing import wait_for
from edge_agent.writer import Writer

pytestmark = pytest.mark.timeout(60)


def batch(source: str, count: int, size: int = 200, time: str | None = None):
    items = []
    for i in range(count):
        event = Event(type="test.tick", source=source, data={"i": i})
        if time is not None:
            event.time = time
        items.append((event, '"' + "x" * (size - 2) + '"'))
    return items


@pytest.fixture
def store(tmp_path):
    store = QueueStore(str(tmp_path / "state"))
    store.open()
    return store


def test_drop_oldest_keeps_max_events_and_counts_per_source(store, caplog):
    queue = QueueWriter(store)
    bounds = Bounds(queue, Limits(max_events=100), store.state_dir)
    queue.append(batch("a", 60) + batch("b", 40))
    assert bounds.admit(30, 30 * 200)
    queue.append(batch("c", 30))
    assert queue.usage().events == 100
    assert bounds.dropped == {"a": 30}
    assert "dropped 30 events (a: 30)" in caplog.text and "max_events 100" in caplog.text
    remaining = SinkCursor(store, "s", "gw").read(0, 1000)
    assert remaining[0].source == "a" and remaining[0].sequence == 31


def test_drop_oldest_keeps_max_bytes(store):
    queue = QueueWriter(store)
    limit = 2 * 1024 * 1024
    bounds = Bounds(queue, Limits(max_bytes=limit), store.state_dir)
    for _ in range(100):
        items = batch("a", 100, size=1000)
        assert bounds.admit(len(items), 100 * 1000)
        queue.append(items)
        usage = queue.usage()
        # Checked before each commit: one commit's pages may go over, no more.
        assert usage.live_bytes + usage.wal_bytes <= limit + 512 * 1024
    assert sum(bounds.dropped.values()) > 0


class SteppedClock(AgeClock):
    """An age clock the test moves (the real one is seconds since boot)."""

    def __init__(self) -> None:
        super().__init__(0.0)
        self.value = 1000.0

    def now(self) -> float:
        return self.value


def test_max_age_drops_old_events_whatever_the_policy(store):
    clock = SteppedClock()
    queue = QueueWriter(store, clock=clock)
    queue.append(batch("a", 5))
    clock.value += 8 * 86400
    queue.append(batch("a", 3))
    bounds = Bounds(queue, Limits(max_age=7 * 86400, when_full="block"), store.state_dir)
    bounds.housekeeping()
    assert queue.usage().events == 3
    assert bounds.dropped == {"a": 5}


def test_max_age_ignores_the_events_wall_clock_time(store):
    """A device without a real-time clock: events stamped 30 days before NTP fixed it."""
    clock = SteppedClock()
    queue = QueueWriter(store, clock=clock)
    long_ago = (datetime.now(UTC) - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    queue.append(batch("a", 5, time=long_ago))
    clock.value += 3600
    bounds = Bounds(queue, Limits(max_age=7 * 86400), store.state_dir)
    bounds.housekeeping()
    assert queue.usage().events == 5 and not bounds.dropped


def test_the_age_clock_goes_on_across_restarts_and_reboots(store, monkeypatch):
    from edge_agent import clock as clock_module

    monkeypatch.setattr(clock_module, "since_boot", lambda: 500.0)
    monkeypatch.setattr(clock_module, "boot_id", lambda: "boot-1")
    first = QueueWriter(store)
    first.append(batch("a", 1))
    assert first.clock.now() == 500.0
    first.close()
    monkeypatch.setattr(clock_module, "since_boot", lambda: 800.0)  # restarted, same boot
    assert QueueWriter(store).clock.now() == 800.0
    monkeypatch.setattr(clock_module, "boot_id", lambda: "boot-2")  # rebooted
    monkeypatch.setattr(clock_module, "since_boot", lambda: 20.0)
    assert QueueWriter(store).clock.now() == 800.0  # from the last saved value, not 20


def test_the_file_does_not_grow_without_end_as_events_come_and_go(store):
    queue = QueueWriter(store)
    bounds = Bounds(queue, Limits(), store.state_dir)
    cursor = SinkCursor(store, "s", "gw")
    sizes = []
    for round in range(30):
        queue.append(batch("a", 2000, size=500))
        cursor.advance(cursor.read(cursor.position, 10_000)[-1].position)
        queue.delete_confirmed(["s"])
        bounds.housekeeping()
        if round >= 5:
            sizes.append(os.path.getsize(store.path))
    assert max(sizes) <= min(sizes) * 1.5, sizes


def test_a_drained_backlog_gives_its_space_back(store):
    queue = QueueWriter(store)
    bounds = Bounds(queue, Limits(), store.state_dir)
    cursor = SinkCursor(store, "s", "gw")
    for _ in range(20):
        queue.append(batch("a", 1000, size=1000))
    big = os.path.getsize(store.path)
    cursor.advance(cursor.read(cursor.position, 100_000)[-1].position)
    queue.delete_confirmed(["s"])
    for _ in range(20):
        bounds.housekeeping()
    assert os.path.getsize(store.path) < big / 4


def full_at_ten(store) -> Writer:
    """A started writer whose queue holds 10 events at most, and sources wait for room."""
    writer = Writer(
        store,
        commit_max_events=100,
        handoff_max_events=1000,
        sink_names=["s"],
        on_commit=lambda: None,
        limits=Limits(max_events=10, when_full="block"),
    )
    writer.start()
    return writer


def test_block_makes_sources_wait_until_sinks_confirm(store):
    writer = full_at_ten(store)
    cursor = SinkCursor(store, "s", "gw")
    writer.submit(batch("a", 10))
    done = threading.Event()
    threading.Thread(target=lambda: (writer.submit(batch("a", 5)), done.set()), daemon=True).start()
    assert not done.wait(1.0), "the source must wait while the queue is full"
    wait_for(lambda: writer.waiting_for_room, 10, "the writer to hold the batch for room")
    assert writer.uncommitted == 5, "status shows the events held back (the queue is not drained)"
    cursor.advance(cursor.read(0, 5)[-1].position)
    writer.request_cleanup()
    wait_for(done.is_set, 10, "the waiting source to be let in")
    assert (writer.uncommitted, writer.waiting_for_room) == (0, False)
    assert [e.sequence for e in cursor.read(cursor.position, 100)] == list(range(6, 16))
    writer.stop(5)


def test_a_group_too_big_for_the_room_left_commits_its_first_callers(store):
    """Callers committed together in one group: when the group does not fit, those
    that do are committed and only the rest waits (a whole group waiting for room it
    can never have, with an empty queue, wedged the agent)."""
    empty = QueueWriter(store)
    room = empty.usage().live_bytes + empty.usage().wal_bytes + 300_000
    empty.close()
    writer = Writer(
        store,
        commit_max_events=100,
        handoff_max_events=1000,
        sink_names=["s"],
        on_commit=lambda: None,
        limits=Limits(max_bytes=room, when_full="block"),
    )
    done = {"a": threading.Event(), "b": threading.Event()}

    def submit(name: str) -> None:
        writer.submit(batch(name, 1, size=200_000))  # one fits in the room, two do not
        done[name].set()

    threading.Thread(target=submit, args=("a",), daemon=True).start()
    wait_for(lambda: writer.uncommitted == 1, 10, "the first caller to wait")
    threading.Thread(target=submit, args=("b",), daemon=True).start()
    wait_for(lambda: writer.uncommitted == 2, 10, "the second caller to wait")
    writer.start()  # not started before: both callers are taken in one group
    wait_for(done["a"].is_set, 10, "the caller that fits to be committed")
    wait_for(lambda: writer.waiting_for_room, 10, "the other one to wait for room")
    assert not done["b"].is_set()
    writer.stop(1)


def test_a_source_waiting_for_room_can_stop(store):
    """when_full = "block" and a full queue: a stop (or a reload) must not wait for room."""
    writer = full_at_ten(store)
    writer.submit(batch("a", 10))
    stopping = threading.Event()
    outcome: list[BaseException] = []

    def source() -> None:
        try:
            writer.submit(batch("a", 5), cancel=stopping)
        except QueueError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=source, daemon=True)
    thread.start()
    wait_for(lambda: writer.bounds.full_reason, 10, "the queue to be full")
    stopping.set()
    thread.join(5)
    assert not thread.is_alive(), "the stopping source was let go"
    assert "the source is stopping" in str(outcome[0])
    assert writer.bounds.queue.usage().events == 10, "its events were not accepted"
    writer.stop(5)


def test_a_checkpoint_alone_is_committed_while_events_wait_for_room(store):
    """A reload records each source it starts (a checkpoint, no event) from the main
    thread: other sources' events waiting for room must not hold it up."""
    writer = full_at_ten(store)
    writer.submit(batch("a", 10))
    threading.Thread(target=lambda: writer.submit(batch("a", 5)), daemon=True).start()
    wait_for(lambda: writer.bounds.full_reason, 10, "the queue to be full")
    done = threading.Event()
    threading.Thread(
        target=lambda: (writer.submit([], [("b", "key", "value")]), done.set()), daemon=True
    ).start()
    assert done.wait(5), "the checkpoint was held behind events waiting for room"
    assert read_checkpoints(store, "b") == {"key": "value"}
    writer.stop(1)


def test_a_failed_commit_is_reported_to_the_source_and_the_writer_carries_on(store):
    writer = Writer(
        store,
        commit_max_events=100,
        handoff_max_events=100,
        sink_names=["s"],
        on_commit=lambda: None,
    )
    writer.start()
    bad = [(Event(type="x", source="a", data=None), object())]  # cannot be stored
    results: dict[str, object] = {}

    def submit(name, items):
        try:
            writer.submit(items)
            results[name] = "ok"
        except QueueError as exc:
            results[name] = exc

    threads = [
        threading.Thread(target=submit, args=(name, items))
        for name, items in (("bad", bad), ("good", batch("a", 2)), ("good2", batch("b", 3)))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert isinstance(results["bad"], QueueError)
    assert results["good"] == results["good2"] == "ok", "one bad caller must not cost the others"
    assert len(SinkCursor(store, "s", "gw").read(0, 10)) == 5
    writer.submit(batch("a", 1))  # and the writer carries on
    assert writer.is_alive()
    writer.stop(5)


def test_a_damaged_queue_is_moved_aside_and_a_new_one_started(tmp_path, caplog):
    state = tmp_path / "state"
    store = QueueStore(str(state))
    store.open()
    QueueWriter(store).append(batch("a", 10))
    with open(store.path, "r+b") as handle:
        handle.seek(0)
        handle.write(b"this is not a database header at all")
    aside = QueueStore(str(state)).open()
    assert aside is not None and os.path.basename(aside).startswith("queue.db.corrupt-")
    assert os.path.exists(aside)
    assert "is damaged" in caplog.text and "moved aside" in caplog.text
    fresh = QueueWriter(QueueStore(str(state)))
    assert fresh.usage().events == 0
    assert QueueStore(str(state)).damaged_copies() == [aside]


def test_a_truncated_queue_is_moved_aside_too(tmp_path):
    state = tmp_path / "state"
    store = QueueStore(str(state))
    store.open()
    writer = QueueWriter(store)
    writer.append(batch("a", 2000, size=500))
    writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    writer.close()
    size = os.path.getsize(store.path)
    with open(store.path, "r+b") as handle:
        handle.truncate(size // 3)
    assert QueueStore(str(state)).open() is not None


def test_checking_the_bounds_never_scans_the_queue(store):
    """admit() runs before every commit: none of its queries may read the whole table."""
    queue = QueueWriter(store)
    queue.append(batch("a", 2000, size=20))
    statements: list[str] = []
    queue.conn.set_trace_callback(statements.append)
    Bounds(queue, Limits(max_bytes=10**9, max_events=10**9), store.state_dir).admit(10, 200)
    queue.conn.set_trace_callback(None)
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert selects
    for statement in selects:
        plan = queue.conn.execute("EXPLAIN QUERY PLAN " + statement).fetchall()
        assert not any(row[-1].startswith("SCAN events") for row in plan), (statement, plan)


@pytest.mark.parametrize("policy", ["drop_oldest", "block"])
def test_max_events_is_never_overshot_by_a_commit(store, policy):
    """Group commits, and one emit of more events than the queue may hold at all."""
    from edge_agent.queue import count_events

    after_commits: list[int] = []
    writer = Writer(
        store,
        commit_max_events=1000,
        handoff_max_events=10_000,
        sink_names=["s"],
        on_commit=lambda: after_commits.append(count_events(store.path)),
        limits=Limits(max_events=300, when_full=policy, reserve_free=0),
    )
    writer.start()
    cursor = SinkCursor(store, "s", "gw")
    done = threading.Event()

    def confirm() -> None:  # a sink that confirms what comes, so blocked sources go on
        while not done.wait(0.01):
            events = cursor.read(cursor.position, 1000)
            if events:
                cursor.advance(events[-1].position)
                writer.request_cleanup()

    def emit(source: str) -> None:
        for _ in range(5):
            writer.submit(batch(source, 120))

    threads = [threading.Thread(target=emit, args=(s,)) for s in "abc"]
    for thread in threads:
        thread.start()
    sink = threading.Thread(target=confirm)
    if policy == "block":
        sink.start()
    if policy == "drop_oldest":
        writer.submit(batch("big", 501))  # one emit_many: its oldest 201 are dropped
    else:
        with pytest.raises(QueueError, match=r"501 events at once are more than .*max_events"):
            writer.submit(batch("big", 501))
    for thread in threads:
        thread.join(30)
    done.set()
    if policy == "block":
        sink.join(10)
    writer.stop(10)
    assert not any(thread.is_alive() for thread in threads)
    assert after_commits and max(after_commits) <= 300
    if policy == "drop_oldest":
        assert count_events(store.path) == 300
        assert sum(writer.bounds.dropped.values()) == 3 * 5 * 120 + 501 - 300
        # The first 201 were dropped before they were queued; they have numbers too, so
        # consumers see the loss as a jump in sequence.
        conn = store.connect()
        assert conn.execute(
            "SELECT last FROM source_sequences WHERE source = 'big'"
        ).fetchone() == (501,)
        conn.close()


def test_dead_letters_count_against_max_events_and_go_oldest_first(store, caplog):
    from edge_agent import dead_letters

    queue = QueueWriter(store)
    bounds = Bounds(queue, Limits(max_events=20), store.state_dir)
    queue.append(batch("a", 10))
    cursor = SinkCursor(store, "cloud", "gw")
    # The first 5 events could never be delivered to "cloud": set aside, and confirmed.
    dead = [(event, "0x87 Not authorized", 3) for event in cursor.read(0, 5)]
    dead_letters.set_aside(cursor.conn, "cloud", dead)
    cursor.advance(10)
    queue.delete_confirmed(["cloud"])
    assert queue.usage().events == 5  # the 5 dead letters; their events are gone
    queue.append(batch("b", 15))
    assert bounds.admit(5, 5 * 200)  # 20 + 5 > 20: the 5 oldest go, the dead letters
    assert dead_letters.counts(cursor.conn) == {}
    assert bounds.dead_letters_dropped == {"cloud": 5} and bounds.dropped == {}
    assert "dropped 5 dead letters (sink cloud: 5)" in caplog.text


def test_max_age_drops_dead_letters_with_the_events_of_their_time(store):
    from edge_agent import dead_letters

    clock = SteppedClock()
    queue = QueueWriter(store, clock=clock)
    queue.append(batch("a", 5))
    cursor = SinkCursor(store, "cloud", "gw")
    dead_letters.set_aside(cursor.conn, "cloud", [(e, "refused", 3) for e in cursor.read(0, 2)])
    cursor.advance(5)
    queue.delete_confirmed(["cloud"])  # their events are gone; the dead letters stay
    bounds = Bounds(queue, Limits(max_age=7 * 86400), store.state_dir)
    bounds.housekeeping()
    assert dead_letters.counts(cursor.conn) == {"cloud": 2}
    clock.value += 8 * 86400
    queue.append(batch("a", 3))
    bounds._last_expire = 0.0  # housekeeping expires every few seconds; now, here
    bounds.housekeeping()
    assert dead_letters.counts(cursor.conn) == {}
    assert bounds.dead_letters_dropped == {"cloud": 2} and queue.usage().events == 3


def test_max_bytes_bounds_the_events_not_the_checkpoints(store):
    """A source's checkpoints (the file source's index of every file) are not backlog."""
    queue = QueueWriter(store)
    index = [("inbox", f'["/var/spool/inbox","f{i:06d}"]', f"2049:{i} 10 0") for i in range(40_000)]
    queue.append([], index)
    assert os.path.getsize(store.path) > 4 * 1024 * 1024
    bounds = Bounds(queue, Limits(max_bytes=2 * 1024 * 1024), store.state_dir)
    for _ in range(3):
        assert bounds.admit(100, 100 * 200)
        queue.append(batch("a", 100))
    assert not bounds.dropped and queue.usage().events == 300


def test_a_few_events_beside_a_large_index_are_not_taken_for_megabytes_each(store):
    """With two events queued beside a 6 MiB index, a batch of 100 small events needs
    kilobytes, not 100 times the file's size per event: it fits with 100 MiB free."""
    queue = QueueWriter(store)
    queue.append(batch("a", 1))
    queue.usage()  # the index's size is measured now and then, not at every commit
    index = [("inbox", f'["/var/spool/inbox","f{i:06d}"]', f"2049:{i} 10 0") for i in range(40_000)]
    queue.append(batch("a", 1), index)  # a scan's index grows between two measures
    stat = os.statvfs(store.state_dir)
    free = stat.f_bavail * stat.f_frsize
    bounds = Bounds(
        queue, Limits(reserve_free=free - 100 * 1024 * 1024, when_full="block"), store.state_dir
    )
    assert bounds.admit(100, 100 * 200), bounds.full_reason
