"""What `check` (and `run`, and a reload) say about values and files that cannot work."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import mqtt_agent_config, run_cli

EX_CONFIG = 78


@pytest.mark.parametrize("command", ["check", "run", "status", "queue stats"])
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "directory", "huge"])
def test_a_config_path_that_is_not_a_small_file_exits_78_at_once(tmp_path, command, kind):
    path = {"fifo": tmp_path / "fifo", "directory": tmp_path, "huge": tmp_path / "huge.toml"}.get(
        kind, kind
    )
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "huge":
        path.write_text("# comment\n" * 200_000)  # 2 MB
    started = time.monotonic()
    result = run_cli(*command.split(), "-c", str(path))
    assert time.monotonic() - started < 20
    assert result.returncode == EX_CONFIG, result.stderr
    assert f"{path}: " in result.stderr and "Traceback" not in result.stderr
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
