"""Queue throughput benchmark: the project's SQLite queue against its ceilings and an alternative.

Not a test and not run by CI. It prints, in one run on one disk, events/s for

1. raw ``sqlite3``: ``executemany`` of N rows into the agent's ``events`` table, in one
   transaction, and in transactions of 1,000 (the ceilings);
2. the project's queue, enqueue only: ``agent.writer.Writer`` fed by several
   source threads that each ``submit`` lists of events (group commit);
3. the project's queue, full cycle: enqueue, ``SinkCursor.read``,
   ``SinkCursor.advance`` and the Writer's own deletion of confirmed events,
   concurrently, from the first submit until the queue is empty;
4. persist-queue's ``SQLiteAckQueue`` (put and get+ack concurrently), if installed;

each with ``synchronous`` FULL and NORMAL, ``--repeat`` times, and prints the medians.
Every measurement gets a fresh database in a temporary folder (``--dir``, by
default the current directory, so the disk measured is the one you run it on),
removed at the end.

    .venv/bin/python bench/queue.py            # N = 100,000, about 1-3 minutes
    .venv/bin/python bench/queue.py -n 20000 --repeat 1 --only raw,enqueue
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata

# Run as ``python bench/queue.py``, this file's folder comes first on sys.path,
# and this file would shadow the standard library's ``queue`` module for every
# import below (threading helpers, logging.handlers, persist-queue...). Take the
# folder out, and put the checkout in, so the working tree's ``agent`` is measured.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from sqlite_utils import Database  # noqa: E402

from bench.common import Row, cpu_model, write_results  # noqa: E402
from bench.common import verdict as met_or_missed  # noqa: E402
from edge_agent.bounds import Limits  # noqa: E402
from edge_agent.config import QueueSettings  # noqa: E402
from edge_agent.event import Event, encode_data  # noqa: E402
from edge_agent.forwarder import CURSOR_FLUSH_EVERY  # noqa: E402
from edge_agent.migrations import m001_queue  # noqa: E402
from edge_agent.queue import QueueStore, SinkCursor  # noqa: E402
from edge_agent.writer import Writer  # noqa: E402

SYNCS = ("full", "normal")
METHODS = ("raw", "enqueue", "cycle", "pq")
RAW_BATCH = 1000
#: Longest any single measurement may take before the bench gives up on it.
MEASUREMENT_TIMEOUT = 300.0

# -- the workload ------------------------------------------------------------------


@dataclass
class Workload:
    """N events made once, outside every timing, and shared by all methods."""

    per_source: list[list[tuple[Event, str]]]  # one list per source thread
    rows: list[tuple]  # the same events as rows of the events table
    data_bytes: float
    row_bytes: float

    @property
    def count(self) -> int:
        return len(self.rows)


def make_workload(n: int, sources: int, data_size: int) -> Workload:
    per_source: list[list[tuple[Event, str]]] = [[] for _ in range(sources)]
    rows = []
    sequences = [0] * sources
    for i in range(n):
        s = i % sources
        source = f"bench-{s}"
        base = {
            "path": f"/var/spool/inbox/batch-{i // 1000:05d}/file-{i:08d}.csv",
            "size": (i * 7919) % 1_000_000,
            "mtime": "2026-11-26T23:59:01.123456Z",
            "pad": "",
        }
        base["pad"] = "x" * max(0, data_size - len(encode_data(base)))
        data_json = encode_data(base)
        event = Event(type="file.created", source=source, data=base, subject=base["path"][:40])
        per_source[s].append((event, data_json))
        sequences[s] += 1
        rows.append(
            (
                event.id,
                event.source,
                event.type,
                event.time,
                event.subject,
                sequences[s],
                data_json,
            )
        )
    data_bytes = sum(len(r[6]) for r in rows) / max(n, 1)
    row_bytes = sum(len(str(c)) for r in rows for c in r) / max(n, 1)
    return Workload(per_source, rows, data_bytes, row_bytes)


# -- helpers -----------------------------------------------------------------------


@dataclass
class Result:
    events: int
    seconds: float
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("nan")


def raw_connect(path: str, sync: str) -> sqlite3.Connection:
    """A connection set up like the project's (WAL, incremental auto-vacuum), sync checked."""
    conn = sqlite3.connect(path, isolation_level=None)
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    conn.execute(f"PRAGMA synchronous = {sync.upper()}")
    level = conn.execute("PRAGMA synchronous").fetchone()[0]
    if mode.lower() != "wal" or level != {"full": 2, "normal": 1}[sync]:
        raise SystemExit(f"{path}: got journal_mode={mode}, synchronous={level}")
    return conn


def count_events(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    finally:
        conn.close()


def agent_limits(n: int, row_bytes: float) -> Limits:
    """The agent's default bounds, max_bytes raised if N events would not fit in it."""
    q = QueueSettings()
    return Limits(
        max_bytes=max(int(q.max_bytes), int(n * (row_bytes + 400) * 2)),
        max_events=q.max_events,
        max_age=q.max_age,
        reserve_free=q.reserve_free,
        when_full=q.when_full,
    )


def count_commits(writer: Writer) -> dict[str, int]:
    """Count the writer's insert transactions (wraps the instance method; code unchanged)."""
    stats = {"commits": 0}
    queue = writer._queue
    assert queue is not None
    append = queue.append

    def counted(events, checkpoints=()):
        append(events, checkpoints)
        stats["commits"] += 1

    queue.append = counted  # type: ignore[method-assign]
    return stats


def run_sources(writer: Writer, workload: Workload, chunk: int) -> Callable[[], float]:
    """Start one thread per source, released together; return a function that joins them."""
    start = threading.Barrier(len(workload.per_source) + 1)
    errors: list[BaseException] = []

    def source(items: list[tuple[Event, str]]) -> None:
        start.wait()
        try:
            for i in range(0, len(items), chunk):
                writer.submit(items[i : i + chunk])
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=source, args=(items,), name=f"source-{i}", daemon=True)
        for i, items in enumerate(workload.per_source)
    ]
    for thread in threads:
        thread.start()
    start.wait()

    def join() -> float:
        for thread in threads:
            thread.join(MEASUREMENT_TIMEOUT)
        if errors:
            raise errors[0]
        return time.perf_counter()

    return join


# -- the measurements ------------------------------------------------------------------


def raw_table(folder: str, sync: str) -> sqlite3.Connection:
    """A fresh database with the agent's own tables (its first migration; WAL,
    incremental vacuum), written to without the agent's code."""
    conn = raw_connect(os.path.join(folder, "raw.db"), sync)
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("VACUUM")
    m001_queue(Database(conn))
    return conn


def bench_raw(folder: str, sync: str, workload: Workload, batch: int | None) -> Result:
    conn = raw_table(folder, sync)
    sql = (
        "INSERT INTO events (id, source, type, time, subject, sequence, data)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)"
    )
    rows = workload.rows
    step = batch or len(rows)
    started = time.perf_counter()
    for i in range(0, len(rows), step):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, rows[i : i + step])
        conn.execute("COMMIT")
    seconds = time.perf_counter() - started
    conn.close()
    return Result(len(rows), seconds)


def bench_raw_cycle(folder: str, sync: str, workload: Workload) -> Result:
    """The ceiling of a full cycle: one thread, no Python per event. Each round inserts
    1,000 rows (a transaction), reads them back, and deletes them (a transaction)."""
    conn = raw_table(folder, sync)
    insert = (
        "INSERT INTO events (id, source, type, time, subject, sequence, data)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)"
    )
    select = (
        "SELECT position, id, source, type, time, subject, sequence, data FROM events"
        " WHERE position > ? ORDER BY position LIMIT ?"
    )
    rows = workload.rows
    position = 0
    started = time.perf_counter()
    for i in range(0, len(rows), RAW_BATCH):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(insert, rows[i : i + RAW_BATCH])
        conn.execute("COMMIT")
        read = conn.execute(select, (position, RAW_BATCH)).fetchall()
        position = read[-1][0]
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM events WHERE position <= ?", (position,))
        conn.execute("COMMIT")
    seconds = time.perf_counter() - started
    conn.close()
    return Result(len(rows), seconds)


def bench_enqueue(folder: str, sync: str, workload: Workload, args: argparse.Namespace) -> Result:
    store = QueueStore(folder, sync=sync)
    store.open()
    settings = QueueSettings()
    writer = Writer(
        store,
        commit_max_events=settings.commit_max_events,
        handoff_max_events=settings.handoff_max_events,
        sink_names=["bench"],
        on_commit=lambda: None,
        limits=agent_limits(workload.count, workload.row_bytes),
    )
    writer.start()
    stats = count_commits(writer)
    started = time.perf_counter()
    join = run_sources(writer, workload, args.chunk)
    ended = join()
    writer.stop(MEASUREMENT_TIMEOUT)
    stored = count_events(store.path)
    if stored != workload.count:
        raise SystemExit(f"enqueue: {stored} events in the queue, expected {workload.count}")
    return Result(
        workload.count,
        ended - started,
        {"events/commit": workload.count / max(stats["commits"], 1)},
    )


def bench_cycle(folder: str, sync: str, workload: Workload, args: argparse.Namespace) -> Result:
    n = workload.count
    store = QueueStore(folder, sync=sync)
    store.open()
    settings = QueueSettings()
    wake = threading.Event()
    writer = Writer(
        store,
        commit_max_events=settings.commit_max_events,
        handoff_max_events=settings.handoff_max_events,
        sink_names=["bench"],
        on_commit=wake.set,
        limits=agent_limits(n, workload.row_bytes),
    )
    writer.start()
    stats = count_commits(writer)
    # Created before any event, as a configured sink is when the agent starts.
    cursor = SinkCursor(store, "bench", "bench-agent")

    # The Writer deletes what the sink confirmed in its housekeeping; note when
    # the last of the N events is gone (wraps the instance method; code unchanged).
    assert writer._queue is not None
    delete_confirmed = writer._queue.delete_confirmed
    deleted = {"events": 0, "deletes": 0}
    empty = threading.Event()
    empty_at = [0.0]

    def counted_delete(sinks, routes=None):
        count = delete_confirmed(sinks, routes)
        deleted["events"] += count
        deleted["deletes"] += 1
        if deleted["events"] >= n and not empty.is_set():
            empty_at[0] = time.perf_counter()
            empty.set()
        return count

    writer._queue.delete_confirmed = counted_delete  # type: ignore[method-assign]

    drained = {"reads": 0, "acked_at": 0.0}
    drain_errors: list[BaseException] = []

    def drain() -> None:
        # What a forwarder does with a sink that confirms at once: read a batch
        # after the cursor, confirm it, ask the writer to delete.
        try:
            confirmed = 0
            while confirmed < n:
                wake.clear()
                events = cursor.read(cursor.position, args.read_batch)
                if not events:
                    wake.wait(0.1)
                    continue
                drained["reads"] += 1
                cursor.advance(events[-1].position, flush_after=CURSOR_FLUSH_EVERY)
                writer.request_cleanup()
                confirmed += len(events)
            cursor.flush()  # as a forwarder does when it goes idle
            writer.request_cleanup()
            drained["acked_at"] = time.perf_counter()
        except BaseException as exc:
            drain_errors.append(exc)
            empty.set()

    drainer = threading.Thread(target=drain, name="drain", daemon=True)
    drainer.start()
    started = time.perf_counter()
    join = run_sources(writer, workload, args.chunk)
    enqueued_at = join()
    if not empty.wait(MEASUREMENT_TIMEOUT):
        raise SystemExit(f"cycle: queue not empty after {MEASUREMENT_TIMEOUT}s")
    drainer.join(MEASUREMENT_TIMEOUT)
    if drain_errors:
        raise drain_errors[0]
    writer.stop(MEASUREMENT_TIMEOUT)
    cursor.close()
    left = count_events(store.path)
    if left:
        raise SystemExit(f"cycle: {left} events left in the queue")
    return Result(
        n,
        empty_at[0] - started,
        {
            "to last ack, events/s": n / (drained["acked_at"] - started),
            "enqueue part, events/s": n / (enqueued_at - started),
            "events/commit": n / max(stats["commits"], 1),
            "events/read": n / max(drained["reads"], 1),
            "delete transactions": deleted["deletes"],
        },
    )


PQ_SETTINGS = (
    "SQLiteAckQueue(path, multithreading=True, auto_commit=True (forced by the ack queue),"
    " auto_resume=False), pickle serializer; it has no synchronous option, so the bench sets"
    " PRAGMA synchronous on its two connections (q._putter, q._getter) and reads it back;"
    " one put thread, one get(raw=True)+ack(id=) thread,"
    " clear_acked_data(max_delete=0, keep_latest=0) every 1,000 acks and at the end"
)


def bench_pq(folder: str, sync: str, workload: Workload, args: argparse.Namespace) -> Result:
    from persistqueue import SQLiteAckQueue
    from persistqueue.exceptions import Empty

    n = min(workload.count, args.pq_max)
    # The item a Python user would store: the event's fields and its data as JSON.
    items = [(*row[:5], row[6]) for row in workload.rows[:n]]
    q = SQLiteAckQueue(
        os.path.join(folder, "pq"), multithreading=True, auto_commit=True, auto_resume=False
    )
    for conn in {id(q._putter): q._putter, id(q._getter): q._getter}.values():
        conn.execute(f"PRAGMA synchronous = {sync.upper()}")
        level = conn.execute("PRAGMA synchronous").fetchone()[0]
        if level != {"full": 2, "normal": 1}[sync]:
            raise SystemExit(f"persist-queue: synchronous={level}, wanted {sync}")
    errors: list[BaseException] = []
    put_count = [0]
    put_done = threading.Event()

    def put() -> None:
        # Stops at --pq-max events or after --pq-seconds, whichever comes first.
        deadline = time.perf_counter() + args.pq_seconds
        try:
            for item in items:
                q.put(item)
                put_count[0] += 1
                if time.perf_counter() >= deadline:
                    break
        except BaseException as exc:
            errors.append(exc)
        finally:
            put_done.set()

    def consume() -> None:
        try:
            acked = 0
            while not (put_done.is_set() and acked >= put_count[0]) and not errors:
                try:
                    # A short timeout: get() clears its put event after an empty
                    # select, so a put landing in between would otherwise cost 10 s.
                    item = q.get(block=True, timeout=0.05, raw=True)
                except Empty:
                    continue
                q.ack(id=item["pqid"])
                acked += 1
                if acked % 1000 == 0:
                    q.clear_acked_data(max_delete=0, keep_latest=0)
            q.clear_acked_data(max_delete=0, keep_latest=0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=f, daemon=True) for f in (put, consume)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(MEASUREMENT_TIMEOUT)
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    left = q._getter.execute("SELECT COUNT(*) FROM ack_queue_default").fetchone()[0]
    q.close()
    if left:
        raise SystemExit(f"persist-queue: {left} rows left")
    return Result(put_count[0], seconds, {"events": put_count[0]})


# -- the report ------------------------------------------------------------------------


def filesystem(path: str) -> str:
    """Device, filesystem type, mount point and options of ``path`` (Linux), and free space."""
    real = os.path.realpath(path)
    stat = os.statvfs(real)
    free = f"{stat.f_bavail * stat.f_frsize / 1024**3:.1f} GiB free"
    best = None
    try:
        with open("/proc/self/mountinfo") as handle:
            for line in handle:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                mount = fields[4].replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and (best is None or len(mount) >= len(best[0])):
                    best = (mount, fields[2], fields[5], tail[0], tail[1])
    except (OSError, IndexError):
        pass
    if best is None:
        return f"{real} ({free}; mount unknown)"
    mount, devnum, options, fstype, device = best
    rotational = ""
    for candidate in (f"/sys/dev/block/{devnum}/queue", f"/sys/dev/block/{devnum}/../queue"):
        try:
            with open(os.path.join(candidate, "rotational")) as handle:
                flag = handle.read().strip()
            rotational = ", rotational per the kernel" if flag == "1" else ", non-rotational"
            break
        except OSError:
            continue
    return f"{device} {fstype} on {mount} ({options}{rotational}), {free}"


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


LABELS = {
    ("raw", 1): "raw sqlite3 executemany, 1 transaction",
    ("raw", RAW_BATCH): f"raw sqlite3 executemany, {RAW_BATCH:,}/transaction",
    "rawcycle": f"raw sqlite3 insert+read+delete, {RAW_BATCH:,}/round",
    "enqueue": "edge-agent Writer, enqueue",
    "cycle": "edge-agent enqueue+read+ack+delete",
    "cycle-ack": "  (same runs, to last ack, not deleted)",
    "pq": "persist-queue SQLiteAckQueue put+get+ack",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100_000, help="events per measurement")
    parser.add_argument("--dir", default=os.curdir, help="where to make the temporary folder")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; median")
    parser.add_argument("--pq-max", type=int, default=20_000, help="events for persist-queue")
    parser.add_argument(
        "--pq-seconds", type=float, default=3.0, help="stop putting into persist-queue after this"
    )
    parser.add_argument("--threads", type=int, default=4, help="source threads submitting")
    parser.add_argument("--chunk", type=int, default=100, help="events per submit()")
    parser.add_argument("--read-batch", type=int, default=500, help="events per cursor read")
    parser.add_argument("--data-size", type=int, default=200, help="bytes of JSON data")
    parser.add_argument("--sync", default="full,normal", help="comma-separated: full,normal")
    parser.add_argument(
        "--only", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--json", metavar="FILE", help="also write the result rows here, for bench/run_all.py"
    )
    args = parser.parse_args()
    methods = [m for m in args.only.split(",") if m]
    syncs = [s for s in args.sync.split(",") if s]
    if set(methods) - set(METHODS) or set(syncs) - set(SYNCS) or args.n < 1:
        parser.error("unknown method or sync, or n < 1")
    if "pq" in methods and version("persist-queue") == "not installed":
        print("persist-queue is not installed (pip install persist-queue): skipping it\n")
        methods.remove("pq")

    began = time.perf_counter()
    top = tempfile.mkdtemp(prefix=".bench-queue-", dir=args.dir)
    print(f"machine:   {os.cpu_count()} cores, {cpu_model()}, {platform.platform()}")
    print(f"python:    {sys.version.split()[0]} ({platform.python_implementation()})")
    print(
        f"sqlite:    {sqlite3.sqlite_version}; sqlite-utils {version('sqlite-utils')};"
        f" persist-queue {version('persist-queue')}"
    )
    print(f"date:      {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}")
    print(f"disk:      {os.path.realpath(top)}: {filesystem(top)}")

    workload = make_workload(args.n, args.threads, args.data_size)
    print(
        f"workload:  {workload.count:,} events, data {workload.data_bytes:.0f} B of JSON,"
        f" {workload.row_bytes:.0f} B per row with the envelope columns;"
        f" {args.repeat} runs each, median shown"
    )
    print(
        f"edge-agent: {args.threads} source threads, submit() of {args.chunk} events each,"
        f" commit_max_events={QueueSettings().commit_max_events},"
        f" handoff_max_events={QueueSettings().handoff_max_events}, agent's default bounds;"
        f" drain: 1 thread, SinkCursor.read({args.read_batch}) + advance(flush_after="
        f"{CURSOR_FLUSH_EVERY}s, as forwarders do) + request_cleanup()"
    )
    if "pq" in methods:
        pq_n = min(args.pq_max, args.n)
        print(
            f"persist-queue: FEWER EVENTS: at most {pq_n:,} (--pq-max) and puts stop after"
            f" {args.pq_seconds:g} s (--pq-seconds), then the rest is drained; the events"
            f" measured are in the notes. {PQ_SETTINGS}"
        )
    print(flush=True)

    plan: list[tuple[object, str, Callable[[str], Result]]] = []
    for sync in syncs:
        if "raw" in methods:
            plan.append((("raw", 1), sync, lambda d, s=sync: bench_raw(d, s, workload, None)))
            plan.append(
                (("raw", RAW_BATCH), sync, lambda d, s=sync: bench_raw(d, s, workload, RAW_BATCH))
            )
            plan.append(("rawcycle", sync, lambda d, s=sync: bench_raw_cycle(d, s, workload)))
        if "enqueue" in methods:
            plan.append(("enqueue", sync, lambda d, s=sync: bench_enqueue(d, s, workload, args)))
        if "cycle" in methods:
            plan.append(("cycle", sync, lambda d, s=sync: bench_cycle(d, s, workload, args)))
        if "pq" in methods:
            plan.append(("pq", sync, lambda d, s=sync: bench_pq(d, s, workload, args)))

    results: dict[tuple[object, str], list[Result]] = {}
    try:
        # Runs interleaved (run 1 of everything, then run 2...) so a slow patch
        # of the disk or the machine does not land on one method only.
        for run in range(args.repeat):
            for key, sync, measure in plan:
                folder = tempfile.mkdtemp(dir=top)
                try:
                    result = measure(folder)
                finally:
                    if not args.keep:
                        shutil.rmtree(folder, ignore_errors=True)
                results.setdefault((key, sync), []).append(result)
                print(
                    f"  run {run + 1}/{args.repeat} {sync:6} {_label(key):44}"
                    f" {result.rate:>12,.0f} events/s",
                    flush=True,
                )
    finally:
        if not args.keep:
            shutil.rmtree(top, ignore_errors=True)

    def median(key: object, sync: str) -> float | None:
        runs = results.get((key, sync))
        return statistics.median(r.rate for r in runs) if runs else None

    def median_note(key: object, sync: str, note: str) -> float | None:
        runs = results.get((key, sync))
        return statistics.median(r.notes[note] for r in runs) if runs else None

    print()
    header = f"{'method':44} | {'sync':6} | {'events/s':>10} | {'ratio to raw batched':>20} | runs"
    print(header)
    print("-" * len(header))
    for sync in syncs:
        ceiling = median(("raw", RAW_BATCH), sync)
        for key, _s, _m in [p for p in plan if p[1] == sync]:
            rows = [(key, median(key, sync), results[(key, sync)])]
            if key == "cycle":
                acked = [r.notes["to last ack, events/s"] for r in results[(key, sync)]]
                rows.append(("cycle-ack", statistics.median(acked), None))
            for label_key, rate, runs in rows:
                if runs is None:  # the cycle runs again, timed to their last ack
                    runs = [
                        Result(r.events, r.events / r.notes["to last ack, events/s"])
                        for r in results[(key, sync)]
                    ]
                ratio = f"{rate / ceiling:.2f}" if ceiling and rate else "-"
                spread = ", ".join(f"{r.rate:,.0f}" for r in runs) if runs else ""
                print(
                    f"{_label(label_key):44} | {sync:6} | {rate:>10,.0f} | {ratio:>20} | {spread}"
                )
        print("-" * len(header))

    notes = []
    for sync in syncs:
        if ("enqueue", sync) in results:
            notes.append(
                f"enqueue ({sync}): {median_note('enqueue', sync, 'events/commit'):.0f}"
                " events per commit transaction (median)"
            )
        if ("cycle", sync) in results:
            notes.append(
                f"cycle ({sync}): enqueue part"
                f" {median_note('cycle', sync, 'enqueue part, events/s'):,.0f} events/s,"
                f" {median_note('cycle', sync, 'events/commit'):.0f} events/commit,"
                f" {median_note('cycle', sync, 'events/read'):.0f} events/read,"
                f" {median_note('cycle', sync, 'delete transactions'):.0f} delete transactions"
                " (under load the Writer deletes every 0.5 s, agent.writer.CLEANUP_INTERVAL;"
                " once idle for 50 ms, as soon as a sink asks)"
            )
        if ("pq", sync) in results:
            counts = [int(r.notes["events"]) for r in results[("pq", sync)]]
            fewer = f" (fewer than N = {args.n:,})" if min(counts) < args.n else ""
            notes.append(
                f"persist-queue ({sync}): events per run {', '.join(f'{c:,}' for c in counts)}"
                + fewer
            )
    for note in notes:
        print(f"note: {note}")

    print()
    single = median(("raw", 1), "full")
    batched = median(("raw", RAW_BATCH), "full")
    enqueue = median("enqueue", "full")
    cycle = median("cycle", "full")
    raw_cycle = median("rawcycle", "full")
    if batched is not None and enqueue is not None:
        share = enqueue / batched
        verdict = "MET" if share >= 0.5 else "MISSED"
        single_share = f"; {enqueue / single:.0%} of one transaction" if single else ""
        print(
            f"target: edge-agent enqueue >= 50% of raw batched, {RAW_BATCH:,}/transaction"
            f" (sync=full): {enqueue:,.0f} / {batched:,.0f} = {share:.0%} -> {verdict}"
            f"{single_share}"
        )
    if cycle is not None:
        verdict = "MET" if cycle >= 100_000 else "MISSED"
        ceiling = f" (raw sqlite3 in one thread: {raw_cycle:,.0f})" if raw_cycle else ""
        print(
            f"target: edge-agent full cycle >= 100,000 events/s (sync=full):"
            f" {cycle:,.0f}{ceiling} -> {verdict}"
        )
    print(f"\nwhole run: {time.perf_counter() - began:.0f} s")
    rows = table_rows(
        {
            key: median(key, "full")
            for key in (("raw", 1), ("raw", RAW_BATCH), "rawcycle", "enqueue", "cycle")
        },
        median("pq", "full"),
    )
    write_results(args.json, "queue", rows)
    return 0


def table_rows(rates: dict[object, float | None], pq: float | None) -> list[Row]:
    """The rows bench/run_all.py shows, all with sync = "full"; a method not run is left out."""
    single, batched = rates[("raw", 1)], rates[("raw", RAW_BATCH)]
    enqueue, cycle, raw_cycle = rates["enqueue"], rates["cycle"], rates["rawcycle"]
    rows = []
    if enqueue is not None:
        raw = []
        if single is not None:
            raw.append(f"{single:,.0f}/s in one transaction")
        if batched is not None:
            raw.append(f"{batched:,.0f}/s in batches of {RAW_BATCH:,}")
        met, target = None, ""
        if batched is not None:
            met = enqueue >= 0.5 * batched
            target = (
                f">= 50% of raw, {RAW_BATCH:,}/transaction: {enqueue / batched:.0%},"
                f" {met_or_missed(met)}"
            )
        rows.append(
            Row(
                what='Enqueue, `sync = "full"` (`bench/queue.py`)',
                agent=f"{enqueue:,.0f} events/s",
                beside=("raw sqlite3 `executemany`: " + ", ".join(raw)) if raw else "",
                target=target,
                met=met,
                values={
                    "events_per_s": enqueue,
                    "raw_single_per_s": single,
                    "raw_batched_per_s": batched,
                },
            )
        )
    if cycle is not None:
        rows.append(
            Row(
                what='Enqueue + read + ack + delete, `sync = "full"`',
                agent=f"{cycle:,.0f} events/s",
                beside="; ".join(
                    part
                    for part in (
                        "" if raw_cycle is None else f"raw sqlite3, one thread: {raw_cycle:,.0f}/s",
                        "" if pq is None else f"persist-queue `SQLiteAckQueue`: {pq:,.0f}/s",
                    )
                    if part
                ),
                target=f">= 100,000/s: {met_or_missed(cycle >= 100_000)}",
                met=cycle >= 100_000,
                values={"events_per_s": cycle, "persist_queue_per_s": pq},
            )
        )
    return rows


def _label(key: object) -> str:
    return LABELS.get(key, str(key))  # type: ignore[call-overload]


if __name__ == "__main__":
    sys.exit(main())
