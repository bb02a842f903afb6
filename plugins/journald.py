"""The ``journald`` source: entries of the systemd journal, followed from a committed cursor.

It reads through ``journalctl --output=json --follow`` as a child process (as
Vector does), not through a binding: no compiled dependency, the journal's own
reader with its own handling of rotation, corruption and new files, and one
small process that sleeps in inotify while nothing is logged. The child gets
``PR_SET_PDEATHSIG``: it is killed by the kernel when the agent dies, also by
SIGKILL.

The cursor of the last entry of each batch is committed in the same SQLite
transaction as the batch's events, so after a crash or a power cut reading
resumes after exactly the last committed entry. A cursor the journal no longer
holds (vacuumed while the agent was stopped) is reported as a ``journal.gap``
event and reading goes on from the oldest entry left.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from edge_agent import Event, Source, hookimpl, option
from edge_agent.backoff import Backoff

#: Syslog priorities, by number.
PRIORITY_NAMES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
#: Aliases journalctl accepts too.
PRIORITY_ALIASES = {"emergency": 0, "critical": 2, "error": 3, "warn": 4, "information": 6}
CURSOR_KEY = "cursor"
#: Checkpoint key saying the source has run before (where to start is then known).
STARTED_KEY = "started"
READ_CHUNK = 256 * 1024
#: Entries committed in one transaction at most.
BATCH = 500
#: Lines of journalctl's standard error remembered, to log each of them once.
STDERR_LINES = 100
RESTART_MIN, RESTART_MAX = 1.0, 30.0
#: Promoted from the entry's fields to keys of their own in ``data``.
PROMOTED = {
    "MESSAGE": "message",
    "_PID": "pid",
    "_SYSTEMD_UNIT": "unit",
    "SYSLOG_IDENTIFIER": "identifier",
    "_BOOT_ID": "boot_id",
    "_HOSTNAME": "hostname",
    "__CURSOR": "cursor",
}
#: A journal field name that can be matched: upper case, digits, "_", not a digit first.
FIELD_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def priority_number(value: int | str) -> int:
    """0..7 from a number or a name ("err", "warning"...); ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 7:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit() and 0 <= int(text) <= 7:
            return int(text)
        if text in PRIORITY_NAMES:
            return PRIORITY_NAMES.index(text)
        if text in PRIORITY_ALIASES:
            return PRIORITY_ALIASES[text]
    raise ValueError(
        f"priority must be 0 to 7 or one of {', '.join(PRIORITY_NAMES)}, got {value!r}"
    )


def field_value(value: Any) -> Any:
    """A journalctl JSON field value as the event carries it.

    Text stays text. journalctl writes a value that is not printable UTF-8 as an
    array of byte values: it becomes text if it is valid UTF-8 without NUL bytes
    (a message with colour codes), else ``{"base64": "..."}``. A field that
    occurs several times in the entry is a list of such values; a value too
    large for journalctl (it says null) stays None.
    """
    if isinstance(value, list):
        if value and all(isinstance(item, int) for item in value):
            raw = bytes(value)
            if b"\0" not in raw:
                with contextlib.suppress(UnicodeDecodeError):
                    return raw.decode("utf-8")
            return {"base64": base64.b64encode(raw).decode("ascii")}
        if not value:
            return ""
        return [field_value(item) for item in value]
    return value


def rfc3339_usec(usec: int) -> str:
    """Microseconds since the epoch as RFC 3339 UTC text."""
    return datetime.fromtimestamp(usec / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def cursor_realtime(cursor: str) -> str | None:
    """The wall-clock time (RFC 3339) a journal cursor points at, if it says."""
    parts = dict(p.split("=", 1) for p in cursor.split(";") if "=" in p)
    with contextlib.suppress(KeyError, ValueError, OverflowError, OSError):
        return rfc3339_usec(int(parts["t"], 16))
    return None


def cursor_seqnum(cursor: str) -> tuple[str, int] | None:
    """(sequence number id, sequence number) of a cursor, if it says."""
    parts = dict(p.split("=", 1) for p in cursor.split(";") if "=" in p)
    with contextlib.suppress(KeyError, ValueError):
        return parts["s"], int(parts["i"], 16)
    return None


def entry_data(entry: dict[str, Any]) -> dict[str, Any]:
    """The ``data`` of a ``journal.entry`` event, from one journalctl JSON entry."""
    fields = {name: field_value(value) for name, value in entry.items()}
    data: dict[str, Any] = {key: fields.pop(name, None) for name, key in PROMOTED.items()}
    priority = fields.pop("PRIORITY", None)
    try:
        number = int(priority) if priority is not None else None
    except (TypeError, ValueError):
        number = None
    data["priority"] = number
    data["priority_name"] = (
        PRIORITY_NAMES[number] if number is not None and 0 <= number <= 7 else None
    )
    if isinstance(data["pid"], str) and data["pid"].isdigit():
        data["pid"] = int(data["pid"])
    realtime = fields.pop("__REALTIME_TIMESTAMP", None)
    try:
        data["realtime"] = rfc3339_usec(int(realtime)) if realtime is not None else None
    except (TypeError, ValueError, OverflowError, OSError):
        data["realtime"] = None
    data["fields"] = fields
    return data


def _no_empty_names(names: list[str], what: str, example: str) -> None:
    """A config validator: an empty name would select nothing (or, to journalctl, anything)."""
    if any(not name.strip() for name in names):
        raise ValueError(
            f"an empty {what} selects no entry: give {what} names (such as {example}),"
            " or leave the list empty to send every entry"
        )


def _no_empty_matches(matches: dict[str, str | list[str]]) -> None:
    """A config validator: every field given must match, and an empty list matches nothing."""
    empty = [field for field, values in matches.items() if values == []]
    if empty:
        raise ValueError(
            f"{', '.join(empty)} = [] lists no value: every field given must match, so give"
            f' the values to match (FIELD = "value" or ["a", "b"]), or remove the field'
        )


#: How to get journalctl, in messages.
INSTALL_JOURNALCTL = (
    "install journalctl (on Debian, the systemd package provides it) or set journalctl to its path"
)


def _find_journalctl(program: str) -> None:
    """A config validator: the journalctl program must be there, as a path or on PATH."""
    if not program.strip():
        raise ValueError(f"is empty: {INSTALL_JOURNALCTL}")
    if os.sep in program:
        if not os.path.isabs(program):
            raise ValueError(
                f"{program} is a relative path (the service does not run from this folder):"
                " give an absolute path, or a name found on PATH"
            )
        if not os.path.isfile(program):
            raise ValueError(f"{program} does not exist: {INSTALL_JOURNALCTL}")
        if not os.access(program, os.X_OK):
            raise ValueError(f"{program} is not executable: make it so (chmod +x) or fix the path")
        return
    if shutil.which(program) is None:
        path = os.environ.get("PATH", os.defpath)
        raise ValueError(
            f"cannot find {program!r} in the folders of PATH ({path}): {INSTALL_JOURNALCTL}"
        )


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL when the thread that started it ends."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the agent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class JournaldSource(Source):
    """Emits ``journal.entry`` for every entry of the journal that the filters select."""

    announces_listening = True

    @dataclass(kw_only=True)
    class Config:
        units: list[str] = option(
            [],
            doc='Only entries of these systemd units (journalctl -u; globs allowed: "ssh*").',
            validator=lambda units: _no_empty_names(units, "unit", '"ssh.service"'),
        )
        identifiers: list[str] = option(
            [],
            doc="Only entries with these syslog identifiers (journalctl -t).",
            validator=lambda names: _no_empty_names(names, "identifier", '"sshd"'),
        )
        priority: int | str | None = option(
            None,
            doc='Only entries of this priority or more urgent: 0 to 7, or "emerg" ... "debug"'
            ' ("warning": 0 to 4).',
        )
        matches: dict[str, str | list[str]] = option(
            {},
            doc="Field matches: FIELD = value, or a list of values (any of them). Every field"
            " must match.",
            validator=_no_empty_matches,
        )
        directory: str | None = option(
            None, doc="Read the journal files in this folder instead of the system journal."
        )
        start_at: Literal["beginning", "end"] = option(
            "end",
            doc='The first time the source runs: "end" sends only entries written from then'
            ' on, "beginning" the whole journal too.',
        )
        journalctl: str = option(
            "journalctl",
            doc="The journalctl program (a name or a path).",
            validator=_find_journalctl,
        )

        def __post_init__(self) -> None:
            problems = []
            if self.priority is not None:
                try:
                    priority_number(self.priority)
                except ValueError as exc:
                    problems.append(str(exc))
            problems += [
                f"matches: {field!r} is not a journal field name (upper case letters, digits"
                ' and "_", not starting with "__", as in _SYSTEMD_UNIT or SYSLOG_IDENTIFIER)'
                for field in self.matches
                if not FIELD_NAME.match(field) or field.startswith("__")
            ]
            if problems:
                raise ValueError("; ".join(problems))

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._wake_r, self._wake_w = -1, -1
        self._wake_lock = threading.Lock()
        self._last_failure: str | None = None
        self._said_lines: set[str] = set()

    def stop(self) -> None:
        super().stop()
        with self._wake_lock:  # not a descriptor closed by run() and reused meanwhile
            if self._wake_w >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"x")

    @property
    def where(self) -> str:
        """The journal read, for messages and gap events."""
        return self.config.directory or "the system journal"

    # -- journalctl's command lines -------------------------------------------

    def _base(self) -> list[str]:
        binary = shutil.which(self.config.journalctl)
        if binary is None:
            raise RuntimeError(
                f"cannot find {self.config.journalctl!r}: install systemd's journalctl (Debian:"
                " the systemd package) or set journalctl to its path"
            )
        command = [binary, "--output=json", "--all", "--no-pager"]
        if self.config.directory:
            command.append(f"--directory={self.config.directory}")
        return command

    def _filters(self) -> list[str]:
        args = [f"--unit={unit}" for unit in self.config.units]
        args += [f"--identifier={ident}" for ident in self.config.identifiers]
        if self.config.priority is not None:
            args.append(f"--priority=0..{priority_number(self.config.priority)}")
        for field, values in self.config.matches.items():
            for value in [values] if isinstance(values, str) else values:
                args.append(f"{field}={value}")
        return args

    def _one_entry(self, *args: str) -> dict[str, Any] | None:
        """The first entry journalctl prints with ``args`` (no filters), or None."""
        done = subprocess.run(
            [*self._base(), *args],
            capture_output=True,
            timeout=60,
            env=self._env(),
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"journalctl could not read {self.where} (exit code {done.returncode}):"
                f" {done.stderr.decode(errors='replace').strip() or 'no message'}"
            )
        line = done.stdout.split(b"\n", 1)[0]
        return json.loads(line) if line.strip() else None

    @staticmethod
    def _env() -> dict[str, str]:
        return {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "SYSTEMD_LESS": ""}

    # -- where to start ----------------------------------------------------------

    def _start_cursor(self) -> str | None:
        """The cursor to follow from (its entry is already sent), or None: from the oldest.

        First run: the last entry's with ``start_at = "end"``. A committed cursor that
        the journal no longer holds is reported as a gap.
        """
        saved = self.checkpoints()
        cursor = saved.get(CURSOR_KEY)
        if cursor is None and STARTED_KEY not in saved:
            last = self._one_entry("--lines=1") if self.config.start_at == "end" else None
            cursor = last.get("__CURSOR") if last else None
            self.save_checkpoint({STARTED_KEY: "1", CURSOR_KEY: cursor})
            return cursor
        if cursor is None:
            return None
        found = self._one_entry(f"--cursor={cursor}", "--lines=1")
        if found is not None and found.get("__CURSOR") == cursor:
            return cursor
        self._report_vanished(cursor, found)
        return None

    def _report_vanished(self, cursor: str, oldest: dict[str, Any] | None) -> None:
        data: dict[str, Any] = {
            "reason": f"{self.where} no longer holds the entry this source had read up to"
            " (vacuumed or rotated away while the agent was stopped, or the journal files"
            " were replaced): entries written after it and before the oldest entry left were"
            " not read; reading goes on from the oldest entry left",
            "cursor": cursor,
        }
        if self.config.directory:
            data["directory"] = self.config.directory
        data["from"] = cursor_realtime(cursor)
        if oldest is not None:
            data["oldest_cursor"] = oldest.get("__CURSOR")
            stamp = oldest.get("__REALTIME_TIMESTAMP")
            data["to"] = rfc3339_usec(int(stamp)) if stamp else None
            before, after = cursor_seqnum(cursor), cursor_seqnum(oldest.get("__CURSOR") or "")
            if before and after and before[0] == after[0] and after[1] > before[1]:
                data["journal_entries"] = after[1] - before[1] - 1
        else:
            data["to"] = rfc3339_usec(int(time.time() * 1e6))
        self.report_gap(
            "journal.gap",
            data,
            subject=self.config.directory or "journal",
            checkpoint={CURSOR_KEY: None},
        )

    # -- the loop --------------------------------------------------------------

    def run(self) -> None:
        backoff = Backoff(RESTART_MIN, RESTART_MAX)
        self._wake_r, self._wake_w = os.pipe()
        try:
            while not self.stopping.is_set():
                started = time.monotonic()
                failure = self._follow()
                if failure is None or self.stopping.is_set():
                    return
                if time.monotonic() - started > RESTART_MAX:
                    backoff.reset()
                delay = backoff.next()
                if failure != self._last_failure:
                    self.log.warning("%s; starting journalctl again in %.1fs", failure, delay)
                else:  # the same again: said once
                    self.log.debug("%s; starting journalctl again in %.1fs", failure, delay)
                self._last_failure = failure
                self.count("journalctl_restarts")
                self.stopping.wait(delay)
        finally:
            with self._wake_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r, self._wake_w = -1, -1

    def _follow(self) -> str | None:
        """Run journalctl --follow from the committed cursor until it ends or the source
        stops; None when told to stop, else why journalctl ended."""
        try:
            cursor = self._start_cursor()
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
            self.listening()  # tried: it is tried again, and READY must not wait for it
            return str(exc)
        command = [*self._base(), "--follow", "--no-tail", *self._filters()]
        if cursor is not None:
            command.append(f"--cursor={cursor}")
        try:
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env(),
                preexec_fn=_die_with_parent(os.getpid()),  # prctl only: safe after fork
            )
        except OSError as exc:
            self.listening()
            return f"cannot start journalctl: {exc}"
        self.log.info(
            "following %s%s", self.where, f" after {cursor}" if cursor else " from its start"
        )
        self.listening()
        try:
            return self._read(child, skip=cursor)
        finally:
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(2)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            assert child.stdout is not None and child.stderr is not None
            child.stdout.close()
            child.stderr.close()

    def _read(self, child: subprocess.Popen, skip: str | None) -> str | None:
        assert child.stdout is not None and child.stderr is not None
        out, err = child.stdout.fileno(), child.stderr.fileno()
        partial, errors = b"", b""
        last_said = ""
        open_fds = {out, err, self._wake_r}
        while not self.stopping.is_set():
            ready, _, _ = select.select(list(open_fds), [], [])
            if self._wake_r in ready:
                return None
            if err in ready:
                chunk = os.read(err, 65536)
                if not chunk:
                    open_fds.discard(err)
                errors += chunk
                *lines, errors = errors.split(b"\n")
                for line in lines:
                    if line.strip():
                        last_said = line.decode(errors="replace").strip()
                        self._stderr(last_said)
            if out not in ready:
                continue
            chunk = os.read(out, READ_CHUNK)
            if not chunk:
                break
            *lines, partial = (partial + chunk).split(b"\n")
            events, last = self._entries(lines, skip)
            skip = None
            if last is not None and not self._commit(events, last):
                return None
            if lines and self._last_failure is not None:
                self.log.info("reading %s again", self.where)
                self._last_failure = None
        code = child.wait()
        if errors.strip():
            last_said = errors.decode(errors="replace").strip()
            self._stderr(last_said)
        return (
            f"journalctl ended reading {self.where} (exit code {code}: {last_said or 'no message'})"
        )

    def _stderr(self, line: str) -> None:
        """Log a line journalctl wrote to stderr: a warning the first time, then debug."""
        if line in self._said_lines:
            self.log.debug("journalctl: %s", line)
            return
        if len(self._said_lines) < STDERR_LINES:
            self._said_lines.add(line)
        self.log.warning("journalctl: %s", line)

    def _entries(self, lines: list[bytes], skip: str | None) -> tuple[list[Event], str | None]:
        """The events of complete JSON lines, and the cursor of the last one."""
        events: list[Event] = []
        last = None
        for line in lines:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                self.count("unreadable_entries")
                self.log.warning(
                    "journalctl printed a line that is not JSON; skipped: %.200r", line
                )
                continue
            cursor = entry.get("__CURSOR")
            if skip is not None and cursor == skip:  # the last entry already sent
                skip = None
                continue
            skip = None
            data = entry_data(entry)
            subject = data["unit"] or data["identifier"]
            events.append(self.event("journal.entry", data, subject=subject))
            last = cursor or last
        return events, last

    def _commit(self, events: list[Event], cursor: str) -> bool:
        """Commit events with the cursor of the last, in transactions of at most BATCH."""
        for start in range(0, len(events), BATCH):
            chunk = events[start : start + BATCH]
            last = start + BATCH >= len(events)
            at = cursor if last else chunk[-1].data["cursor"]
            checkpoint = {CURSOR_KEY: at} if at else None
            if not self.emit_until_accepted(chunk, checkpoint=checkpoint):
                return False
        return True


@hookimpl
def register_sources(register):
    register("journald", JournaldSource)
