"""READY means listening; counters and gap events of a source's own."""

from __future__ import annotations

import logging
import os
import signal
import socket
import textwrap
import time

import pytest
from conftest import installed_plugin
from test_plugins import agent_for

from edge_agent import Source, hookimpl, status
from edge_agent.queue import read_stats
from edge_agent.testing import wait_for

pytestmark = pytest.mark.timeout(30)

order: list[str] = []


class SlowToListen(Source):
    """Takes a moment to set up its watch, as a source over a large tree does."""

    announces_listening = True

    def run(self) -> None:
        order.append("run")
        self.stopping.wait(0.3)  # the set-up this source needs
        order.append("listening")
        self.listening()
        self.stopping.wait()


class NeverListens(Source):
    announces_listening = True

    def run(self) -> None:
        self.stopping.wait()


class Lossy(Source):
    """Counts an overflow and reports the loss it caused, once."""

    def run(self) -> None:
        self.count("overflows")
        self.count("dropped_bytes", 1500)
        self.report_gap("thing.gap", {"reason": "buffer overflowed", "count": 3})
        self.stopping.wait()


class Plugin:
    @hookimpl
    def register_sources(self, register):
        register("slow", SlowToListen)
        register("deaf", NeverListens)
        register("lossy", Lossy)


def test_start_returns_only_once_every_source_listens(tmp_path):
    order.clear()
    agent = agent_for(tmp_path, [(Plugin(), "test")], "[[sources.slow]]\n[[sources.lossy]]")
    try:
        agent.start()
        order.append("started")
        assert order == ["run", "listening", "started"]
        assert all(r.source.is_listening.is_set() for r in agent.sources)
    finally:
        agent.stop()


def test_a_source_that_never_listens_is_named_and_start_goes_on(tmp_path, monkeypatch, caplog):
    from edge_agent import runtime

    monkeypatch.setattr(runtime, "LISTEN_TIMEOUT", 0.5)
    agent = agent_for(tmp_path, [(Plugin(), "test")], "[[sources.deaf]]\nname = 'radio'")
    caplog.set_level(logging.WARNING, logger="edge_agent")
    try:
        agent.start()
        assert "source radio (plugin test) is not listening yet after 0.5s" in caplog.text
        assert status.snapshot(agent)["sources"]["radio"]["listening"] is False
    finally:
        agent.stop()


def test_counters_and_gap_events_show_in_status_and_the_queue(tmp_path):
    agent = agent_for(tmp_path, [(Plugin(), "test")], "[[sources.lossy]]\nname = 'buf'")
    try:
        agent.start()
        wait_for(lambda: agent.gaps["buf"] == 1, 10, "the gap event to be committed")
        source = status.snapshot(agent)["sources"]["buf"]
        assert source["gaps"] == 1
        assert source["counters"] == {"overflows": 1, "dropped_bytes": 1500}
        assert read_stats(agent.store).events >= 1
        text = status.render({**status.snapshot(agent), "updated": "now"})
        assert "source buf: dropped_bytes 1500, overflows 1" in text
    finally:
        agent.stop()


def test_report_gap_wants_a_gap_type(tmp_path):
    source = Lossy.__new__(Lossy)
    with pytest.raises(ValueError, match=r"ends in '\.gap'"):
        Source.report_gap(source, "thing.lost", {})


def test_a_replaced_source_keeps_its_counters(tmp_path):
    from edge_agent.runtime import SourceRunner

    agent = agent_for(tmp_path, [(Plugin(), "test")], "[[sources.lossy]]\nname = 'buf'")
    try:
        agent.start()
        old = agent.sources[0]
        new = SourceRunner(old.source, "lossy")
        new.source = type(old.source)(name="buf", config=None, context=old.source.context)
        new.carry_over(old)
        assert new.source.counters["overflows"] == 1
    finally:
        agent.stop()


def busy_port_config(tmp_path, port: int) -> str:
    """An http source on a port another socket holds: it fails at start and never listens."""
    return f"""
        [agent]
        id = "gw"
        state_dir = "{tmp_path / "state"}"
        shutdown_grace = "1s"

        [[sources.http]]
        name = "web"
        address = "127.0.0.1"
        port = {port}

        [[sinks.stdout]]
        """


@pytest.fixture
def busy_port():
    """A port held by a listening socket of the test's own."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_sigterm_while_a_source_never_listens_stops_the_agent_at_once(
    agent_process, tmp_path, busy_port
):
    agent = agent_process(busy_port_config(tmp_path, busy_port)).start()
    agent.wait_log("source web (plugin http_source) failed again", 15)
    os.kill(agent.pid, signal.SIGTERM)
    asked = time.monotonic()
    wait_for(lambda: agent.process.poll() is not None, 10, "the agent to exit after SIGTERM")
    assert time.monotonic() - asked < 10  # not the 30s start-up waits for sources at most
    assert agent.process.returncode == 0
    log = agent.run_log()
    assert "stopping before it was ready" in log
    assert "ready:" not in log and "ready, but" not in log
    assert "is not listening yet" not in log
    # One traceback for the failure repeated: the repeats are one line each.
    assert log.count("Traceback") <= 2  # the error and the one it was raised from
    assert log.count("failed: OSError: cannot listen") == 1


DEAF_PLUGIN = """
from edge_agent import Source, hookimpl, runtime


class Deaf(Source):
    announces_listening = True

    def run(self):
        self.stopping.wait()


@hookimpl
def register_sources(register):
    register("deaf", Deaf)


@hookimpl
def startup(agent):
    runtime.LISTEN_TIMEOUT = 1.0  # READY after 1s of waiting, not 30s
"""


@pytest.fixture
def deaf_plugin_env(tmp_path):
    """A pip-installed plugin with a source that never listens (its dist-info on PYTHONPATH)."""
    return installed_plugin(tmp_path / "site", "deaf-source", "deaf_source", DEAF_PLUGIN)


def test_the_ready_line_names_the_sources_that_do_not_listen(
    agent_process, tmp_path, busy_port, deaf_plugin_env
):
    config = busy_port_config(tmp_path, busy_port) + "\n[[sources.deaf]]\nname = 'radio'\n"
    agent = agent_process(config).start(env=deaf_plugin_env)
    agent.wait_log("ready, but not every source listens", 15)
    line = next(x for x in agent.run_log().splitlines() if "ready, but" in x)
    assert "WARNING" in line
    assert "source web (plugin http_source, it failed: OSError: cannot listen" in line
    assert "source radio (plugin deaf_source)" in line
    assert "every source listens" not in agent.run_log().replace("not every source listens", "")
    assert agent.terminate() == 0


def test_sigterm_while_a_reload_waits_for_a_new_source_stops_the_agent_at_once(
    agent_process, tmp_path, busy_port
):
    """SIGHUP adds a source that never listens; SIGTERM during the reload's wait for it."""
    config = busy_port_config(tmp_path, busy_port)
    agent = agent_process(config.split("[[sources.http]]")[0] + "[[sinks.stdout]]\n").start()
    agent.wait_ready()
    agent.config_path.write_text(textwrap.dedent(config))
    os.kill(agent.pid, signal.SIGHUP)
    agent.wait_log("source web (plugin http_source) failed again", 15)
    os.kill(agent.pid, signal.SIGTERM)
    asked = time.monotonic()
    wait_for(lambda: agent.process.poll() is not None, 10, "the agent to exit after SIGTERM")
    assert time.monotonic() - asked < 10  # not the 30s a reload waits for sources at most
    assert agent.process.returncode == 0
    assert "is not listening yet" not in agent.run_log()
