"""The plugin host: hooks, registration, broken plugins, isolation."""

from __future__ import annotations

import inspect
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import installed_plugin, run_cli

from edge_agent import Event, Sink, SinkUnavailable, Source, hookimpl, hookspecs, option
from edge_agent.config import parse_config
from edge_agent.plugin_host import load_plugins
from edge_agent.queue import read_stats
from edge_agent.runtime import Agent
from edge_agent.testing import wait_for

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(60)


def hook_names() -> list[str]:
    return [
        name
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, "edge_agent_spec")
    ]


def test_every_hook_is_documented_and_tested():
    """Each hook has a docstring, a row in docs/plugins.md and an implementation tested here."""
    docs = (ROOT / "docs" / "plugins.md").read_text()
    tested = inspect.getsource(Plugin)  # exercised by test_hooks_register_and_run
    for name in hook_names():
        assert f"`{name}(" in docs, f"{name} is missing from docs/plugins.md"
        assert f"def {name}(" in tested, f"{name} has no test"
        assert inspect.getdoc(getattr(hookspecs, name)), f"{name} has no docstring"


def agent_for(tmp_path, extra, body: str = "") -> Agent:
    host = load_plugins(extra=extra)
    data = {
        "agent": {"id": "gw", "state_dir": str(tmp_path / "state"), "shutdown_grace": 1},
        "sinks": {"stdout": [{}]},
    }
    import tomllib

    extra = tomllib.loads(textwrap.dedent(body))
    data["sinks"].update(extra.pop("sinks", {}))
    data.update(extra)
    return Agent(parse_config(data, "test.toml", host), host)


class Boom(Source):
    """A source that fails every time it runs."""

    runs = 0

    def run(self) -> None:
        type(self).runs += 1
        raise RuntimeError("boom")


class Refusing(Sink):
    """A sink whose destination is always away."""

    @dataclass(kw_only=True)
    class Config:
        why: str = option("away")

    retry_min = 0.05
    retry_max = 0.1

    def publish(self, events):
        raise SinkUnavailable(self.config.why)


class Plugin:
    """A third-party plugin made in the test, registered through the same manager."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def register_sources(self, register):
        register("boom", Boom)

    @hookimpl
    def register_sinks(self, register):
        register("refusing", Refusing)

    @hookimpl
    def register_processors(self, register):
        from edge_agent.plugins.processors import Drop

        register("my_drop", Drop)

    @hookimpl
    def register_commands(self, cli):
        @cli.command()
        def hello():
            """Say hello."""
            print("hello from a plugin")

    @hookimpl
    def register_remote_commands(self, register):
        register("answer", lambda arguments: {"answer": 42, **arguments})

    @hookimpl
    def process_event(self, event):
        if event.type == "secret.thing":
            return None
        if isinstance(event.data, dict):
            event.data["seen_by"] = "plugin"
        return event

    @hookimpl
    def startup(self, agent):
        self.calls.append(f"startup {agent.id}")

    @hookimpl
    def shutdown(self, agent):
        self.calls.append(f"shutdown {agent.id}")


def test_hooks_register_and_run(tmp_path, capsys):
    plugin = Plugin()
    agent = agent_for(tmp_path, [(plugin, "mine")])
    host = agent.host
    assert {"boom"} <= set(host.sources) and {"refusing"} <= set(host.sinks)
    assert host.processors["my_drop"].plugin == "mine"
    agent.start()
    agent.commit_events("s", [Event(type="secret.thing", source="s", data={})])
    agent.commit_events("s", [Event(type="ok.thing", source="s", data={"a": 1})])
    printed: list[str] = []

    def stdout_sink_printed() -> bool:
        printed.append(capsys.readouterr().out)
        return '"type":"ok.thing"' in "".join(printed)

    wait_for(stdout_sink_printed, 10, "the stdout sink to print the event")
    agent.stop()
    assert '"seen_by":"plugin"' in "".join(printed)
    assert "secret.thing" not in "".join(printed)
    assert plugin.calls == ["startup gw", "shutdown gw"]

    from edge_agent.cli import cli

    host.call_each("register_commands", cli=cli)
    result = CliRunner().invoke(cli, ["hello"], obj=host)
    assert result.output.strip() == "hello from a plugin"

    command = host.remote_commands["answer"]
    assert command.plugin == "mine" and command.handler({"q": 1}) == {"answer": 42, "q": 1}


def test_process_event_hook_drops_and_changes_events(tmp_path):
    agent = agent_for(tmp_path, [(Plugin(), "mine")])
    assert agent._process(Event(type="secret.thing", source="s", data={})) is None
    assert agent._process(Event(type="x.y", source="s", data={})).data == {"seen_by": "plugin"}


def test_a_name_registered_twice_is_an_error_naming_both(tmp_path):
    class Clash:
        @hookimpl
        def register_sources(self, register):
            register("file", Boom)

    host = load_plugins(extra=[(Clash(), "clash")])
    assert host.sources["file"].plugin == "file"
    assert any(
        name == "clash" and "'file', which plugin 'file' already registered" in message
        for name, message in host.errors
    )


def test_a_remote_command_name_taken_or_built_in_is_an_error_naming_the_plugin():
    class First:
        @hookimpl
        def register_remote_commands(self, register):
            register("rescan", lambda arguments: "first")

    class Second:
        @hookimpl
        def register_remote_commands(self, register):
            register("rescan", lambda arguments: "second")
            register("status", lambda arguments: "mine")

    class BadName:
        @hookimpl
        def register_remote_commands(self, register):
            register("Re Scan", lambda arguments: None)

    host = load_plugins(extra=[(First(), "first"), (Second(), "second"), (BadName(), "bad")])
    assert host.remote_commands["rescan"].handler({}) == "first"
    assert "status" not in host.remote_commands
    errors = [f"{name}: {message}" for name, message in host.errors]
    assert any(
        "second: registers remote command 'rescan', which plugin 'first'" in e for e in errors
    )
    assert any("second: registers remote command 'status', a built-in" in e for e in errors)
    assert any(
        "bad: failed in register_remote_commands: remote command 'Re Scan'" in e for e in errors
    )


def test_a_misspelt_hook_is_reported_and_the_plugin_left_out():
    class Misspelt:
        @hookimpl
        def register_source(self, register):
            register("x", Boom)

    host = load_plugins(extra=[(Misspelt(), "misspelt")])
    assert any(name == "misspelt" and "unknown hook" in msg for name, msg in host.errors)
    assert "x" not in host.sources


def test_a_hook_that_raises_costs_only_its_plugin():
    class Raising:
        @hookimpl
        def register_sinks(self, register):
            raise RuntimeError("cannot register")

    host = load_plugins(extra=[(Raising(), "raising")])
    assert ("raising", "failed in register_sinks: cannot register") in host.errors
    assert "mqtt" in host.sinks


def test_a_failing_source_is_restarted_with_backoff_and_counted(tmp_path, caplog):
    Boom.runs = 0
    agent = agent_for(tmp_path, [(Plugin(), "mine")], "[[sources.boom]]\n")
    agent.start()
    wait_for(lambda: Boom.runs >= 2, 10, "a restart")
    agent.stop()
    runner = agent.sources[0]
    assert runner.restarts >= 2 and runner.last_error == "RuntimeError: boom"
    assert "source boom (plugin mine) failed: RuntimeError: boom; restarting it in" in caplog.text


def test_a_failing_sink_keeps_its_events_queued(tmp_path, caplog):
    agent = agent_for(tmp_path, [(Plugin(), "mine")], '[[sinks.refusing]]\nwhy = "on strike"\n')
    agent.start()
    agent.commit_events("s", [Event(type="a.b", source="s", data={"n": n}) for n in range(5)])
    wait_for(lambda: "on strike" in caplog.text, 10, "the sink's failure in the log")
    stats = read_stats(agent.store)
    agent.stop()
    assert stats.sink_backlog["refusing"] == 5
    assert read_stats(agent.store).events == 5, "nothing is deleted that a sink did not confirm"


@pytest.fixture
def broken_plugin_on_path(tmp_path):
    """A pip-installed plugin whose module fails to import (its dist-info on PYTHONPATH)."""
    code = "raise ImportError('needs libfoo.so.1')\n"
    return installed_plugin(tmp_path / "site", "broken-plugin", "broken_plugin", code, "broken")


def test_a_plugin_that_fails_to_import_is_reported_everywhere(broken_plugin_on_path, tmp_path):
    env = broken_plugin_on_path
    listed = run_cli("plugins", env=env)
    assert listed.returncode == 0
    assert "error: plugin broken failed to import 'broken_plugin' from broken-plugin" in (
        listed.stderr
    )
    assert "needs libfoo.so.1" in listed.stderr

    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nstate_dir = "{tmp_path / "state"}"\n[[sinks.stdout]]\n')
    checked = run_cli("check", "-c", str(config), env=env)
    assert checked.returncode == 0 and "warning: plugin broken failed to import" in checked.stderr

    config.write_text(config.read_text() + "[[sources.broken]]\n")
    checked = run_cli("check", "-c", str(config), env=env)
    assert checked.returncode == 78
    assert "sources.broken: plugin 'broken' is installed but failed to load" in checked.stderr


def test_load_plugins_env_restricts_loading(broken_plugin_on_path):
    env = dict(broken_plugin_on_path, EDGE_AGENT_LOAD_PLUGINS="file,stdout")
    listed = run_cli("plugins", env=env)
    names = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert names == ["file", "stdout"] and listed.stderr == ""


class Unbuildable(Sink):
    """A sink whose constructor fails (a bad certificate path, say)."""

    def __init__(self, **kwargs):
        raise OSError("cannot read /etc/edge-agent/missing.pem")


def test_a_sink_that_cannot_be_created_keeps_its_events_and_the_rest_runs(tmp_path, caplog):
    class Provides:
        @hookimpl
        def register_sinks(self, register):
            register("unbuildable", Unbuildable)

    agent = agent_for(tmp_path, [(Provides(), "provides")], "[[sinks.unbuildable]]\n")
    agent.start()
    agent.commit_events("s", [Event(type="a.b", source="s", data={})])
    wait_for(lambda: read_stats(agent.store).sink_backlog.get("stdout") == 0, 10, "stdout sink")
    agent.stop()
    assert "sink unbuildable (plugin provides) could not be created" in caplog.text
    assert read_stats(agent.store).events == 1, "kept for the sink that could not start"


def test_a_hook_that_blocks_is_reported_while_it_blocks(tmp_path, caplog):
    import threading

    release = threading.Event()

    class Blocking:
        @hookimpl
        def process_event(self, event):
            release.wait(10)
            return event

    agent = agent_for(tmp_path, [(Blocking(), "blocking")])
    agent.slow.threshold = 0.2
    worker = threading.Thread(target=agent._process, args=(Event(type="a.b", source="s", data={}),))
    worker.start()
    try:
        wait_for(
            lambda: (agent.slow.report_stuck(), "has been running for" in caplog.text)[1],
            5,
            "the blocked hook to be reported",
        )
    finally:
        release.set()
        worker.join(5)
    assert "plugin blocking's process_event hook has been running for" in caplog.text
