"""The exec source's runs end on time whatever the command's children do, with real scripts."""

from __future__ import annotations

import logging
import sys
import textwrap

import pytest

import edge_agent.plugins.exec
from edge_agent.plugins.exec import ExecSource
from edge_agent.testing import SourceHarness, wait_for

pytestmark = pytest.mark.timeout(60)

#: A command whose child leaves its session (setsid) and keeps stdout open for a minute,
#: as a daemon that forgets to close its stdout does; the child's pid goes to argv[1].
ESCAPING = """
    import os, sys, time
    print("started", flush=True)
    if os.fork() == 0:
        os.setsid()
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(60)  # ok: the escaped child lives on, holding the output
    {parent}
"""
COMMAND_WAITS = "time.sleep(60)"  # ok: the command's own wait, not the test's


def script(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def gone(pid: int) -> bool:
    """The process no longer runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.fixture(params=["cgroup", "no cgroup"])
def cgroups(request, monkeypatch):
    """Each test runs with a cgroup per run (if this machine allows) and without one; a
    machine without a writable cgroup v2 is simulated by finding no cgroup of our own."""
    if request.param == "no cgroup":
        monkeypatch.setattr(edge_agent.plugins.exec, "_own_cgroup", lambda: None)
    elif edge_agent.plugins.exec._own_cgroup() is None:
        pytest.skip("no cgroup v2 here")
    return request.param


def test_a_run_ends_at_its_timeout_even_when_a_setsid_child_holds_its_output(tmp_path, cgroups):
    pidfile = tmp_path / "child.pid"
    command = script(tmp_path, "escape.py", ESCAPING.format(parent="sys.exit(0)"))
    config = {
        "command": [command, str(pidfile)],
        "interval": "0.1s",
        "timeout": "1s",
        "kill_grace": "0.5s",
    }
    with SourceHarness(ExecSource, config) as harness:
        events = harness.wait_for_events(2, timeout=20)
        counters = dict(harness.source.counters)
    first = pidfile.read_text()
    for event in events[:2]:
        assert event.data["timed_out"] is True
        assert event.data["output"] == "started\n"
        assert event.data["duration"] < 1 + 0.5 + 1  # timeout + grace, and a loaded machine
    assert counters["timeouts"] >= 2
    wait_for(lambda: gone(int(first)), 5, f"the escaped child {first} to be gone")


def test_at_stop_a_stream_is_killed_whole_and_its_last_line_sent(tmp_path, cgroups):
    pidfile = tmp_path / "child.pid"
    parent = "sys.stdout.write('no newline yet'); sys.stdout.flush(); " + COMMAND_WAITS
    command = script(tmp_path, "stream.py", ESCAPING.format(parent=parent))
    harness = SourceHarness(ExecSource, {"command": [command, str(pidfile)], "mode": "stream"})
    with harness:
        harness.wait_for_events(1)
        wait_for(pidfile.exists, 10, "the child's pid")
    assert [e.data["output"] for e in harness.events] == ["started", "no newline yet"]
    wait_for(lambda: gone(int(pidfile.read_text())), 5, "the escaped child to be gone")


def test_a_stream_s_last_line_without_newline_is_sent_when_the_command_exits(tmp_path):
    command = script(tmp_path, "lines.py", "import sys\nsys.stdout.write('one\\ntwo')\n")
    config = {"command": [command], "mode": "stream", "restart_min": "1h"}
    with SourceHarness(ExecSource, config) as harness:
        events = harness.wait_for_events(2)
    assert [e.data["output"] for e in events] == ["one", "two"]


def test_output_over_the_limit_says_it_was_cut(tmp_path):
    command = script(tmp_path, "big.py", "print('x' * 2999)\n")
    for mode in ("interval", "stream"):
        config = {"command": [command], "mode": mode, "max_output_bytes": 1000}
        config.update(interval="1h", restart_min="1h")  # one run
        with SourceHarness(ExecSource, config) as harness:
            data = harness.wait_for_events(1)[0].data
            counters = dict(harness.source.counters)
        assert data["output"] == "x" * 1000
        assert data["truncated"] is True and data["output_bytes"] == 3000 - (mode == "stream")
        assert counters == {"truncated": 1, "dropped_bytes": data["output_bytes"] - 1000}


def test_a_command_that_cannot_start_is_counted_and_said_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    missing = tmp_path / "missing"
    config = {"command": ["true"], "cwd": str(missing), "interval": "0.05s"}
    with SourceHarness(ExecSource, config) as harness:
        events = harness.wait_for_events(3)
        counters = dict(harness.source.counters)
    assert counters["start_failures"] >= 3
    assert events[0].data["exit_code"] is None
    assert f"cwd {missing} does not exist" in events[0].data["stderr"]
    assert caplog.text.count("cannot start true: cwd") == 1

    caplog.clear()
    command = str(tmp_path / "no-such-command")
    config = {"command": [command], "mode": "stream", "restart_min": "0.01s"}
    with SourceHarness(ExecSource, config) as harness:
        wait_for(lambda: harness.source.counters["start_failures"] >= 3, 10, "3 failed starts")
    assert caplog.text.count(f"cannot start {command}: {command} does not exist") == 1


def test_what_a_command_started_ends_with_the_agent_even_after_a_crash(
    tmp_path, running_broker, agent_process
):
    if edge_agent.plugins.exec._own_cgroup() is None:
        pytest.skip("no cgroup v2 here: an escaped child of a killed agent is out of reach")
    pidfile = tmp_path / "child.pid"
    command = script(tmp_path, "escape.py", ESCAPING.format(parent=COMMAND_WAITS))
    agent = agent_process(
        f"""
        [agent]
        state_dir = "{tmp_path / "state"}"

        [[sources.exec]]
        name = "probe"
        command = ["{command}", "{pidfile}"]
        interval = "1h"
        timeout = "1h"

        [[sinks.mqtt]]
        port = {running_broker.port}
        """
    )
    agent.start().wait_started()
    first = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 10, "a child"))
    pidfile.unlink()
    agent.kill()  # a crash: nobody ends the run
    assert not gone(first)
    agent.start().wait_started()
    agent.wait_log("left running by an earlier agent")  # the 2nd agent ends what the 1st left
    assert f"{first} of {command}" in agent.run_log()
    wait_for(lambda: gone(first), 5, "the first agent's child to be gone")
    second = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 10, "a child"))
    assert agent.terminate() == 0
    assert gone(second)
