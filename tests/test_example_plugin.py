"""A third-party plugin, installed with pip into a fresh virtual environment, end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from edge_agent.testing import wait_for

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "edge-agent-heartbeat"

pytestmark = pytest.mark.timeout(300)


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=240, **kwargs)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new virtual environment with edge-event-agent and the example plugin, as a user has."""
    where = tmp_path_factory.mktemp("venv")
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    run(
        str(python),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        str(ROOT),
        f"{EXAMPLE}[test]",
    )
    return where / "bin"


def test_the_plugin_is_listed(fresh_venv):
    listed = run(str(fresh_venv / "edge-agent"), "plugins", "--json")
    plugins = {(p["name"], p["kind"], p["package"]) for p in json.loads(listed.stdout)["plugins"]}
    assert ("heartbeat", "source", "edge-agent-heartbeat") in plugins
    assert ("jsonl", "sink", "edge-agent-heartbeat") in plugins
    assert ("mqtt", "sink", "edge-event-agent") in plugins


def test_the_plugin_runs_in_the_agent(fresh_venv, tmp_path):
    out = tmp_path / "beats.jsonl"
    config = tmp_path / "agent.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [agent]
            id = "gw-example"
            state_dir = "{tmp_path / "state"}"

            [[sources.heartbeat]]
            interval = "0.1s"

            [[sinks.jsonl]]
            path = "{out}"
            """
        )
    )
    run(str(fresh_venv / "edge-agent"), "check", "-c", str(config))
    process = subprocess.Popen(
        [str(fresh_venv / "edge-agent"), "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def beats() -> list[dict]:
            if not out.exists():
                return []
            return [json.loads(line) for line in out.read_text().splitlines() if line]

        wait_for(lambda: len(beats()) >= 3, 30, "three heartbeats in the file")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    first = beats()[0]
    assert first["type"] == "heartbeat.beat"
    assert first["source"] == "edge-agent://gw-example/heartbeat"


def test_the_plugin_authors_tests_pass_with_our_fixtures(fresh_venv):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    result = subprocess.run(
        [str(fresh_venv / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_the_example_uses_only_the_public_api():
    source = (EXAMPLE / "edge_agent_heartbeat.py").read_text()
    imports = [
        line
        for line in source.splitlines()
        if line.startswith(("from edge_agent", "import edge_agent"))
    ]
    assert imports == [
        "from edge_agent import Duration, QueuedEvent, Sink, Source, hookimpl, option"
    ], imports
    assert sys.version_info >= (3, 11)
