"""The command line: check, run on a bad config, plugins."""

from __future__ import annotations

import os
import textwrap

import pytest
from conftest import run_cli

EX_CONFIG = 78


BAD_CONFIG = """
    [agent]
    id = "gw-01"
    state_dir = "{state}"

    [[sources.file]]
    name = "inbox"
    pathz = ["/tmp"]
    recursive = "yes"

    [[sinks.mqtt]]
    name = "cloud"
    qos = 3
    """


@pytest.fixture
def bad_config(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(BAD_CONFIG.format(state=tmp_path / "state")))
    return path


def test_check_lists_every_problem_with_its_key_path(bad_config):
    result = run_cli("check", "-c", str(bad_config))
    assert result.returncode == EX_CONFIG
    err = result.stderr
    assert "Traceback" not in err
    assert f'{bad_config}: sources.file.pathz: unknown key; did you mean "paths"?' in err
    assert f"{bad_config}: sources.file.recursive: expected true or false, got a string" in err
    assert f"{bad_config}: sources.file.paths: missing required key (a list of strings)" in err
    assert f"{bad_config}: sinks.mqtt.qos: expected one of 0, 1, 2, got an integer 3" in err
    assert "4 problems" in err


def test_run_on_a_bad_config_exits_78_without_starting(bad_config, tmp_path):
    result = run_cli("run", "-c", str(bad_config))
    assert result.returncode == EX_CONFIG
    assert "sources.file.pathz" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()


def test_check_accepts_a_valid_config_and_reads_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "agent.toml"
    secret = tmp_path / "mqtt.pass"
    secret.write_text("s3cret\n")
    path.write_text(
        textwrap.dedent(
            f"""
            [agent]
            id = "${{GW_ID}}"
            state_dir = "{tmp_path / "state"}"

            [[sources.file]]
            paths = ["{tmp_path}"]

            [[sinks.mqtt]]
            port = "${{MQTT_PORT:-1883}}"
            username = "gw"
            password_file = "{secret}"
            """
        )
    )
    env = {"GW_ID": "gw-42", "PATH": "/usr/bin:/bin"}
    result = run_cli("check", "-c", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert "ok (1 sources, 1 sinks, agent id 'gw-42')" in result.stdout
    assert "s3cret" not in result.stdout + result.stderr


def test_check_names_an_unset_variable_and_an_unreadable_secret(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [agent]
            id = "${{NO_SUCH_VARIABLE_HERE}}"
            state_dir = "{tmp_path / "state"}"

            [[sinks.mqtt]]
            password_file = "{tmp_path / "nope"}"
            port = "${{PORT_X:-eighty}}"
            """
        )
    )
    result = run_cli("check", "-c", str(path))
    assert result.returncode == EX_CONFIG
    assert "agent.id: environment variable NO_SUCH_VARIABLE_HERE is not set" in result.stderr
    assert f"sinks.mqtt.password_file: cannot read {tmp_path / 'nope'}" in result.stderr
    assert 'sinks.mqtt.port: expected an integer, got a string "eighty"' in result.stderr


def test_check_reports_broken_toml_and_missing_file(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text("[agent\nid = 1\n")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == EX_CONFIG
    assert f"{path}: not valid TOML" in result.stderr


@pytest.mark.parametrize("command", ["check", "run", "status", "queue stats"])
def test_a_missing_config_says_where_it_looked_and_why_there(tmp_path, command):
    # Given with -c, relative: the absolute path it looked for, not "pass -c FILE".
    result = run_cli(*command.split(), "-c", "nope.toml", cwd=tmp_path)
    assert result.returncode == EX_CONFIG, result.stderr
    assert (
        f"nope.toml: no such file or folder (looked for {tmp_path / 'nope.toml'}, given with -c);"
        " check the path"
    ) in result.stderr
    assert "pass -c" not in result.stderr and "Traceback" not in result.stderr
    # From the environment (the test's own EDGE_AGENT_CONFIG names a missing file).
    result = run_cli(*command.split())
    assert result.returncode == EX_CONFIG
    assert f"(looked for {tmp_path / 'missing-config.toml'}, from $EDGE_AGENT_CONFIG)" in (
        result.stderr
    )


def test_a_missing_default_config_suggests_c_and_the_variable(tmp_path):
    if os.path.exists("/etc/edge-agent/agent.toml"):
        pytest.skip("this machine has a config at the default path")
    env = {k: v for k, v in os.environ.items() if k != "EDGE_AGENT_CONFIG"}
    result = run_cli("check", env=env)
    assert result.returncode == EX_CONFIG
    assert "/etc/edge-agent/agent.toml: no such file or folder (looked for" in result.stderr
    assert "the default path" in result.stderr
    assert "pass -c FILE or set EDGE_AGENT_CONFIG" in result.stderr


def test_every_queue_command_names_a_damaged_queue_in_one_line(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\nstate_dir = "{tmp_path / "state"}"\n[[sinks.stdout]]\n')
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "queue.db").write_bytes(b"not a database, " * 512)
    expected = f"Error: the queue {tmp_path / 'state' / 'queue.db'} is damaged: "
    for command in (
        "queue stats",
        "queue stats --json",
        "queue peek",
        "queue peek --sink stdout",
        "queue purge --sink stdout --before 1d --yes",
        "queue dead list",
    ):
        result = run_cli(*command.split(), "-c", str(path))
        assert result.returncode == 1, (command, result.stderr)
        assert result.stderr.startswith(expected), (command, result.stderr)
        assert len(result.stderr.splitlines()) == 1, (command, result.stderr)


def test_unknown_plugin_is_named_with_what_is_installed(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[[sources.flie]]\npaths = ["/tmp"]\n[[sinks.stdout]]\n')
    result = run_cli("check", "-c", str(path))
    assert result.returncode == EX_CONFIG
    assert "sources.flie: no source plugin named 'flie' is installed; did you mean 'file'?" in (
        result.stderr
    )
    from edge_agent.plugin_host import load_plugins

    installed = ", ".join(sorted(load_plugins().sources))  # every source plugin, by name
    assert f"(installed: {installed})" in result.stderr


def test_plugins_lists_the_builtins_with_package_and_version():
    from edge_agent import __version__

    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "PACKAGE", "VERSION"]
    rows = {tuple(line.split()) for line in lines[1:]}
    for name, kind in (("file", "source"), ("mqtt", "sink"), ("stdout", "sink")):
        assert (name, kind, "edge-event-agent", __version__) in rows


def test_usage_error_exits_2():
    assert run_cli("run", "--no-such-option").returncode == 2
