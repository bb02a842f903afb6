"""The status snapshot: what ``edge-agent status`` shows about the running agent.

The agent writes ``status.json`` in its state directory every few seconds
(write to a temporary file, then rename: a reader never sees half a file).
Nothing listens on a network port.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from typing import Any

from edge_agent.queue import read_stats
from edge_agent.statedir import holder

STATUS_FILE = "status.json"
#: A snapshot older than this many status intervals means the agent is not running.
STALE_AFTER = 4
#: A sink whose publish call waits longer than this (s) shows "no answer Ns" as its state.
STALLED_SHOWN_AFTER = 5.0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def snapshot(agent: Any) -> dict[str, Any]:
    """The agent's state as plain data."""
    stats = read_stats(agent.store, agent.config.routes())
    writer = agent.writer
    bounds = writer.bounds if writer is not None else None
    problems = agent.logged_problems
    return {
        "agent": agent.id,
        "pid": os.getpid(),
        "version": agent.version,
        "started": agent.started_at,
        "updated": _now(),
        "interval": agent.status_interval,
        "queue": {
            "path": agent.store.path,
            "events": stats.events,
            "oldest": stats.oldest_time,
            "newest": stats.newest_time,
            "file_bytes": _size(agent.store.path) + _size(agent.store.path + "-wal"),
            "committed": writer.committed if writer is not None else 0,
            "uncommitted": writer.uncommitted if writer is not None else 0,
            "waiting_for_room": writer.waiting_for_room if writer is not None else False,
            "dropped": dict(bounds.dropped) if bounds is not None else {},
            "dropped_by_reason": (
                _by_reason(bounds.dropped_by_reason) if bounds is not None else {}
            ),
            "full": bounds.full_reason if bounds is not None else None,
            "damaged_copies": agent.store.damaged_copies(),
        },
        "sinks": {
            f.name: {
                "target": f.sink.target,
                "connected": f.connected,
                "stalled_for": _waiting(f.publishing_since),
                "backlog": stats.sink_backlog.get(f.name, 0),
                "confirmed": f.confirmed,
                "bytes": f.confirmed_bytes,
                "reconnects": f.reconnects,
                "refused": getattr(f.sink, "refused", 0),
                "dead_letters": stats.dead_letters.get(f.name, 0),
                "dead_lettered": f.dead_lettered,
                "dead_letters_dropped": (
                    bounds.dead_letters_dropped.get(f.name, 0) if bounds is not None else 0
                ),
                "errors": f.errors,
                "warnings": problems.get("sink", f.name),
                "latency": {"count": f.latency.count, **f.latency.percentiles()},
                "drain": _drain(f),
                "last_error": f.last_error,
            }
            for f in agent.forwarders
        },
        "sources": {
            runner.source.name: {
                "plugin": runner.plugin,
                "events": agent.events_in.get(runner.source.name, 0),
                "bytes": agent.bytes_in.get(runner.source.name, 0),
                "restarts": runner.restarts,
                "errors": runner.errors + agent.commit_errors.get(runner.source.name, 0),
                "warnings": problems.get("source", runner.source.name),
                "gaps": agent.gaps.get(runner.source.name, 0),
                "counters": dict(runner.source.counters),
                "listening": runner.source.is_listening.is_set(),
                "last_error": runner.last_error,
            }
            for runner in agent.sources
        },
        "processors": {
            p.name: {
                "dropped": p.dropped,
                "errors": agent.processor_errors.get(p.name, 0),
                "warnings": problems.get("processor", p.name),
            }
            for p in agent.processors
        },
    }


def queue_stats(store: Any, routes: Any) -> dict[str, Any]:
    """The queue as ``edge-agent queue stats --json`` prints it: events, bytes on disk
    (with the WAL), oldest and newest, each sink's backlog and dead letters."""
    stats = read_stats(store, routes)
    return {
        "path": store.path,
        "events": stats.events,
        "bytes": _size(store.path) + _size(store.path + "-wal"),
        "oldest": stats.oldest_time,
        "newest": stats.newest_time,
        "sinks": stats.sink_backlog,
        "dead_letters": stats.dead_letters,
    }


def _waiting(since: float | None) -> float | None:
    """Seconds a publish call has been waiting for its answer, or None when none is."""
    return None if since is None else round(time.monotonic() - since, 1)


def _by_reason(counts: Any) -> dict[str, dict[str, int]]:
    """{reason: {source: count}} from a Counter of (source, reason)."""
    result: dict[str, dict[str, int]] = {}
    for (source, reason), count in dict(counts).items():  # a copy: the writer updates it
        result.setdefault(reason, {})[source] = count
    return result


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def write(state_dir: str, data: dict[str, Any], previous: dict[str, Any] | None = None) -> None:
    """Replace the snapshot atomically.

    When nothing but the time changed since ``previous`` (an idle agent), only the
    file's time is touched: readers judge freshness by it, and a device's flash
    is spared a rewrite every few seconds.
    """
    path = os.path.join(state_dir, STATUS_FILE)
    if previous is not None and {**previous, "updated": None} == {**data, "updated": None}:
        try:
            os.utime(path)
            return
        except OSError:
            pass  # gone: write it again
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
    os.replace(temporary, path)


def read(state_dir: str) -> tuple[dict[str, Any] | None, str | None]:
    """(snapshot, None), or (last snapshot or None, why the agent seems not to run)."""
    path = os.path.join(state_dir, STATUS_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None, f"no status in {state_dir}: the agent has not run with this config"
    except (OSError, ValueError) as exc:
        return None, f"cannot read {path}: {exc}"
    modified = os.path.getmtime(path)
    # An idle agent only touches the file (see write()): its time is the snapshot's.
    data["updated"] = datetime.fromtimestamp(modified, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    age = time.time() - modified
    pid = data.get("pid")
    if not running(state_dir, pid):
        return data, (
            f"the agent is not running: pid {pid} has ended (its last status is {age:.0f}s old)"
        )
    if age > STALE_AFTER * data.get("interval", 5):
        return data, f"the agent is not running: its last status is {age:.0f}s old"
    return data, None


def running(state_dir: str, pid: Any) -> bool:
    """Does an agent hold ``state_dir`` now? Else, does ``pid`` still run an edge-agent?

    The state directory's lock says it best (see :mod:`edge_agent.statedir`); without
    a lock file (an older agent wrote the snapshot) the pid is checked: it must
    be alive and its command line that of edge-agent, since pids are reused.
    """
    try:
        return holder(state_dir) is not None
    except OSError:
        pass
    if not isinstance(pid, int) or pid <= 0:
        return True  # cannot tell: the snapshot's age decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except FileNotFoundError:
        return False
    except OSError:
        return True  # alive; cannot tell more (hidepid)
    return any(b"edge-agent" in arg for arg in argv) or b"edge_agent" in argv[1:3]


def render(data: dict[str, Any]) -> str:
    """The snapshot as an operator reads it at a terminal."""
    queue = data["queue"]
    lines = [
        f"agent {data['agent']} (pid {data['pid']}, version {data['version']},"
        f" up since {data['started']}, status at {data['updated']})",
        f"queue: {queue['events']} events, {queue['file_bytes'] / 2**20:.1f} MiB on disk,"
        f" oldest {queue['oldest'] or '-'}",
    ]
    if queue["full"]:
        lines.append(f"  cannot grow: {queue['full']}")
    reasons = {"queue_full": "when full", "max_age": "older than max_age"}
    # A snapshot of an older version has only "dropped" (when full or too old).
    by_reason = queue.get("dropped_by_reason", {"queue_full or max_age": queue["dropped"]})
    for reason, counts in by_reason.items():
        if not counts:
            continue
        dropped = ", ".join(f"{s}: {n}" for s, n in counts.items())
        lines.append(f"  dropped {reasons.get(reason, reason)}: {dropped}")
    for copy in queue["damaged_copies"]:
        lines.append(f"  WARNING: a damaged queue was moved aside to {copy}")
    sinks = [
        ("SINK", "STATE", "WAITING", "CONFIRMED", "RECONNECTS", "REFUSED", "DEAD", "ERRORS/WARN",
         "LATENCY p50/p99", "LAST ERROR"),
    ]  # fmt: skip
    for name, sink in data["sinks"].items():
        state = "connected" if sink["connected"] else "offline"
        stalled = sink.get("stalled_for")
        if stalled is not None and stalled >= STALLED_SHOWN_AFTER:
            state = f"no answer {stalled:.0f}s"
        sinks.append(
            (
                f"{name} ({sink['target']})",
                state,
                str(sink["backlog"]),
                str(sink["confirmed"]),
                str(sink["reconnects"]),
                str(sink["refused"]),
                str(sink.get("dead_letters", "-")),
                _problems(sink),
                _latency(sink.get("latency")),
                sink["last_error"] or "-",
            )
        )
    sources = [("SOURCE", "PLUGIN", "EVENTS", "RESTARTS", "GAPS", "ERRORS/WARN", "LAST ERROR")]
    for name, source in data["sources"].items():
        sources.append(
            (
                name,
                source["plugin"],
                str(source["events"]),
                str(source["restarts"]),
                str(source.get("gaps", "-")),
                _problems(source),
                source["last_error"] or "-",
            )
        )
    tables = [sinks, sources]
    if data["processors"]:
        processors = [("PROCESSOR", "DROPPED", "ERRORS/WARN")]
        for name, processor in data["processors"].items():
            processors.append((name, str(processor["dropped"]), _problems(processor)))
        tables.append(processors)
    # Each table is aligned on its own longest cell; the first column of all of them on
    # the longest name, so the tables line up under each other.
    first = max(len(row[0]) for table in tables for row in table)
    for table in tables:
        lines.append("")
        lines += _aligned(table, first)
    notes = len(lines)
    for name, sink in data["sinks"].items():
        if sink.get("dead_letters"):
            lines.append(
                f"sink {name}: {sink['dead_letters']} dead letters"
                f" (see: edge-agent queue dead list --sink {name})"
            )
        if sink.get("dead_letters_dropped"):
            lines.append(
                f"sink {name}: {sink['dead_letters_dropped']} dead letters dropped by the"
                " queue's bounds"
            )
    for name, source in data["sources"].items():
        if source.get("counters"):
            counters = sorted(source["counters"].items())
            counts = ", ".join(f"{key} {value}" for key, value in counters)
            lines.append(f"source {name}: {counts}")
    if len(lines) > notes:
        lines.insert(notes, "")  # the notes below the tables, apart from the last one
    return "\n".join(lines)


def _aligned(table: list[tuple[str, ...]], first: int) -> list[str]:
    """The rows of ``table`` with each column padded to its widest cell (the first to
    ``first``), two spaces apart; the last column is left as long as it is."""
    widths = [first] + [max(len(row[i]) for row in table) for i in range(1, len(table[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]


def _problems(counters: dict[str, Any]) -> str:
    """errors/warnings; "-" for either one a snapshot of an older version lacks."""
    return f"{counters.get('errors', '-')}/{counters.get('warnings', '-')}"


def _drain(forwarder: Any) -> dict[str, Any]:
    """A sink's drain limits (agent/drain.py), the seconds it waited for them, and the
    cut-off while live events go before a backlog (None otherwise)."""
    limits = forwarder.limits
    return {
        "max_rate": limits.max_rate,
        "max_bytes_rate": int(limits.max_bytes_rate),
        "priority": limits.priority,
        "rate_waited": round(forwarder.rate_waited, 3),
        "live_after": forwarder.live_after,
    }


def _latency(latency: dict[str, Any] | None) -> str:
    if not latency or latency.get("p50") is None:
        return "-"
    return f"{_ms(latency['p50'])}/{_ms(latency['p99'])}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms" if seconds >= 0.01 else f"{seconds * 1000:.1f}ms"
