"""One owner per state directory, and what an operator sees when it is taken or lost."""

from __future__ import annotations

import json

import pytest
from conftest import mqtt_agent_config, run_cli

pytestmark = pytest.mark.timeout(60)


def test_a_second_agent_on_the_same_state_dir_exits_1_naming_the_first(
    tmp_path, running_broker, agent_process
):
    first = agent_process(mqtt_agent_config(tmp_path, running_broker.port)).start()
    first.wait_started()
    second = run_cli("run", "-c", str(first.config_path))
    assert second.returncode == 1
    assert f"state dir {first.state_dir} is in use by pid {first.pid}" in second.stderr
    assert "stop it first" in second.stderr and "Traceback" not in second.stderr
    assert first.process.poll() is None, "the first agent runs on"
    # The kernel lets go of the lock however the owner ends: a killed agent blocks nobody.
    first.kill()
    first.start()
    first.wait_started()
    assert first.terminate() == 0


def test_status_says_not_running_at_once_after_a_stop_and_reads_past_a_broken_config(
    tmp_path, running_broker, agent_process
):
    agent = agent_process(mqtt_agent_config(tmp_path, running_broker.port)).start()
    agent.wait_started()
    config = str(agent.config_path)
    good = agent.config_path.read_text()
    # An edit that breaks the file: the agent runs on what it read at start, and
    # status still answers from its state dir.
    agent.config_path.write_text(good + "\n[queue]\nmax_events = -1\nno_such_key = 1\n")
    status = run_cli("status", "-c", config, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"]["pid"] == agent.pid
    assert f"warning: {config} is invalid (" in status.stderr
    agent.config_path.write_text("[agent\nthis is not TOML")  # the default state dir, then
    assert "Status from /var/lib/edge-agent" in run_cli("status", "-c", config).stderr
    agent.config_path.write_text(good)

    pid = agent.pid
    assert agent.terminate() == 0
    stopped = run_cli("status", "-c", config, "--json")
    assert stopped.returncode == 1
    assert json.loads(stopped.stdout)["running"] is False
    assert f"the agent is not running: pid {pid} has ended" in json.loads(stopped.stdout)["problem"]
