"""docs/plugins.md runs as it stands: its code blocks, put into a package as a reader would.

The package is "installed" the way pip leaves it, without touching this
environment: the module and a ``.dist-info`` (METADATA and entry_points.txt,
generated from the tutorial's own pyproject.toml) in a folder on PYTHONPATH.
Then the real agent runs it, and the tutorial's own test runs under pytest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import AgentProcess, run_cli

from edge_agent.testing import wait_for

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "plugins.md"
MODULE = "edge_agent_heartbeat.py"

pytestmark = pytest.mark.timeout(60)


def blocks(language: str) -> list[str]:
    text = TUTORIAL.read_text()
    return [m.group(1) for m in re.finditer(rf"^```{language}\n(.*?)^```", text, re.S | re.M)]


def one(language: str, first_line: str) -> str:
    [found] = [b for b in blocks(language) if b.startswith(first_line)]
    return found


@pytest.fixture
def package(tmp_path) -> tuple[Path, dict]:
    """The tutorial's folder as a reader makes it, and an environment that has it installed."""
    folder = tmp_path / "edge-agent-heartbeat"
    (folder / "tests").mkdir(parents=True)
    module = "".join(b for b in blocks("python") if b.startswith(f"# {MODULE}"))
    assert "class Heartbeat(Source)" in module and "class JsonLines(Sink)" in module
    (folder / MODULE).write_text(module)
    pyproject = one("toml", "# pyproject.toml")
    (folder / "pyproject.toml").write_text(pyproject)
    (folder / "tests" / "test_heartbeat.py").write_text(one("python", "# tests/test_heartbeat.py"))

    meta = tomllib.loads(pyproject)
    assert meta["build-system"]["build-backend"] == "setuptools.build_meta"
    project = meta["project"]
    site = tmp_path / "site"
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    groups = project["entry-points"]
    (info / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in points.items())
            for group, points in groups.items()
        )
    )
    for name in meta["tool"]["setuptools"]["py-modules"]:
        (site / f"{name}.py").write_text((folder / f"{name}.py").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PYTHONPATH"] = str(site)
    return folder, env


def test_the_tutorials_plugin_is_listed(package):
    _, env = package
    listed = run_cli("plugins", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert set(data) == {"plugins", "errors"} and data["errors"] == []
    rows = {(p["name"], p["kind"]): p for p in data["plugins"]}
    assert rows["heartbeat", "source"] == {
        "name": "heartbeat",
        "kind": "source",
        "package": "edge-agent-heartbeat",
        "version": "1.0.0",
    }
    assert rows["jsonl", "sink"]["package"] == "edge-agent-heartbeat"


def test_the_tutorials_plugin_runs_in_the_agent(package, tmp_path):
    _, env = package
    out = tmp_path / "out" / "beats.jsonl"  # its folder is made later: open() fails first
    config = one("toml", "[[sources.heartbeat]]")
    config = config.replace('"30s"', '"0.1s"').replace("/var/lib/edge-agent/beats.jsonl", str(out))
    assert str(out) in config and '"0.1s"' in config
    agent = AgentProcess(
        tmp_path, f'[agent]\nid = "gw-tutorial"\nstate_dir = "{tmp_path / "state"}"\n{config}'
    )
    checked = run_cli("check", "-c", str(agent.config_path), env=env)
    assert checked.returncode == 0, checked.stderr
    agent.start(env=env)
    try:
        agent.wait_ready()
        agent.wait_log("sink jsonl: ")  # offline: the folder is not there yet
        out.parent.mkdir()

        def beats() -> list[dict]:
            text = out.read_text() if out.exists() else ""
            return [json.loads(line) for line in text.splitlines() if line]

        wait_for(lambda: len(beats()) >= 3, 30, "three heartbeats in the tutorial's file")
    finally:
        code = agent.terminate()
    assert code == 0, agent.log()
    log = agent.log()
    assert "close() raised" not in log and "has no attribute" not in log, log
    first = beats()[0]
    assert first["type"] == "heartbeat.beat"
    assert first["source"] == "edge-agent://gw-tutorial/heartbeat"
    assert first["data"]["message"] == "alive" and first["data"]["beat"] == 1


def test_the_tutorials_test_passes(package):
    folder, env = package
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=50,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
