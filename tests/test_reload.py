"""SIGHUP reloads the configuration under load, without losing events; a bad file is refused."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from conftest import created_paths, mqtt_agent_config

from agent.testing import wait_for

pytestmark = pytest.mark.timeout(90)


def test_reload_under_load_loses_nothing_and_refuses_a_bad_file(
    tmp_path, subscriber, running_broker, agent_process
):
    base = mqtt_agent_config(tmp_path, running_broker.port)
    agent = agent_process(base).start()
    agent.wait_started()
    (tmp_path / "app.log").write_text("")

    written: list[str] = []
    stop = threading.Event()

    def create_files() -> None:
        while not stop.is_set() and len(written) < 300:
            path = tmp_path / "inbox" / f"r{len(written):04d}.csv"
            path.write_text("x")
            written.append(str(path))
            time.sleep(0.005)  # ok: a steady trickle of files is the load

    writer = threading.Thread(target=create_files)
    writer.start()
    try:
        # 1. A changed sink and a new source.
        agent.config_path.write_text(
            base.replace('connect_timeout = "2s"', 'connect_timeout = "3s"')
            + f"""
            [[sources.tail]]
            name = "app"
            paths = ["{tmp_path / "app.log"}"]
            """
        )
        os.kill(agent.pid, signal.SIGHUP)
        agent.wait_log("configuration reloaded")
        log = agent.log()
        assert "sink cloud restarted" in log and "source app started" in log
        # 2. A bad file is refused; the running configuration stays.
        agent.config_path.write_text(base.replace("[[sinks.mqtt]]", "[[sinks.mqqt]]"))
        os.kill(agent.pid, signal.SIGHUP)
        agent.wait_log("the new configuration is refused")
        assert "sinks.mqqt: no sink plugin named 'mqqt' is installed" in agent.log()
    finally:
        writer.join()
    with open(tmp_path / "app.log", "a") as handle:
        handle.write("still tailing\n")
    wait_for(
        lambda: set(written) <= set(created_paths(subscriber.events())),
        30,
        f"all {len(written)} files created during the reloads",
    )
    wait_for(
        lambda: any(e["type"] == "log.line" for e in subscriber.events()), 10, "the new source"
    )
    assert agent.process.poll() is None
    assert agent.terminate() == 0


def test_a_removed_source_stops(tmp_path, subscriber, running_broker, agent_process):
    base = mqtt_agent_config(tmp_path, running_broker.port)
    agent = agent_process(base).start()
    agent.wait_started()
    agent.config_path.write_text(
        base.split("[[sources.file]]")[0] + "[[sinks.mqtt]]" + base.split("[[sinks.mqtt]]")[1]
    )
    os.kill(agent.pid, signal.SIGHUP)
    agent.wait_log("source inbox stopped")
    (tmp_path / "inbox" / "after.csv").write_text("x")
    time.sleep(1.0)  # ok: proving a negative needs a moment to pass
    assert not created_paths(subscriber.events())
    assert agent.terminate() == 0
