"""The short commands start without the libraries that only some plugins need.

``edge-agent --version``, ``check`` and ``plugins`` run often (scripts, config
management, a shell's prompt): none imports pika, psutil, pyudev, pyserial,
prometheus-client, watchdog or paho's client until a plugin runs. The time
they take is measured by bench/startup.py, not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from edge_agent import hookimpl

HEAVY = (
    "pika",
    "psutil",
    "pyudev",
    "serial",
    "prometheus_client",
    "watchdog",
    "paho.mqtt.client",
    "http.server",
    "sqlite_utils",
)

#: Runs the command as the ``edge-agent`` script does; at exit, writes which modules named
#: in argv[2] (or below them) were imported (``-X importtime`` does not see modules that
#: entry points load).
PROBE = textwrap.dedent(
    """
    import atexit, json, sys
    out = sys.argv.pop(1)
    names = sys.argv.pop(1).split(",")
    def report():
        found = [m for m in sys.modules if any(m == n or m.startswith(n + ".") for n in names)]
        with open(out, "w") as f:
            json.dump(sorted(found), f)
    atexit.register(report)
    sys.argv[0] = "edge-agent"
    from edge_agent.cli import main
    main()
    """
)

#: Every plugin with a library of its own, configured.
CONFIG = """\
[agent]
id = "startup"
state_dir = "{tmp}/state"

[metrics]
listen = "127.0.0.1:9108"

[[sources.file]]
paths = ["{tmp}/inbox"]

[[sources.tail]]
paths = ["{tmp}/app.log"]

[[sources.serial]]
port = "/dev/ttyUSB0"

[[sources.host]]

[[sources.udev]]

[[sinks.mqtt]]
host = "127.0.0.1"
port = 1883

[[sinks.amqp]]
"""


def imported_by(tmp_path, names: tuple[str, ...], *args: str) -> list[str]:
    """The modules among ``names`` (or below them) that ``edge-agent ARGS`` imported."""
    out = tmp_path / "imported.json"
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(out), ",".join(names), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "args",
    [["--version"], ["check", "-c", "agent.toml"], ["plugins"], ["plugins", "--json"]],
    ids=["version", "check", "plugins", "plugins-json"],
)
def test_short_commands_import_no_plugin_library(tmp_path, args):
    (tmp_path / "agent.toml").write_text(CONFIG.format(tmp=tmp_path))
    assert imported_by(tmp_path, HEAVY, *args) == []


def test_version_loads_no_plugin(tmp_path):
    assert imported_by(tmp_path, ("edge_agent.plugins",), "--version") == []
    assert "edge_agent.plugins.mqtt" in imported_by(tmp_path, ("edge_agent.plugins",), "plugins")


class Greeter:
    @hookimpl
    def register_commands(self, cli):
        @cli.command()
        def greet():
            """Say hello (a plugin's command)."""
            print("hello from a plugin")


def test_plugin_commands_are_added_before_a_command_is_looked_up(monkeypatch):
    """A plugin's command works and is listed; --version loads no plugin."""
    import edge_agent.cli
    from edge_agent.plugin_host import load_plugins

    monkeypatch.setenv("EDGE_AGENT_LOAD_PLUGINS", "")
    loads = []

    def load() -> object:
        loads.append(1)
        return load_plugins(extra=[(Greeter(), "greeter")])

    monkeypatch.setattr(edge_agent.cli, "load_plugins", load)
    cli = edge_agent.cli.cli
    try:
        assert CliRunner().invoke(cli, ["--version"]).exit_code == 0
        assert loads == []  # --version needs no plugin
        listed = CliRunner().invoke(cli, ["--help"])
        assert "greet" in listed.output and "Say hello" in listed.output
        result = CliRunner().invoke(cli, ["greet"])
        assert result.output.strip() == "hello from a plugin"
    finally:
        cli.commands.pop("greet", None)
        cli._commands_from = None
