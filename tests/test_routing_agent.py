"""Routing with the real agent: sinks that select events by type, on two real brokers."""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import run_cli

from edge_agent.testing import CuttableProxy, Mosquitto, Subscriber, wait_for


@pytest.fixture
def side_broker(tmp_path):
    """A second Mosquitto, for the sink that selects; tests stop and start it."""
    mosquitto = Mosquitto(str(tmp_path / "side-broker"))
    yield mosquitto
    if mosquitto.process is not None:
        mosquitto.stop()


def config(tmp_path, main_port: int, side_port: int, side_types: str) -> str:
    (tmp_path / "inbox").mkdir(exist_ok=True)
    (tmp_path / "app.log").touch()
    return f"""
        [agent]
        id = "gw"
        state_dir = "{tmp_path / "state"}"
        shutdown_grace = "2s"

        [[sources.file]]
        name = "inbox"
        paths = ["{tmp_path / "inbox"}"]

        [[sources.tail]]
        name = "app"
        paths = ["{tmp_path / "app.log"}"]

        [[sinks.mqtt]]
        name = "all"
        port = {main_port}
        topic = "main/{{type}}"
        reconnect_min = "0.05s"
        reconnect_max = "0.3s"

        [[sinks.mqtt]]
        name = "side"
        port = {side_port}
        topic = "side/{{type}}"
        reconnect_min = "0.05s"
        reconnect_max = "0.3s"
        connect_timeout = "1s"
        types = {side_types}
        """


def count(sub: Subscriber, type: str) -> int:
    return sum(e["type"] == type for e in sub.events())


def log_lines(tmp_path, *lines: str) -> None:
    with open(tmp_path / "app.log", "a") as handle:
        handle.writelines(f"{line}\n" for line in lines)


def stats(agent) -> dict:
    result = run_cli("queue", "stats", "--json", "-c", str(agent.config_path))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def status_backlog(agent) -> dict[str, int]:
    result = run_cli("status", "--json", "-c", str(agent.config_path))
    assert result.returncode == 0, result.stderr
    return {n: s["backlog"] for n, s in json.loads(result.stdout)["status"]["sinks"].items()}


def reload(agent, text: str) -> None:
    agent.config_path.write_text(text)
    mark = agent.log().count("SIGHUP:")
    os.kill(agent.pid, signal.SIGHUP)
    wait_for(lambda: agent.log().count("SIGHUP:") > mark, 15, f"the reload in {agent.log()}")


def test_a_sink_that_selects_files_gets_only_files(
    tmp_path, running_broker, side_broker, agent_process
):
    side_broker.start()
    text = config(tmp_path, running_broker.port, side_broker.port, '["file.*"]')
    with (
        Subscriber(running_broker.port, "main/#") as main,
        Subscriber(side_broker.port, "side/#") as side,
    ):
        agent = agent_process(text).start()
        agent.wait_ready()
        log_lines(tmp_path, "one", "two")
        for name in ("a.csv", "b.csv"):
            (tmp_path / "inbox" / name).write_text("x")
        log_lines(tmp_path, "three")
        wait_for(lambda: count(main, "log.line") == 3, 15, "3 log lines through `all`")
        wait_for(lambda: count(side, "file.created") == 2, 15, "the files through `side`")
        wait_for(lambda: agent.queued() == 0, 15, "the queue to empty")
        # `all` got everything, `side` every file event and nothing else.
        files = [e["id"] for e in main.events() if e["type"].startswith("file.")]
        assert count(main, "file.created") == 2
        assert sorted(e["id"] for e in side.events()) == sorted(files)
        assert {m.topic.split("/")[1].split(".")[0] for m in side.messages} == {"file"}
    assert stats(agent)["sinks"] == {"all": 0, "side": 0}
    assert agent.terminate() == 0


def test_offline_sinks_hold_only_their_own_events_and_reloads_move_the_rule(
    tmp_path, running_broker, side_broker, agent_process
):
    """`side` (files only) is offline; `all` confirms everything: only the file events
    stay. Reloads then widen and narrow what `side` selects."""
    # `side` reaches its (stopped) broker through a proxy, closed while the broker
    # starts again, so that a subscriber is there before `side` reconnects.
    proxy = CuttableProxy(side_broker.port).start()
    text = config(tmp_path, running_broker.port, proxy.port, '["file.created"]')
    with Subscriber(running_broker.port, "main/#") as main:
        agent = agent_process(text).start()
        agent.wait_ready()
        for name in ("a.csv", "b.csv"):
            (tmp_path / "inbox" / name).write_text("x")
        wait_for(lambda: count(main, "file.created") == 2, 15, "the files through `all`")
        log_lines(tmp_path, *(f"line {i}" for i in range(200)))
        wait_for(lambda: count(main, "log.line") == 200, 15, "200 lines through `all`")
        # The log lines go although `side`'s cursor is behind them; the newest
        # event stays until a newer one comes.
        wait_for(lambda: agent.queued() == 3, 15, "the queue to keep the 2 files (+ newest)")
        assert stats(agent)["sinks"] == {"all": 0, "side": 2}
        want = {"all": 0, "side": 2}
        wait_for(lambda: status_backlog(agent) == want, 15, "status to show the backlogs")

        # `side` now wants log lines too: it gets the one still queued, not the gone ones.
        reload(agent, text.replace('types = ["file.created"]', 'types = ["file.created", "log.*"]'))
        assert "sink side restarted" in agent.log()
        assert stats(agent)["sinks"] == {"all": 0, "side": 3}
        proxy.cut()
        side_broker.start()
        with Subscriber(side_broker.port, "side/#") as side:
            proxy.restore()
            wait_for(lambda: len(side.events()) >= 3, 20, "the side sink's backlog")
            wait_for(lambda: agent.queued() == 0, 15, "the queue to empty")
        got = [(e["type"], e["data"].get("line")) for e in side.events()]
        assert got == [("file.created", None)] * 2 + [("log.line", "line 199")]
        side_broker.stop()

        # Offline again, `side` holds log lines; told to want only exec output, it lets go.
        logs_text = text.replace('types = ["file.created"]', 'types = ["log.*"]')
        reload(agent, logs_text)
        log_lines(tmp_path, "x1", "x2", "x3")
        wait_for(lambda: count(main, "log.line") == 203, 15, "3 more through `all`")
        wait_for(lambda: stats(agent)["sinks"] == {"all": 0, "side": 3}, 10, "side's backlog")
        assert agent.queued() == 3
        reload(agent, text.replace('types = ["file.created"]', 'types = ["exec.*"]'))
        wait_for(lambda: agent.queued() == 1, 15, "the log lines to go (the newest stays)")
        assert stats(agent)["sinks"] == {"all": 0, "side": 0}

        # A bad selection is refused; the running configuration stays.
        reload(agent, text.replace('types = ["file.created"]', 'types = ["exec.*", ""]'))
        assert "the new configuration is refused" in agent.log()
        assert "sinks.mqtt[1].types: sink 'side'" in agent.log()
        log_lines(tmp_path, "after")
        wait_for(lambda: count(main, "log.line") == 204, 15, "events still flowing")
        wait_for(lambda: agent.queued() == 1, 15, "the queue to keep only the newest")
    assert agent.terminate() == 0
    proxy.stop()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"file.*"', "sinks.mqtt.types: sink 'mqtt': expected a list of globs on event types"),
        ("[]", "got an empty list"),
        ('["file.*", 7]', "7 is not a glob"),
        ('[""]', "'' is not a glob"),
    ],
)
def test_a_bad_selection_is_a_config_error(tmp_path, value, expected):
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\n'
        f"[[sinks.mqtt]]\ntypes = {value}\nsources = [1]\n"
    )
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 78
    assert expected in result.stderr
    assert "sinks.mqtt.sources: sink 'mqtt': expected a list of globs on source instance" in (
        result.stderr
    )
    started = run_cli("run", "-c", str(path))
    assert started.returncode == 78 and expected in started.stderr
