"""A config folder: -c names a folder whose *.toml files make one configuration."""

from __future__ import annotations

import json
import os
import signal
import textwrap

import pytest
from conftest import run_cli

from edge_agent.testing import wait_for

pytestmark = pytest.mark.timeout(90)

EX_CONFIG = 78


def write(folder, name: str, text: str) -> None:
    (folder / name).write_text(textwrap.dedent(text))


def folder_config(tmp_path, port: int):
    """agent.d/: the agent and a source, two processors in two files, the sink last."""
    folder = tmp_path / "agent.d"
    folder.mkdir()
    (tmp_path / "inbox").mkdir()
    write(
        folder,
        "10-agent.toml",
        f"""
        [agent]
        id = "test-gw"
        state_dir = "{tmp_path / "state"}"
        shutdown_grace = "3s"

        [[sources.file]]
        name = "inbox"
        paths = ["{tmp_path / "inbox"}"]
        """,
    )
    # Read after 10-, before 90-; its processor runs before 30-'s.
    write(
        folder,
        "20-tag.toml",
        """
        [[processors]]
        type = "enrich"
        name = "tag"
        fields = { stage = "one" }
        """,
    )
    write(
        folder,
        "30-retag.toml",
        """
        [[processors]]
        type = "enrich"
        name = "retag"
        fields = { stage = "two" }
        overwrite = true
        """,
    )
    write(
        folder,
        "90-cloud.toml",
        f"""
        [queue]
        max_events = 100000

        [[sinks.mqtt]]
        name = "cloud"
        host = "127.0.0.1"
        port = {port}
        reconnect_min = "0.05s"
        reconnect_max = "0.5s"
        connect_timeout = "2s"
        """,
    )
    # Skipped: a hidden file (an editor's), another extension, a sub-folder.
    (folder / ".#10-agent.toml").write_text("this is not TOML")
    (folder / "README").write_text("not read")
    (folder / "old.toml.bak").write_text("not read")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.toml").write_text("not read")
    return folder


def test_an_agent_runs_on_a_folder_and_a_reload_reads_it_again(
    tmp_path, subscriber, running_broker, agent_process
):
    folder = folder_config(tmp_path, running_broker.port)
    checked = run_cli("check", "-c", str(folder))
    assert checked.returncode == 0, checked.stderr
    assert f"{folder}: ok (4 files, 1 sources, 1 sinks, agent id 'test-gw')" in checked.stdout

    agent = agent_process("")
    agent.config_path = folder
    agent.start()
    agent.wait_started()
    (tmp_path / "inbox" / "a.csv").write_text("1")
    wait_for(lambda: subscriber.events(), 10, "the first event")
    # The processors ran in the files' order: 30-retag.toml's last.
    assert subscriber.events()[0]["data"]["stage"] == "two"

    # The read-only commands take the folder too.
    status = json.loads(run_cli("status", "-c", str(folder), "--json").stdout)
    assert status["running"] is True
    assert list(status["status"]["processors"]) == ["tag", "retag"]
    stats = run_cli("queue", "stats", "-c", str(folder), "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["path"] == str(tmp_path / "state" / "queue.db")

    # SIGHUP reads the folder again: a new file's source starts, a removed file's
    # processor stops.
    (tmp_path / "app.log").write_text("")
    write(
        folder,
        "40-app.toml",
        f"""
        [[sources.tail]]
        name = "app"
        paths = ["{tmp_path / "app.log"}"]
        """,
    )
    (folder / "30-retag.toml").unlink()
    os.kill(agent.pid, signal.SIGHUP)
    agent.wait_log("configuration reloaded")
    assert "source app started" in agent.log()
    with open(tmp_path / "app.log", "a") as handle:
        handle.write("hello\n")
    wait_for(
        lambda: [e for e in subscriber.events() if e["type"] == "log.line"], 15, "the new source"
    )
    line = next(e for e in subscriber.events() if e["type"] == "log.line")
    assert line["data"]["stage"] == "one"  # only 20-tag.toml's processor is left

    # A file that clashes with another is refused, naming both; the running config stays.
    write(folder, "95-clash.toml", '[[sinks.stdout]]\nname = "cloud"\n')
    os.kill(agent.pid, signal.SIGHUP)
    agent.wait_log("the new configuration is refused")
    assert (
        f"{folder / '95-clash.toml'}: sinks.stdout.name: sink name 'cloud' is already used by"
        f" sinks.mqtt in {folder / '90-cloud.toml'}"
    ) in agent.log()
    assert agent.process.poll() is None
    assert agent.terminate() == 0


def test_the_merge_rules_name_the_files(tmp_path):
    folder = tmp_path / "agent.d"
    folder.mkdir()
    write(
        folder,
        "10-a.toml",
        f"""
        [agent]
        state_dir = "{tmp_path / "state"}"
        [queue]
        max_age = "7d"
        [[sources.status]]
        name = "stats"
        [[sinks.stdout]]
        """,
    )
    write(
        folder,
        "20-b.toml",
        """
        [queue]
        max_age = "1d"
        max_events = 5
        [[sources.status]]
        name = "stats"
        [[sources.status]]
        name = "other"
        intervall = "1s"
        [[processors.drop]]
        types = ["x"]
        """,
    )
    result = run_cli("check", "-c", str(folder))
    assert result.returncode == EX_CONFIG, result.stdout
    a, b = folder / "10-a.toml", folder / "20-b.toml"
    lines = result.stderr.splitlines()
    assert lines[0] == "invalid configuration (4 problems):"
    problems = "\n".join(lines[1:])
    assert (
        f"{b}: queue.max_age: already set in {a}; set each [queue] key in one file only" in problems
    )
    assert (
        f"{b}: sources.status[0].name: source name 'stats' is already used by sources.status in {a}"
    ) in problems
    assert f"{b}: sources.status[1].intervall: unknown key" in problems
    assert f"{b}: processors.drop: [[processors.drop]] is no longer read" in problems
    assert "max_events" not in problems  # a key set in one file only is fine


def test_default_names_count_across_files_and_a_core_problem_names_its_file(tmp_path):
    folder = tmp_path / "agent.d"
    folder.mkdir()
    write(folder, "a.toml", f'[agent]\nstate_dir = "{tmp_path / "state"}"\n[[sinks.stdout]]\n')
    write(folder, "b.toml", "[[sources.status]]\n")
    write(folder, "c.toml", "[[sources.status]]\n[queue]\nmax_events = -1\n")
    result = run_cli("check", "-c", str(folder))
    assert result.returncode == EX_CONFIG
    assert f"{folder / 'c.toml'}: queue.max_events: must be at least 0, got -1" in result.stderr
    (folder / "c.toml").write_text("[[sources.status]]\n")
    result = run_cli("check", "-c", str(folder))
    assert result.returncode == 0, result.stderr
    assert "(3 files, 2 sources, 1 sinks" in result.stdout
    from edge_agent.config import load_config
    from edge_agent.plugin_host import load_plugins

    config = load_config(str(folder), load_plugins())
    assert [(s.name, s.file) for s in config.sources] == [
        ("status-1", str(folder / "b.toml")),
        ("status-2", str(folder / "c.toml")),
    ]
    assert config.file_of("agent.state_dir") == str(folder / "a.toml")


def test_a_folder_without_toml_files_and_one_without_a_sink(tmp_path):
    empty = tmp_path / "empty.d"
    empty.mkdir()
    (empty / "agent.conf").write_text("[agent]\n")
    for command in ("check", "run", "status", "queue stats"):
        result = run_cli(*command.split(), "-c", str(empty))
        assert result.returncode == EX_CONFIG, (command, result.stderr)
        assert f"{empty}: a config folder with no *.toml files" in result.stderr
    write(empty, "agent.toml", f'[agent]\nstate_dir = "{tmp_path / "state"}"\n')
    result = run_cli("check", "-c", str(empty))
    assert result.returncode == EX_CONFIG
    assert f"{empty}: sinks: no sink is configured" in result.stderr


def test_status_reads_the_state_dir_of_an_invalid_folder(tmp_path):
    folder = tmp_path / "agent.d"
    folder.mkdir()
    write(folder, "10-agent.toml", f'[agent]\nstate_dir = "{tmp_path / "state"}"\n')
    write(folder, "20-broken.toml", "[[sinks.stdout]\n")
    result = run_cli("status", "-c", str(folder))
    assert result.returncode == 1  # not running; the state dir came from 10-agent.toml
    assert f"Status from {tmp_path / 'state'}:" in result.stderr
    assert f"no status in {tmp_path / 'state'}" in result.stderr
