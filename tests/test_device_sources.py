"""The udev, serial and exec sources, with real kernel events, a real pty and real scripts."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import run_cli

from edge_agent.plugins.exec import ExecSource
from edge_agent.plugins.serial import SerialSource
from edge_agent.plugins.udev import UdevSource
from edge_agent.testing import SourceHarness, wait_for

# Every test that makes network devices is in this module, which make test runs on one
# worker (--dist loadfile): a udev source sees every device on the machine.
pytestmark = pytest.mark.timeout(60)


# -- udev: veth pairs make real add/remove uevents in subsystem "net" -------------


def veth_names() -> tuple[str, str]:
    tag = f"{os.getpid() % 100000}"
    return f"eat{tag}a", f"eat{tag}b"


@pytest.fixture
def veth():
    """Create and delete a veth pair (root only); yields a function doing one round."""
    if os.geteuid() != 0:
        pytest.skip("creating network links needs root")
    a, b = veth_names()

    def cycle() -> tuple[str, str]:
        subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
        subprocess.run(["ip", "link", "del", a], check=True)
        return a, b

    yield cycle
    subprocess.run(["ip", "link", "del", a], capture_output=True, check=False)


def interface_events(events, names) -> list[tuple[str, str]]:
    return sorted(
        (e.type, e.data["properties"].get("INTERFACE"))
        for e in events
        if e.data["properties"].get("INTERFACE") in names
    )


def test_udev_reports_a_veth_pair_coming_and_going(veth, caplog):
    caplog.set_level(logging.INFO)
    with SourceHarness(UdevSource, {"subsystems": ["net"]}) as harness:
        wait_for(lambda: "listening to" in caplog.text, 5, "the netlink monitor")
        a, b = veth()
        wait_for(lambda: len(interface_events(harness.events, {a, b})) == 4, 10, "4 events")
    assert interface_events(harness.events, {a, b}) == [
        ("device.added", a),
        ("device.added", b),
        ("device.removed", a),
        ("device.removed", b),
    ]
    assert {e.data["subsystem"] for e in harness.events} == {"net"}
    added = next(e for e in harness.events if e.type == "device.added")
    assert added.subject.startswith("/devices/virtual/net/")
    assert added.data["sys_name"] in (a, b)


def test_udev_property_match_keeps_only_matching_devices(veth, caplog):
    caplog.set_level(logging.INFO)
    a, b = veth_names()
    config = {"subsystems": ["net"], "match": {"INTERFACE": a}}
    with SourceHarness(UdevSource, config) as harness:
        wait_for(lambda: "listening to" in caplog.text, 5, "the netlink monitor")
        veth()
        wait_for(lambda: len(harness.events) >= 2, 10, "a's two events")
    assert interface_events(harness.events, {a, b}) == [("device.added", a), ("device.removed", a)]


@pytest.mark.parametrize("daemon_runs", [False, True])
def test_netlink_udev_without_a_udev_daemon_says_so(tmp_path, monkeypatch, caplog, daemon_runs):
    """netlink = "udev" where no udev daemon runs (no control socket) would listen to
    nothing at all: a warning says so, once, and what to set instead."""
    import edge_agent.plugins.udev

    control = tmp_path / "control"
    if daemon_runs:
        control.touch()
    monkeypatch.setattr(edge_agent.plugins.udev, "UDEV_CONTROL", str(control))
    caplog.set_level(logging.INFO)
    with SourceHarness(UdevSource, {"subsystems": ["net"], "netlink": "udev"}):
        wait_for(lambda: "listening to udev device events" in caplog.text, 5, "the monitor")
    warned = "no udev daemon runs here" in caplog.text
    assert warned != daemon_runs
    if warned:
        assert caplog.text.count("no udev daemon runs here") == 1
        assert 'netlink = "kernel"' in caplog.text and str(control) in caplog.text


def test_udev_enumerates_present_devices_once():
    config = {"subsystems": ["net"], "enumerate_on_start": True}
    with SourceHarness(UdevSource, config) as harness:
        events = harness.wait_for_events(1)
    present = [e for e in events if e.type == "device.present"]
    assert "lo" in {e.data["sys_name"] for e in present}
    assert all(e.data["action"] == "present" for e in present)


def ip_batch(commands: list[str], check: bool = True) -> None:
    """Run ``ip`` commands in one process (``-force``: carry on past errors when not checked)."""
    subprocess.run(
        ["ip", *([] if check else ["-force"]), "-batch", "-"],
        input="".join(f"{command}\n" for command in commands),
        text=True,
        capture_output=not check,
        check=check,
    )


def test_udev_overflow_is_reported_as_a_gap_and_what_changed_is_enumerated(
    tmp_path, subscriber, running_broker, agent_process
):
    """The agent, without CAP_NET_ADMIN as the unit runs it and with a socket buffer that
    holds two events, is stopped (SIGSTOP: a slow fsync) while 20 veth pairs come and
    a known one goes: the overflow is a device.gap, and the enumeration after it reports
    every link that is there and the one that went, with no restart of the source."""
    if os.geteuid() != 0:
        pytest.skip("creating network links needs root")
    tag = f"eab{os.getpid() % 100000}"
    before = (f"{tag}a", f"{tag}b")
    pairs = [(f"{tag}x{i}a", f"{tag}x{i}b") for i in range(20)]
    burst = [name for pair in pairs for name in pair]
    agent = agent_process(
        f"""
        [agent]
        id = "test-gw"
        state_dir = "{tmp_path / "state"}"

        [[sources.udev]]
        name = "devices"
        subsystems = ["net"]
        match = {{ INTERFACE = "{tag}*" }}
        receive_buffer = "4KiB"

        [[sinks.mqtt]]
        port = {running_broker.port}
        """
    )
    agent.start(wrapper=["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"])
    agent.wrapped = False  # setpriv execs the agent: the same process
    try:
        agent.wait_started()
        assert "netlink receive buffer: 4096 bytes" in agent.log()

        def reported(kind: str) -> dict[str, dict]:
            return {
                e["data"]["sys_name"]: e["data"] for e in subscriber.events() if e["type"] == kind
            }

        ip_batch([f"link add {before[0]} type veth peer name {before[1]}"])
        wait_for(lambda: set(before) <= set(reported("device.added")), 15, "the first pair")
        os.kill(agent.pid, signal.SIGSTOP)
        try:
            ip_batch(
                [f"link add {a} type veth peer name {b}" for a, b in pairs]
                + [f"link del {before[0]}"]
            )
        finally:
            os.kill(agent.pid, signal.SIGCONT)
        wait_for(lambda: set(burst) <= set(reported("device.added")), 20, "every burst link")
        wait_for(lambda: set(before) <= set(reported("device.removed")), 10, "the pair gone")
        gaps = [e for e in subscriber.events() if e["type"] == "device.gap"]
        assert gaps and gaps[0]["data"]["reason"] == "netlink receive buffer overflowed"
        assert gaps[0]["data"]["from"] < gaps[0]["data"]["to"]
        assert all(reported("device.removed")[name]["enumerated"] for name in before)
        assert any(data.get("enumerated") for data in reported("device.added").values())

        def overflows() -> int:
            status = json.loads(run_cli("status", "-c", str(agent.config_path), "--json").stdout)
            return status["status"]["sources"]["devices"]["counters"].get("overflows", 0)

        wait_for(lambda: overflows() >= 1, 15, "overflows in edge-agent status")
        assert "restarting" not in agent.log()
    finally:
        ip_batch([f"link del {name}" for name in (before[0], *(a for a, _ in pairs))], check=False)


def test_udev_a_run_after_an_error_reports_what_changed_meanwhile():
    """After run() raised (a socket error), the agent calls it again: the links created
    while no socket listened are reported, as enumerated, after a device.gap."""
    if os.geteuid() != 0:
        pytest.skip("creating network links needs root")
    a, b = veth_names()
    harness = SourceHarness(UdevSource, {"subsystems": ["net"], "match": {"INTERFACE": "eat*"}})
    with harness:
        harness.wait_listening()  # run() returns once its baseline is known
    source = harness.source
    ip_batch([f"link add {a} type veth peer name {b}"])
    source.stopping.clear()
    again = threading.Thread(target=source.run, daemon=True)  # as the agent's runner does
    again.start()

    def added() -> list[str]:
        return sorted(e.data["sys_name"] for e in harness.events if e.type == "device.added")

    try:
        wait_for(lambda: added() == [a, b], 10, "both links")
    finally:
        source.stop()
        again.join(10)
        ip_batch([f"link del {a}"], check=False)
    assert all(e.data["enumerated"] for e in harness.events if e.type == "device.added")
    gap = next(e for e in harness.events if e.type == "device.gap")
    assert "restarted after an error" in gap.data["reason"] and gap.data["added"] == 2


# -- serial: a real pty pair ---------------------------------------------------------


class Pty:
    """A pty pair; ``link`` is a stable name for the current slave, as in /dev/serial/by-id."""

    def __init__(self, link) -> None:
        self.link = link
        self.open()

    def open(self) -> None:
        self.master, self.slave = os.openpty()
        if os.path.lexists(self.link):
            os.unlink(self.link)
        os.symlink(os.ttyname(self.slave), self.link)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


def test_serial_lines_arrive_and_a_vanished_port_is_reopened(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    pty = Pty(tmp_path / "ttyTEST")
    config = {"port": str(pty.link), "baudrate": 115200, "reopen_interval": "0.1s"}
    with SourceHarness(SerialSource, config) as harness:
        wait_for(lambda: caplog.text.count("reading ") == 1, 5, "the port to be opened")
        pty.write(b"temp=21.5\nhum")
        pty.write(b"id=40\r\n")
        harness.wait_for_events(2)
        pty.close()  # the USB adapter is pulled out
        wait_for(lambda: "lost" in caplog.text or "cannot open" in caplog.text, 10, "the loss")
        pty.open()  # and plugged in again
        wait_for(lambda: "is back" in caplog.text, 10, "the port to be reopened")
        wait_for(lambda: caplog.text.count("reading ") == 2, 5, "the port to be opened again")
        pty.write(b"again\n")
        events = harness.wait_for_events(3)
        assert caplog.text.count("looking for it every") == 1, "said once, not on every retry"
    pty.close()
    assert [e.data["line"] for e in events] == ["temp=21.5", "humid=40\r", "again"]
    assert events[0].type == "serial.line" and events[0].data["port"] == str(pty.link)


def test_serial_frames_and_raw_bytes(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    pty = Pty(tmp_path / "ttyFRAMES")
    config = {"port": str(pty.link), "frame_bytes": 4, "encoding": "raw"}
    with SourceHarness(SerialSource, config) as harness:
        wait_for(lambda: "reading " in caplog.text, 5, "the port to be opened")
        pty.write(b"\x00\x01\x02\x03\xff\xfe")
        pty.write(b"\xfd\xfc")
        events = harness.wait_for_events(2)
    pty.close()
    import base64

    assert [base64.b64decode(e.data["data_base64"]) for e in events] == [
        b"\x00\x01\x02\x03",
        b"\xff\xfe\xfd\xfc",
    ]


def test_serial_an_endless_line_is_cut_counted_and_reported_as_a_gap(tmp_path, caplog):
    """1 MB without a newline, as tail treats it: the first max_line_bytes are sent, the
    rest is dropped up to the next newline, counted and reported; the next line arrives."""
    caplog.set_level(logging.DEBUG)
    pty = Pty(tmp_path / "ttyFLOOD")
    config = {"port": str(pty.link), "baudrate": 115200, "max_line_bytes": 1000}
    flood = b"x" * 1_000_000 + b"\nafter\n"
    with SourceHarness(SerialSource, config) as harness:
        wait_for(lambda: "reading " in caplog.text, 5, "the port to be opened")
        view = memoryview(flood)
        while view:  # the pty takes a few KiB at a time, as fast as the source reads them
            view = view[os.write(pty.master, view) :]
        wait_for(lambda: any(e.data.get("line") == "after" for e in harness.events), 20, "after")
        gap = next(e for e in harness.events if e.type == "serial.gap")
        counters = dict(harness.source.counters)
    pty.close()
    lines = [e.data["line"] for e in harness.events if e.type == "serial.line"]
    assert lines == ["x" * 1000, "after"]
    assert counters == {"dropped_bytes": 999_000, "truncated_lines": 1}
    gaps = [e.data for e in harness.events if e.type == "serial.gap"]
    assert sum(g["dropped_bytes"] for g in gaps) == 999_000, "the rest was reported at stop"
    assert gap.data["truncated_lines"] == 1 and gap.data["from"] <= gap.data["to"]
    assert gap.subject == str(pty.link) and "max_line_bytes (1000)" in gap.data["reason"]
    assert len(gaps) == 2, "one gap event right away, the rest at most a minute later"


def test_serial_cuts_long_lines_at_any_read_boundary():
    """The rule holds however the bytes are split into reads, with a two-byte delimiter."""
    harness = SourceHarness(
        SerialSource, {"port": "/dev/null", "delimiter": "\r\n", "max_line_bytes": 4}
    )
    source = harness.source
    stream = b"abcd\r\nabcdefgh\r\nok\r\nxyzzy\r"
    for size in (1, 2, 3, 5, len(stream)):
        source.skipping, buffer, lines = False, b"", []
        for i in range(0, len(stream), size):
            pieces, buffer = source._split(buffer + stream[i : i + size])
            lines += pieces
        assert (lines, buffer) == ([b"abcd", b"abcd", b"ok", b"xyzz"], b"\r"), size
    assert source.counters["truncated_lines"] == 2 * 5


# -- exec: real scripts --------------------------------------------------------------


def script(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def test_exec_interval_parses_json_output(tmp_path):
    command = script(tmp_path, "sensors.py", "print('{\"temp\": 21.5}')\n")
    config = {"command": [command], "interval": "0.1s"}
    with SourceHarness(ExecSource, config) as harness:
        events = harness.wait_for_events(2)
    data = events[0].data
    assert events[0].type == "exec.output"
    assert data["format"] == "json" and data["output"] == {"temp": 21.5}
    assert data["exit_code"] == 0 and data["timed_out"] is False
    assert data["command"] == command and events[0].subject == command


def test_exec_invalid_json_is_sent_as_text_with_stderr_and_exit_code(tmp_path):
    command = script(
        tmp_path,
        "broken.py",
        """
        import sys
        print('{"temp": 21.5')
        print("warning: sensor 2 missing", file=sys.stderr)
        sys.exit(3)
        """,
    )
    with SourceHarness(ExecSource, {"command": [command], "interval": "1h"}) as harness:
        events = harness.wait_for_events(1)
    data = events[0].data
    assert data["format"] == "text" and data["output"] == '{"temp": 21.5\n'
    assert data["exit_code"] == 3 and "sensor 2 missing" in data["stderr"]


def test_exec_a_hanging_command_is_killed_at_its_timeout(tmp_path):
    command = script(
        tmp_path, "hang.py", "import time\nprint('started', flush=True)\ntime.sleep(6 * 10)\n"
    )
    config = {"command": [command], "interval": "1h", "timeout": "0.5s"}
    with SourceHarness(ExecSource, config) as harness:
        events = harness.wait_for_events(1, timeout=15)
    data = events[0].data
    assert data["timed_out"] is True and data["exit_code"] < 0
    assert data["output"] == "started\n" and data["duration"] < 5


def test_exec_stream_emits_each_line_and_restarts_with_backoff(tmp_path, caplog):
    command = script(
        tmp_path,
        "stream.py",
        """
        print('{"n": 1}', flush=True)
        print('not json', flush=True)
        """,
    )
    config = {"command": [command], "mode": "stream", "restart_min": "0.1s", "restart_max": "0.2s"}
    with SourceHarness(ExecSource, config) as harness:
        events = harness.wait_for_events(4, timeout=15)
    assert [(e.data["format"], e.data["output"]) for e in events[:4]] == [
        ("json", {"n": 1}),
        ("text", "not json"),
        ("json", {"n": 1}),
        ("text", "not json"),
    ]
    assert "exited with 0; starting it again in" in caplog.text


def test_exec_shell_needs_saying_so():
    with pytest.raises(ValueError, match="shell is false"):
        SourceHarness(ExecSource, {"command": "ls -l | wc -l"})
    harness = SourceHarness(ExecSource, {"command": "echo $((6 * 7))", "shell": True})
    with harness:
        events = harness.wait_for_events(1)
    assert events[0].data["output"] == 42


def test_devices_serial_lines_and_commands_reach_the_broker(
    tmp_path, veth, subscriber, running_broker, agent_process
):
    """The three sources in a real agent: exactly the veth pair's events, the lines, the output."""
    pty = Pty(tmp_path / "ttyE2E")
    command = script(tmp_path, "probe.py", "print('{\"ok\": true}')\n")
    agent = agent_process(
        f"""
        [agent]
        id = "test-gw"
        state_dir = "{tmp_path / "state"}"
        log_level = "debug"

        [[sources.udev]]
        name = "devices"
        subsystems = ["net"]

        [[sources.serial]]
        name = "meter"
        port = "{pty.link}"

        [[sources.exec]]
        name = "probe"
        command = ["{command}"]
        interval = "1h"

        [[sinks.mqtt]]
        port = {running_broker.port}
        """
    )
    agent.start()
    agent.wait_log("listening to kernel device events")
    agent.wait_log(f"reading {pty.link}")
    a, b = veth()
    pty.write(b"kwh=12.5\n")

    def by_topic(suffix: str) -> list[dict]:
        return [m.json() for m in subscriber.messages if m.topic.endswith(suffix)]

    wait_for(lambda: len(by_topic("/devices/device.removed")) == 2, 15, "both links removed")
    wait_for(lambda: by_topic("/meter/serial.line"), 15, "the meter's line")
    wait_for(lambda: by_topic("/probe/exec.output"), 15, "the probe's output")
    devices = [
        (e["type"], e["data"]["sys_name"]) for e in subscriber.events() if "device" in e["type"]
    ]
    assert sorted(devices) == sorted(
        [("device.added", a), ("device.added", b), ("device.removed", a), ("device.removed", b)]
    )
    assert by_topic("/meter/serial.line")[0]["data"]["line"] == "kwh=12.5"
    assert by_topic("/probe/exec.output")[0]["data"]["output"] == {"ok": True}
    assert agent.terminate() == 0
    pty.close()


def test_udev_without_netlink_says_so_and_keeps_trying(monkeypatch, caplog):
    """A refused netlink socket cannot be made here as root without a seccomp filter, so
    the refusal is simulated at pyudev's door; what is tested is the source's answer."""
    import pyudev

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(1)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(pyudev.Monitor, "from_netlink", refuse)
    with SourceHarness(UdevSource, {"retry": "0.1s"}):
        wait_for(lambda: len(attempts) >= 3, 5, "retries")
    assert caplog.text.count("cannot listen to device events") == 1
    assert "Is AF_NETLINK allowed" in caplog.text
