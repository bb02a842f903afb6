"""The systemd unit (verified and scored offline) and sd_notify over a real Unix socket."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mqtt_agent_config

from edge_agent.testing import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "edge-agent.service"

pytestmark = pytest.mark.timeout(60)

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@needs_systemd_analyze
def test_the_unit_verifies_without_a_word(tmp_path):
    # verify exits 0 even for a misspelt directive: any output is a failure. The
    # ExecStart path must exist, so point it at this environment's command.
    unit = tmp_path / "edge-agent.service"
    command = Path(sys.executable).parent / "edge-agent"
    unit.write_text(UNIT.read_text().replace("/opt/edge-agent/bin/edge-agent", str(command)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and result.stdout + result.stderr == ""


@needs_systemd_analyze
def test_the_unit_is_hardened_to_2_5_or_better():
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    score = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)[1])
    assert score <= 2.5, result.stdout[-3000:]


def test_the_unit_keeps_what_the_agent_needs():
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "StateDirectory=edge-agent",
        "ConfigurationDirectory=edge-agent",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    ):
        assert f"\n{line}\n" in text, line
    assert re.search(r"\nWatchdogSec=\d+\n", text)


def test_sd_notify_ready_status_watchdog_stopping_in_order(tmp_path, agent_process):
    address = str(tmp_path / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(address)
    server.settimeout(0.1)
    messages: list[str] = []

    def receive() -> list[str]:
        try:
            while True:
                messages.append(server.recv(4096).decode())
        except TimeoutError:
            return messages

    agent = agent_process(mqtt_agent_config(tmp_path, free_port()))
    agent.start(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
    try:
        wait_for(lambda: any("READY=1" in m for m in receive()), 15, "READY=1")
        wait_for(lambda: sum(m == "WATCHDOG=1" for m in receive()) >= 2, 10, "watchdog pings")
        wait_for(
            lambda: any(m.startswith("STATUS=") and "waiting" in m for m in receive()),
            10,
            "a STATUS line",
        )
        assert agent.terminate() == 0
        wait_for(lambda: any("STOPPING=1" in m for m in receive()), 5, "STOPPING=1")
    finally:
        server.close()
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=" in ready and "cloud offline" in ready
    first = {
        key: messages.index(next(m for m in messages if key in m))
        for key in ("READY=1", "WATCHDOG=1", "STOPPING=1")
    }
    assert first["READY=1"] < first["WATCHDOG=1"] < first["STOPPING=1"]


@pytest.mark.timeout(10)
def test_a_listener_that_stops_reading_never_blocks_the_agent(tmp_path):
    from edge_agent.systemd import Notifier

    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": path})
        try:
            for _ in range(500):  # far more than the socket's queue holds
                notifier.status("still here")
        finally:
            notifier.close()
        assert listener.recv(4096) == b"STATUS=still here"
    finally:
        listener.close()


def _journal_stream(path: Path) -> str:
    info = path.stat()
    return f"{info.st_dev}:{info.st_ino}"


def test_under_the_journal_each_line_carries_its_level(tmp_path, agent_process):
    """stderr is "the journal" (JOURNAL_STREAM names its device and inode): journald would
    store each line at the ``<N>`` priority it starts with."""
    agent = agent_process(mqtt_agent_config(tmp_path, free_port()))
    agent.log_path.touch()
    agent.start(env={"JOURNAL_STREAM": _journal_stream(agent.log_path)})
    agent.wait_ready(15)
    # Nothing listens on the sink's port: the failed connect is a warning or an error.
    wait_for(lambda: re.search(r"^<[34]>.*cloud", agent.log(), re.M), 15, "a sink warning")
    assert agent.terminate() == 0
    lines = agent.log().splitlines()
    assert lines and all(re.match(r"<[2-7]>\S", line) for line in lines), lines
    assert any(line.startswith("<6>INFO edge_agent: edge-agent test-gw ready") for line in lines)
    # The journal adds its own time stamp; the line has none.
    assert not any(re.match(r"<\d>\d{4}-\d\d-\d\d", line) for line in lines)


def test_a_journal_stream_that_is_not_stderr_gets_plain_lines(tmp_path, agent_process):
    """A child that inherited JOURNAL_STREAM but writes to a file: no prefixes."""
    agent = agent_process(mqtt_agent_config(tmp_path, free_port()))
    other = tmp_path / "other"
    other.touch()
    agent.start(env={"JOURNAL_STREAM": _journal_stream(other)})
    agent.wait_ready(15)
    assert agent.terminate() == 0
    lines = agent.log().splitlines()
    assert lines and not any(line.startswith("<") for line in lines), lines
    assert all(re.match(r"\d{4}-\d\d-\d\d", line) for line in lines), lines
