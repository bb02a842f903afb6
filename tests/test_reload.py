"""SIGHUP reloads the configuration under load, without losing events; a bad file is refused."""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time

import pytest
from conftest import created_paths, mqtt_agent_config

from edge_agent.testing import wait_for

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


def tail_config(tmp_path, port: int, name: str, extra: str = "") -> str:
    return f"""
        [agent]
        id = "test-gw"
        state_dir = "{tmp_path / "state"}"

        [[sources.tail]]
        name = "{name}"
        paths = ["{tmp_path / "app.log"}"]
        start_at = "beginning"
        {extra}

        [[sinks.mqtt]]
        name = "cloud"
        host = "127.0.0.1"
        port = {port}
        reconnect_min = "0.05s"
        reconnect_max = "0.5s"
        """


def lines_by_source(subscriber) -> list[tuple[str, str]]:
    """(source name, line) of every log.line that arrived, re-sends included."""
    return [
        (e["source"].rsplit("/", 1)[1], e["data"]["line"])
        for e in subscriber.events()
        if e["type"] == "log.line"
    ]


def append_and_wait(tmp_path, subscriber, line: str) -> None:
    """Append a line and wait for it: tail reads in order, so anything it sent again
    from the file's start arrived before it."""
    with open(tmp_path / "app.log", "a") as handle:
        handle.write(line + "\n")
    wait_for(lambda: line in [text for _, text in lines_by_source(subscriber)], 15, line)


def test_a_source_renamed_on_reload_keeps_its_checkpoints(
    tmp_path, subscriber, running_broker, agent_process
):
    (tmp_path / "app.log").write_text("".join(f"line {i}\n" for i in range(20)))
    agent = agent_process(tail_config(tmp_path, running_broker.port, "gen")).start()
    agent.wait_started()
    wait_for(lambda: len(lines_by_source(subscriber)) == 20, 15, "the 20 lines")

    agent.config_path.write_text(tail_config(tmp_path, running_broker.port, "gen2"))
    os.kill(agent.pid, signal.SIGHUP)
    agent.wait_log("configuration reloaded")
    assert "source gen was renamed to gen2 (same plugin and settings)" in agent.log()
    append_and_wait(tmp_path, subscriber, "after the rename")
    assert lines_by_source(subscriber)[20:] == [("gen2", "after the rename")]

    # Renamed and changed: a new source, and the reload says what it sends again.
    changed = tail_config(tmp_path, running_broker.port, "gen3", 'max_line_bytes = "1KiB"')
    agent.config_path.write_text(changed)
    os.kill(agent.pid, signal.SIGHUP)
    agent.wait_log("source gen3 started")
    assert "source gen3 (plugin tail) has no checkpoints: it starts as a new source" in agent.log()
    assert "start_at = 'beginning'). The checkpoints of gen2 are not carried over" in agent.log()
    assert agent.terminate() == 0


def test_a_source_renamed_while_stopped_keeps_its_checkpoints(
    tmp_path, subscriber, running_broker, agent_process
):
    (tmp_path / "app.log").write_text("".join(f"line {i}\n" for i in range(20)))
    agent = agent_process(tail_config(tmp_path, running_broker.port, "gen")).start()
    agent.wait_started()
    wait_for(lambda: len(lines_by_source(subscriber)) == 20, 15, "the 20 lines")
    assert agent.terminate() == 0

    agent.config_path.write_text(tail_config(tmp_path, running_broker.port, "gen2"))
    agent.start().wait_started()
    assert "at start: source gen was renamed to gen2" in agent.run_log()
    append_and_wait(tmp_path, subscriber, "after the rename")
    assert lines_by_source(subscriber)[20:] == [("gen2", "after the rename")]
    assert agent.terminate() == 0

    changed = tail_config(tmp_path, running_broker.port, "gen3", 'max_line_bytes = "1KiB"')
    agent.config_path.write_text(changed)
    agent.start().wait_started()
    log = agent.run_log()
    assert "source gen2 (plugin tail) has checkpoints" in log
    assert "but is no longer configured" in log
    assert agent.terminate() == 0


def test_a_reload_applies_a_new_processor_order(
    tmp_path, subscriber, running_broker, agent_process
):
    def stage(value: str) -> str:
        return f"""
        [[processors]]
        type = "enrich"
        name = "stage-{value}"
        fields = {{ stage = "{value}" }}
        overwrite = true
        """

    base = mqtt_agent_config(tmp_path, running_broker.port)
    agent = agent_process(base + stage("one") + stage("two")).start()
    agent.wait_started()

    def stage_of(name: str) -> str:
        (tmp_path / "inbox" / name).write_text("x")

        def arrived() -> list[dict]:
            return [
                e for e in subscriber.events() if e["data"].get("path", "").endswith(f"/{name}")
            ]

        return wait_for(arrived, 15, f"the event of {name}")[0]["data"]["stage"]

    assert stage_of("a.csv") == "two"  # the last one written wins
    agent.config_path.write_text(textwrap.dedent(base + stage("two") + stage("one")))
    os.kill(agent.pid, signal.SIGHUP)
    agent.wait_log("configuration reloaded")
    agent.wait_ready()
    assert stage_of("b.csv") == "one"
    assert agent.terminate() == 0
