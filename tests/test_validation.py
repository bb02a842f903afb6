"""What `check` (and `run`, and a reload) say about values and files that cannot work."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import mqtt_agent_config, run_cli

EX_CONFIG = 78


@pytest.mark.parametrize(
    "command, kind",
    [("check", kind) for kind in ("fifo", "/dev/zero", "fifo in a folder", "huge")]
    + [(command, "fifo") for command in ("run", "status", "queue stats")],
)
def test_a_config_path_that_is_not_a_small_file_exits_78_at_once(tmp_path, command, kind):
    path = {"fifo": tmp_path / "fifo", "huge": tmp_path / "huge.toml"}.get(kind, kind)
    named = path  # the file the error names
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "fifo in a folder":  # a config folder's *.toml files obey the same rule
        path = tmp_path / "agent.d"
        path.mkdir()
        (path / "10-agent.toml").write_text("[agent]\n")
        named = path / "20-sinks.toml"
        os.mkfifo(named)
    if kind == "huge":
        path.write_text("# comment\n" * 200_000)  # 2 MB
    started = time.monotonic()
    result = run_cli(*command.split(), "-c", str(path))
    assert time.monotonic() - started < 20
    assert result.returncode == EX_CONFIG, result.stderr
    assert f"{named}: " in result.stderr and "Traceback" not in result.stderr
    assert ("not a regular file" if kind != "huge" else "larger than 1 MiB") in result.stderr


def test_a_reload_from_a_fifo_keeps_the_running_config(tmp_path, running_broker, agent_process):
    agent = agent_process(mqtt_agent_config(tmp_path, running_broker.port)).start()
    agent.wait_started()
    agent.config_path.unlink()
    os.mkfifo(agent.config_path)
    os.kill(agent.pid, signal.SIGHUP)
    agent.wait_log("not a regular file")
    assert "the running one stays" in agent.log()
    assert agent.process.poll() is None
    assert agent.terminate() == 0


IMPOSSIBLE = """
    [agent]
    state_dir = "{state}"
    shutdown_grace = -1

    [queue]
    commit_max_events = 0
    handoff_max_events = 0
    max_events = -1
    max_age = -5

    [[sources.status]]
    interval = 0.5

    [[processors]]
    type = "rate_limit"
    rate = 0

    [[sinks.mqtt]]
    port = 70000
    max_inflight = 0
    keepalive = {keepalive}
    batch_max_events = 0
    connect_timeout = 0
    reconnect_min = "10s"
    reconnect_max = "1s"

    [[sinks.amqp]]
    heartbeat = -1
    reconnect_min = 0
    """


@pytest.mark.parametrize("keepalive", [-1, 1])
def test_check_names_every_impossible_value_at_its_key_path(tmp_path, keepalive):
    path = tmp_path / "agent.toml"
    path.write_text(IMPOSSIBLE.format(state=tmp_path / "state", keepalive=keepalive))
    result = run_cli("check", "-c", str(path))
    assert result.returncode == EX_CONFIG
    expected = [
        'agent.shutdown_grace: expected a duration such as 10, "10s" or "5m"',
        "queue.commit_max_events: must be at least 1, got 0",
        "queue.handoff_max_events: must be at least 1, got 0",
        "queue.max_events: must be at least 0, got -1",
        'queue.max_age: expected a duration such as 10, "10s" or "5m"',
        "sources.status.interval: must be at least 1, got 0.5",
        "processors[0].rate: must be more than 0, got 0",
        "sinks.mqtt.port: must be 1 to 65535, got 70000",
        "sinks.mqtt.max_inflight: must be 1 to 65535, got 0",
        f"sinks.mqtt.keepalive: must be 0 (off) or 2 to 65535, got {keepalive}",
        "sinks.mqtt.batch_max_events: must be at least 1, got 0",
        "sinks.mqtt.connect_timeout: must be more than 0, got 0",
        "sinks.amqp.heartbeat: must be 0 to 65535, got -1",
        "sinks.amqp.reconnect_min: must be more than 0, got 0",
        # A __post_init__ check is reported beside the type and range problems,
        # at the option its message names.
        "sinks.mqtt.reconnect_min: reconnect_min (10s) is more than reconnect_max (1s)"
        " (found with defaults in place of the wrong values above)",
    ]
    for line in expected:
        assert f"{path}: {line}\n" in result.stderr, result.stderr
    assert f"{len(expected)} problems" in result.stderr


@pytest.mark.parametrize("where", ["under a file", "read-only", "in /proc"])
def test_check_refuses_a_state_dir_that_cannot_be_written(tmp_path, where):
    if where == "under a file":
        (tmp_path / "a-file").write_text("")
        state, why = tmp_path / "a-file" / "state", f"{tmp_path / 'a-file'} is not a directory"
    elif where == "in /proc":  # even root cannot make a folder there
        state, why = "/proc/edge-agent-state", "/proc is on a virtual filesystem with no disk"
    else:
        mount = tmp_path / "ro"
        mount.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)])
        if done.returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs here (needs root)")
        state, why = mount / "state", f"{mount} is on a read-only filesystem"
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\nstate_dir = "{state}"\n[[sinks.stdout]]\n')
    try:
        result = run_cli("check", "-c", str(path))
    finally:
        if where == "read-only":
            subprocess.run(["umount", "-l", str(tmp_path / "ro")], check=False)
    assert result.returncode == EX_CONFIG
    assert f"{path}: agent.state_dir: {why}" in result.stderr


def test_a_relative_state_dir_is_a_warning(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\nstate_dir = "state"\n[[sinks.stdout]]\n')
    result = run_cli("check", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"warning: {path}: agent.state_dir: 'state' is relative" in result.stderr
    assert f"(now {tmp_path}); systemd starts the agent in /" in result.stderr


def test_check_names_impossible_source_options_at_their_key_path(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
        [agent]
        state_dir = "{tmp_path / "state"}"

        [[sources.file]]
        paths = ["{tmp_path}"]
        retry_missing = 0

        [[sources.file]]
        name = "nothing"
        paths = []

        [[sources.tail]]
        paths = ["{tmp_path / "a.log"}"]
        poll_interval = 0
        max_line_bytes = 0

        [[sources.serial]]
        port = "/dev/ttyUSB0"
        baudrate = 0
        reopen_interval = 0

        [[sources.exec]]
        command = ["true"]
        timeout = 0
        kill_grace = -1

        [[sinks.stdout]]
        """.replace("\n        ", "\n")
    )
    result = run_cli("check", "-c", str(path))
    assert result.returncode == EX_CONFIG
    for line in [
        "sources.file[0].retry_missing: must be more than 0, got 0",
        "sources.tail.poll_interval: must be more than 0, got 0",
        "sources.tail.max_line_bytes: must be at least 1, got 0",
        "sources.serial.baudrate: must be at least 1, got 0",
        "sources.serial.reopen_interval: must be more than 0, got 0",
        "sources.exec.timeout: must be more than 0, got 0",
        "sources.file[1].paths: paths is empty: give at least one folder or file to watch",
    ]:
        assert f"{path}: {line}\n" in result.stderr, result.stderr
    assert "sources.exec.kill_grace" in result.stderr
