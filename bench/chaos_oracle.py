"""The chaos soak's oracle: every serial a producer made, accounted for at the end.

Producers put a serial number in what they make (``ser-000000042`` in a file name, a
log line, a command's output) and note it in a :class:`Ledger` with when and where.
At the end, :func:`account` puts each serial in exactly one class, first match wins:

- **delivered**: in an event the subscriber received (its duplicates counted apart:
  the same event id received more than once);
- **dead**: in the agent's dead-letter table, with the reason;
- **stuck**: still in the agent's queue when the drain's deadline passed;
- **gap**: covered by a ``<kind>.gap`` event (see :func:`covers`);
- **cut**: printed by a command run that an agent stop cut short, so the agent never
  accepted it (the exec source cannot read it again, and does not claim a gap);
- **silent**: none of these. A silent loss fails the run.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

SERIAL = re.compile(r"ser-(\d{9})")
CLASSES = ("delivered", "dead", "stuck", "gap", "cut", "silent")


def serial_text(serial: int) -> str:
    """How a serial appears in what producers make."""
    return f"ser-{serial:09d}"


def serials_in(value: Any) -> set[int]:
    """Every serial named anywhere in ``value`` (an event's data, a JSON text)."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return {int(m) for m in SERIAL.findall(text)}


@dataclass
class Produced:
    """One serial: which producer made it, where (a file or folder path), and when."""

    serial: int
    producer: str
    where: str
    at: float


class Ledger:
    """What the producers made, thread-safe; serials are unique across producers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 1
        self.items: dict[int, Produced] = {}

    def take(self) -> int:
        """A new serial; call :meth:`note` once what carries it is made."""
        with self._lock:
            serial = self._next
            self._next += 1
            return serial

    def note(self, serial: int, producer: str, where: str, at: float) -> None:
        with self._lock:
            self.items[serial] = Produced(serial, producer, where, at)


@dataclass
class Window:
    """A fault: its kind, from injection until it was cleared (``time.time()``)."""

    kind: str
    start: float
    end: float | None = None
    detail: str = ""


@dataclass
class Received:
    """What the subscriber saw: events by id, and how many times each id came."""

    events: dict[str, dict] = field(default_factory=dict)
    copies: Counter = field(default_factory=Counter)

    @classmethod
    def from_payloads(cls, payloads: Iterable[bytes]) -> Received:
        received = cls()
        for payload in payloads:
            try:
                document = json.loads(payload)
            except ValueError:
                continue
            for event in document if isinstance(document, list) else [document]:
                if isinstance(event, dict) and "id" in event:
                    received.events.setdefault(event["id"], event)
                    received.copies[event["id"]] += 1
        return received


def read_dead_letters(db_path: str) -> list[dict]:
    """The agent's dead letters: ``type``, ``data`` (JSON text), ``reason``, ``sink``.

    Read from the queue file's ``dead_letters`` table (agent/migrations.py), read-only;
    an empty list while the agent has no such table. The one place that knows how dead
    letters are stored: adapt it here if that changes (``edge-agent queue dead list
    --json`` shows the same).
    """
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return []
    try:
        rows = conn.execute("SELECT sink, type, data, reason FROM dead_letters").fetchall()
    except sqlite3.Error:
        return []
    finally:
        conn.close()
    return [{"sink": s, "type": t, "data": d, "reason": r} for s, t, d, r in rows]


def read_queued(db_path: str) -> list[str]:
    """The data (JSON text) of every event still in the agent's queue, dead letters
    left out (a dead letter may stay there until every other sink has it)."""
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return []
    try:
        try:
            query = "SELECT data FROM events WHERE id NOT IN (SELECT id FROM dead_letters)"
            return [row[0] for row in conn.execute(query)]
        except sqlite3.OperationalError:  # no dead_letters table
            return [row[0] for row in conn.execute("SELECT data FROM events")]
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def queued_count(db_path: str) -> int:
    """How many events are still queued, dead letters left out (as :func:`read_queued`);
    -1 if it cannot be read now."""
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return -1
    try:
        try:
            query = "SELECT COUNT(*) FROM events WHERE id NOT IN (SELECT id FROM dead_letters)"
            return conn.execute(query).fetchone()[0]
        except sqlite3.OperationalError:  # no dead_letters table
            return conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    except sqlite3.Error:
        return -1
    finally:
        conn.close()


def _time(value: Any) -> float | None:
    """An RFC 3339 time (or a number) as ``time.time()`` seconds; None if neither."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _same_place(gap_path: str, where: str) -> bool:
    """A gap naming ``gap_path`` speaks of ``where``: the same file, a rotated
    generation of it (``app.log.1``), or a folder holding it."""
    gap_path = gap_path.rstrip("/")
    return where == gap_path or gap_path.startswith(where) or where.startswith(gap_path + "/")


def covers(gap: dict, item: Produced) -> bool:
    """Does this gap event cover this otherwise missing serial?

    The gap must name the serial's place (``path``), if it names one, and its time
    window must hold the moment the serial was made: ``from``/``to`` or
    ``since``/``until`` where given, else anything made before the gap was reported
    (its ``time``). Gaps that give a count and no place (``queue.gap``: ``events``
    between ``oldest`` and ``newest``) are handled by :func:`account`.
    """
    data = gap.get("data") or {}
    if not isinstance(data, dict):
        return False
    path = data.get("path")
    if isinstance(path, str) and not _same_place(path, item.where):
        return False
    start = _time(data.get("from", data.get("since")))
    end = _time(data.get("to", data.get("until"))) or _time(gap.get("time"))
    if start is not None and item.at < start:
        return False
    return end is None or item.at <= end


@dataclass
class Verdict:
    """Each serial's class, the duplicates, and what the gaps and dead letters said."""

    classes: dict[int, str]
    duplicates: Counter  # serial -> extra copies received
    reasons: Counter  # dead-letter reason -> serials
    gaps: list[dict]
    unknown_serials: set[int]  # seen at the subscriber, never produced: a harness bug


def account(
    ledger: Ledger,
    received: Received,
    dead_letters: list[dict],
    queued: list[str],
    stops: list[tuple[float, float]],
    cut_within: float,
) -> Verdict:
    """Put every produced serial in one class (see the module's docstring).

    ``stops`` are (stopped, ready again) times of every agent stop; an ``exec``
    serial made from ``cut_within`` seconds before a stop until the agent was ready
    again counts as cut when nothing else accounts for it.
    """
    delivered: set[int] = set()
    duplicates: Counter = Counter()
    gaps = []
    for event_id, event in received.events.items():
        if str(event.get("type", "")).endswith(".gap"):
            gaps.append(event)
            continue
        found = serials_in(event.get("data"))
        delivered |= found
        for serial in found:
            duplicates[serial] += received.copies[event_id] - 1
    dead: set[int] = set()
    reasons: Counter = Counter()
    for letter in dead_letters:
        found = serials_in(letter["data"])
        dead |= found
        for _ in found:
            reasons[letter["reason"]] += 1
    stuck: set[int] = set()
    for data in queued:
        stuck |= serials_in(data)

    classes: dict[int, str] = {}
    missing: list[Produced] = []
    for serial, item in sorted(ledger.items.items()):
        if serial in delivered:
            classes[serial] = "delivered"
        elif serial in dead:
            classes[serial] = "dead"
        elif serial in stuck:
            classes[serial] = "stuck"
        else:
            missing.append(item)
    counted: dict[str, int] = defaultdict(int)  # count-only gap id -> serials covered
    for item in missing:
        cls = "silent"
        for gap in gaps:
            data = gap.get("data") or {}
            if isinstance(data, dict) and "path" not in data and "events" in data:
                # A queue.gap: so many events lost, made between oldest and newest.
                limit = data.get("events") or 0
                start = (_time(data.get("oldest")) or 1.0) - 1.0  # event time >= made
                end = _time(data.get("newest")) or _time(gap.get("time")) or 0.0
                if counted[gap["id"]] < limit and start <= item.at <= end:
                    counted[gap["id"]] += 1
                    cls = "gap"
                    break
            elif covers(gap, item):
                cls = "gap"
                break
        cut = any(start - cut_within <= item.at <= end for start, end in stops)
        if cls == "silent" and item.producer == "exec" and cut:
            cls = "cut"
        classes[item.serial] = cls
    unknown = (delivered | dead) - set(ledger.items)
    return Verdict(classes, duplicates, reasons, gaps, unknown)


@dataclass
class Row:
    """One fault kind's line of the table."""

    kind: str
    injected: int = 0
    produced: int = 0
    counts: Counter = field(default_factory=Counter)
    duplicates: int = 0

    def cells(self) -> list[str]:
        values = [self.injected, self.produced, self.counts["delivered"], self.duplicates]
        values += [self.counts[c] for c in CLASSES[1:]]
        return [self.kind] + [f"{v:,}" for v in values]


HEADERS = ["fault", "injected", "produced", "delivered", "duplicates", *CLASSES[1:]]


def attribute(item: Produced, windows: list[Window]) -> str:
    """The fault kind active when the serial was made ("none": between faults)."""
    for window in windows:
        end = window.end if window.end is not None else float("inf")
        if window.start <= item.at <= end:
            return window.kind
    return "none"


def rows(ledger: Ledger, verdict: Verdict, windows: list[Window], kinds: list[str]) -> list[Row]:
    """One row per fault kind (in ``kinds`` order), "none", and the totals."""
    table = {kind: Row(kind) for kind in [*kinds, "none"]}
    for window in windows:
        table.setdefault(window.kind, Row(window.kind)).injected += 1
    for serial, item in ledger.items.items():
        row = table.setdefault(attribute(item, windows), Row("?"))
        row.produced += 1
        row.counts[verdict.classes[serial]] += 1
        row.duplicates += verdict.duplicates[serial]
    total = Row("total")
    for row in table.values():
        total.injected += row.injected
        total.produced += row.produced
        total.counts.update(row.counts)
        total.duplicates += row.duplicates
    return [*table.values(), total]


def markdown(table: list[Row]) -> str:
    """The table, in Markdown."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in table]
    return "\n".join(lines)
