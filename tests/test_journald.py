"""The journald source against real journal files.

journald does not run everywhere tests run (a container), so the journals here
are built by systemd-journal-remote from the journal export format, in a folder
the source reads with its ``directory`` option: the same files, and the same
journalctl, as on a device.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import first_deliveries, run_cli

from edge_agent.plugins.journald import JournaldSource
from edge_agent.testing import SourceHarness, wait_for

pytestmark = pytest.mark.timeout(60)

JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"
BOOT_ID = "0123456789abcdef0123456789abcdef"

needs_tools = pytest.mark.skipif(
    not os.path.exists(JOURNAL_REMOTE) or shutil.which("journalctl") is None,
    reason="needs journalctl and systemd-journal-remote to build journal files: install"
    " Debian's systemd-journal-remote package (make test-tools does it as root)",
)


class Journal:
    """Journal files in a folder, written by systemd-journal-remote from the export format.

    Each :meth:`write` appends entries to ``file`` (default ``remote.journal``); realtime
    and monotonic timestamps grow with every entry, so entries are ordered as written.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.clock = int(time.time() * 1e6) - 10_000_000
        self.lock = threading.Lock()

    def write(self, entries: list[dict[str, str | bytes]], file: str = "remote.journal") -> None:
        export = bytearray()
        with self.lock:
            for fields in entries:
                self.clock += 1000
                export += (
                    f"__REALTIME_TIMESTAMP={self.clock}\n"
                    f"__MONOTONIC_TIMESTAMP={self.clock - 1_700_000_000_000_000}\n"
                    f"_BOOT_ID={BOOT_ID}\n"
                ).encode()
                for name, value in fields.items():
                    if isinstance(value, bytes):
                        export += name.encode() + b"\n" + struct.pack("<Q", len(value))
                        export += value + b"\n"
                    else:
                        export += f"{name}={value}\n".encode()
                export += b"\n"
            subprocess.run(
                [JOURNAL_REMOTE, f"--output={self.folder / file}", "-"],
                input=bytes(export),
                check=True,
                capture_output=True,
                timeout=30,
            )

    def messages(self, texts: list[str], **fields: str) -> None:
        base = {"PRIORITY": "6", "SYSLOG_IDENTIFIER": "app", "_SYSTEMD_UNIT": "app.service"}
        self.write([{**base, **fields, "MESSAGE": text} for text in texts])


def numbered(prefix: str, count: int, start: int = 0) -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(start, start + count)]


def messages(harness: SourceHarness) -> list[str]:
    return [e.data["message"] for e in harness.events if e.type == "journal.entry"]


def config(journal: Journal, **extra) -> dict:
    return {"directory": str(journal.folder), "start_at": "beginning", **extra}


@pytest.fixture
def journal(tmp_path) -> Journal:
    return Journal(tmp_path / "journal")


@needs_tools
def test_entries_become_events_with_their_fields(journal):
    journal.write(
        [
            {
                "MESSAGE": "started the app",
                "PRIORITY": "3",
                "_PID": "4242",
                "_SYSTEMD_UNIT": "app.service",
                "SYSLOG_IDENTIFIER": "app",
                "_HOSTNAME": "gw-01",
                "CODE_LINE": "17",
                "BLOB": b"\x00\x01\xfe\xff",
                "COLOURED": b"\x1b[31mred\x1b[0m",
            },
            {"MESSAGE": b"not \xff utf-8", "SYSLOG_IDENTIFIER": "tool"},
        ]
    )
    with SourceHarness(JournaldSource, config(journal)) as harness:
        harness.wait_for_events(2)
    first, second = harness.events[:2]
    assert first.type == "journal.entry" and first.subject == "app.service"
    data = first.data
    assert data["message"] == "started the app"
    assert (data["priority"], data["priority_name"]) == (3, "err")
    assert data["pid"] == 4242 and data["unit"] == "app.service" and data["identifier"] == "app"
    assert data["hostname"] == "gw-01" and data["boot_id"] == BOOT_ID
    assert data["realtime"].endswith("Z") and data["cursor"].startswith("s=")
    assert data["fields"]["CODE_LINE"] == "17"
    assert data["fields"]["BLOB"] == {"base64": "AAH+/w=="}
    assert data["fields"]["COLOURED"] == "\x1b[31mred\x1b[0m"
    assert "MESSAGE" not in data["fields"] and "__CURSOR" not in data["fields"]
    assert second.subject == "tool" and second.data["unit"] is None
    assert second.data["message"] == {"base64": "bm90IP8gdXRmLTg="}
    assert second.data["priority"] is None


@needs_tools
def test_filters_select_units_identifiers_priority_and_fields(journal):
    journal.write(
        [
            {"MESSAGE": "a", "_SYSTEMD_UNIT": "app.service", "PRIORITY": "6"},
            {"MESSAGE": "b", "_SYSTEMD_UNIT": "app.service", "PRIORITY": "3"},
            {"MESSAGE": "c", "_SYSTEMD_UNIT": "other.service", "PRIORITY": "3"},
            {"MESSAGE": "d", "SYSLOG_IDENTIFIER": "cron", "PRIORITY": "2", "ROOM": "1"},
            {"MESSAGE": "e", "SYSLOG_IDENTIFIER": "cron", "PRIORITY": "2", "ROOM": "2"},
            {"MESSAGE": "f", "SYSLOG_IDENTIFIER": "kernel", "PRIORITY": "2", "ROOM": "3"},
        ]
    )
    cases = [
        ({"units": ["app.service"]}, ["a", "b"]),
        ({"units": ["app.service"], "priority": "err"}, ["b"]),
        ({"priority": 3}, ["b", "c", "d", "e", "f"]),
        ({"identifiers": ["cron", "kernel"]}, ["d", "e", "f"]),
        ({"identifiers": ["cron"], "matches": {"ROOM": "2"}}, ["e"]),
        ({"matches": {"ROOM": ["1", "3"], "PRIORITY": "2"}}, ["d", "f"]),
    ]
    for number, (options, expected) in enumerate(cases):
        last = {  # an entry these filters select, written last
            "MESSAGE": f"end{number}",
            "_SYSTEMD_UNIT": options.get("units", ["x.service"])[0],
            "SYSLOG_IDENTIFIER": options.get("identifiers", ["x"])[0],
            "PRIORITY": "0",
        }
        last.update(
            {k: v if isinstance(v, str) else v[0] for k, v in options.get("matches", {}).items()}
        )
        journal.write([last])
        with SourceHarness(JournaldSource, config(journal, **options)) as harness:
            wait_for(lambda h=harness, n=number: f"end{n}" in messages(h), 10, f"{options}")
        got = [m for m in messages(harness) if not m.startswith("end")]
        assert got == expected, options


@needs_tools
def test_start_at_end_sends_only_what_comes_after_the_first_start(journal):
    journal.messages(numbered("old", 3))
    with SourceHarness(JournaldSource, config(journal, start_at="end")) as harness:
        wait_for(harness.source.is_listening.is_set, 10, "the source to listen")
        journal.messages(numbered("new", 2))
        harness.wait_for_events(2)
    assert messages(harness) == numbered("new", 2)


@needs_tools
def test_resumes_after_the_committed_cursor(journal):
    journal.messages(numbered("a", 5))
    with SourceHarness(JournaldSource, config(journal)) as first:
        first.wait_for_events(5)
    journal.messages(numbered("b", 3))
    with SourceHarness(
        JournaldSource, config(journal), checkpoints=first.saved_checkpoints
    ) as second:
        second.wait_for_events(3)
        journal.messages(numbered("c", 2))
        second.wait_for_events(5)
    assert messages(second) == numbered("b", 3) + numbered("c", 2)
    assert second.saved_checkpoints["cursor"] == second.events[-1].data["cursor"]


@needs_tools
def test_a_vanished_cursor_is_one_gap_then_the_oldest_entry_on(journal):
    journal.messages(numbered("a", 5))
    with SourceHarness(JournaldSource, config(journal)) as first:
        first.wait_for_events(5)
    cursor = first.saved_checkpoints["cursor"]
    os.remove(journal.folder / "remote.journal")  # vacuumed while the agent was down
    journal.messages(numbered("b", 3))
    with SourceHarness(
        JournaldSource, config(journal), checkpoints=first.saved_checkpoints
    ) as second:
        second.wait_for_events(4)
    gap, *entries = second.events
    assert gap.type == "journal.gap" and gap.subject == str(journal.folder)
    assert gap.data["cursor"] == cursor and gap.data["from"] < gap.data["to"]
    assert "vacuumed" in gap.data["reason"]
    assert [e.data["message"] for e in entries] == numbered("b", 3)
    assert gap.data["to"] == entries[0].data["realtime"]
    with SourceHarness(
        JournaldSource, config(journal), checkpoints=second.saved_checkpoints
    ) as third:  # said once: the gap's checkpoint forgot the cursor
        journal.messages(["c"])
        third.wait_for_events(1)
    assert [e.type for e in third.events] == ["journal.entry"]


def test_bad_filters_are_config_errors(tmp_path):
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        f"""
        [agent]
        state_dir = "{tmp_path / "state"}"

        [[sources.journald]]
        priority = "loud"
        matches = {{ "unit" = "x" }}

        [[sinks.stdout]]
        """
    )
    done = run_cli("check", "-c", str(config_file))
    assert done.returncode == 78, done.stderr
    assert "priority must be 0 to 7" in done.stderr
    assert "'unit' is not a journal field name" in done.stderr


def test_filters_that_select_nothing_or_everything_are_config_errors(tmp_path):
    """An empty unit or identifier would send nothing; an empty list of values for a
    field would send every entry, although every field given must match."""
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        f"""
        [agent]
        state_dir = "{tmp_path / "state"}"

        [[sources.journald]]
        units = ["app.service", ""]
        identifiers = [" "]
        matches = {{ _TRANSPORT = [], _COMM = "sshd" }}

        [[sinks.stdout]]
        """
    )
    done = run_cli("check", "-c", str(config_file))
    assert done.returncode == 78, done.stderr
    assert "sources.journald.units: an empty unit selects no entry" in done.stderr
    assert "sources.journald.identifiers: an empty identifier selects no entry" in done.stderr
    assert "sources.journald.matches: _TRANSPORT = [] lists no value" in done.stderr
    assert "_COMM" not in done.stderr
    assert "3 problems" in done.stderr


def test_a_journalctl_that_is_not_there_is_a_config_error(tmp_path):
    not_executable = tmp_path / "journalctl"
    not_executable.write_text("#!/bin/sh\n")
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        f"""
        [agent]
        state_dir = "{tmp_path / "state"}"

        [[sources.journald]]
        name = "by-path"
        journalctl = "{tmp_path / "missing" / "journalctl"}"

        [[sources.journald]]
        name = "by-name"
        journalctl = "journalctl-of-nowhere"

        [[sources.journald]]
        name = "not-executable"
        journalctl = "{not_executable}"

        [[sources.journald]]
        name = "relative"
        journalctl = "bin/journalctl"

        [[sinks.stdout]]
        """
    )
    done = run_cli("check", "-c", str(config_file))
    assert done.returncode == 78, done.stderr
    install = "install journalctl (on Debian, the systemd package provides it)"
    assert (
        f"sources.journald[0].journalctl: {tmp_path / 'missing' / 'journalctl'} does not exist:"
        f" {install}" in done.stderr
    )
    assert (
        "sources.journald[1].journalctl: cannot find 'journalctl-of-nowhere' in the folders of"
        f" PATH ({os.environ['PATH']}): {install}" in done.stderr
    )
    assert f"sources.journald[2].journalctl: {not_executable} is not executable" in done.stderr
    assert "sources.journald[3].journalctl: bin/journalctl is a relative path" in done.stderr

    not_executable.chmod(0o755)  # a journalctl of one's own, by path or by name, is taken
    config_file.write_text(
        f"""
        [agent]
        state_dir = "{tmp_path / "state"}"

        [[sources.journald]]
        journalctl = "{not_executable}"

        [[sources.journald]]
        name = "by-name"
        journalctl = "journalctl"

        [[sinks.stdout]]
        """
    )
    done = run_cli("check", "-c", str(config_file), env={**os.environ, "PATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr


class Writer(threading.Thread):
    """Appends numbered entries to the journal in small batches until told to stop."""

    def __init__(self, journal: Journal) -> None:
        super().__init__(daemon=True)
        self.journal = journal
        self.written = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.01):
            self.journal.messages(numbered("m", 20, start=self.written))
            self.written += 20


def journalctl_children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for child in children:
            comm = Path(f"/proc/{child}/comm")
            if comm.exists() and comm.read_text().strip() == "journalctl":
                found.append(int(child))
    return found


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@needs_tools
@pytest.mark.timeout(120)
def test_sigkill_mid_stream_loses_and_repeats_nothing_and_journalctl_dies_too(
    tmp_path, journal, subscriber, running_broker, agent_process
):
    journal.messages(["before"])
    agent = agent_process(
        f"""
        [agent]
        id = "test-gw"
        state_dir = "{tmp_path / "state"}"

        [[sources.journald]]
        name = "journal"
        directory = "{journal.folder}"
        start_at = "end"

        [[sinks.mqtt]]
        name = "cloud"
        port = {running_broker.port}
        reconnect_min = "0.05s"
        reconnect_max = "0.2s"
        """
    )
    agent.start()
    agent.wait_ready()
    writer = Writer(journal)
    writer.start()
    rng = random.Random(20261201)
    try:
        for _ in range(6):
            children = wait_for(lambda: journalctl_children(agent.pid), 10, "journalctl")
            time.sleep(rng.uniform(0.3, 1.0))  # let it read for a while (# ok: the fault)
            agent.kill()
            wait_for(lambda c=children: all(gone(p) for p in c), 5, "journalctl to die too")
            agent.start()
            agent.wait_ready()
    finally:
        writer.stopping.set()
        writer.join()
    total = writer.written
    assert total >= 200, f"only {total} entries were written while the agent was killed"

    def delivered() -> list[str]:
        events = [e for e in subscriber.events() if e["type"] == "journal.entry"]
        return [e["data"]["message"] for e in first_deliveries(events)]

    wait_for(lambda: len(delivered()) >= total, 60, f"all {total} entries at the broker")
    assert delivered() == numbered("m", total), "every entry once, in order, none before"
    ids: dict[str, set[str]] = {}
    for event in subscriber.events():
        ids.setdefault(event["data"]["cursor"], set()).add(event["id"])
    assert all(len(found) == 1 for found in ids.values()), "an entry was read twice"
    assert agent.terminate() == 0
    assert not journalctl_children_left(tmp_path)


def journalctl_children_left(tmp_path) -> list[int]:
    """journalctl processes still reading this test's journal."""
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (
            b"journalctl" in cmdline
            and str(tmp_path).encode() in cmdline
            and not gone(int(proc.name))
        ):
            left.append(int(proc.name))
    return left


@needs_tools
def test_stopping_the_source_ends_journalctl(journal):
    journal.messages(["x"])
    with SourceHarness(JournaldSource, config(journal)) as harness:
        harness.wait_for_events(1)
        children = journalctl_children(os.getpid())
        assert children, "journalctl runs as a child"
    wait_for(lambda: all(gone(p) for p in children), 5, "journalctl to end with the source")


@needs_tools
def test_a_folder_without_journal_files_is_read_once_they_appear(journal, caplog):
    caplog.set_level(logging.INFO, logger="edge_agent")
    with SourceHarness(JournaldSource, config(journal, start_at="end")) as harness:
        wait_for(lambda: "starting journalctl again" in caplog.text, 10, "journalctl to end")
        assert harness.source.is_listening.is_set(), "READY does not wait for the journal"
        journal.messages(numbered("a", 3))
        harness.wait_for_events(3, timeout=20)
    assert messages(harness) == numbered("a", 3)
    assert caplog.text.count("starting journalctl again") == 1, "said once while the same"
    assert f"reading {journal.folder} again" in caplog.text
