"""The docs stay honest: every option documented, the README's output real."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import AgentSettings, MetricsSettings, QueueSettings
from edge_agent.plugin_host import load_plugins

ROOT = Path(__file__).resolve().parent.parent

PAGES = {
    ("source", "file"): "docs/sources/file.md",
    ("source", "tail"): "docs/sources/tail.md",
    ("source", "udev"): "docs/sources/udev.md",
    ("source", "serial"): "docs/sources/serial.md",
    ("source", "exec"): "docs/sources/exec.md",
    ("source", "status"): "docs/sources/status.md",
    ("source", "http"): "docs/sources/http.md",
    ("source", "mqtt"): "docs/sources/mqtt.md",
    ("source", "journald"): "docs/sources/journald.md",
    ("source", "host"): "docs/sources/host.md",
    ("sink", "mqtt"): "docs/sinks/mqtt.md",
    ("sink", "amqp"): "docs/sinks/amqp.md",
    ("sink", "stdout"): "docs/sinks/stdout.md",
    ("sink", "http"): "docs/sinks/http.md",
}

#: Pages that are not about one plugin; their own tests run their examples
#: (docs/fleet.md: tests/test_fleet_docs.py).
GUIDES = ["docs/fleet.md"]


def documented_keys(page: str) -> set[str]:
    text = (ROOT / page).read_text()
    return set(re.findall(r"^\| `([a-z_]+)` \|", text, re.MULTILINE))


@pytest.mark.parametrize(("kind", "name"), sorted(PAGES))
def test_every_builtin_option_is_in_its_docs_table(kind, name):
    host = load_plugins()
    registry = host.sources if kind == "source" else host.sinks
    schema = registry[name].cls.Config
    options = {f.name for f in dataclasses.fields(schema)}
    assert options == documented_keys(PAGES[(kind, name)])


@pytest.mark.parametrize("page", GUIDES)
def test_every_relative_link_of_a_guide_leads_to_a_file(page):
    text = (ROOT / page).read_text()
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)
    assert links, page
    for link in links:
        assert (ROOT / page).parent.joinpath(link).is_file(), f"{page}: {link}"


def test_every_builtin_plugin_has_a_page():
    host = load_plugins()
    builtins = {
        (r.kind, r.name)
        for r in [*host.sources.values(), *host.sinks.values()]
        if r.package == "edge-event-agent"
    }
    assert builtins == set(PAGES)


def test_every_builtin_processor_and_option_is_documented():
    host = load_plugins()
    text = (ROOT / "docs/processors.md").read_text()
    keys = documented_keys("docs/processors.md")
    for name, registration in host.processors.items():
        assert f"`{name}`" in text
        assert {f.name for f in dataclasses.fields(registration.cls.Config)} <= keys, name


def test_every_core_option_is_in_the_configuration_reference():
    keys = documented_keys("docs/configuration.md")
    for schema in (AgentSettings, QueueSettings, MetricsSettings):
        assert {f.name for f in dataclasses.fields(schema)} <= keys


def test_readme_shows_the_real_plugins_output():
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("<!-- plugins-output -->")[1].split("<!-- /plugins-output -->")[0]
    shown = shown.strip().removeprefix("```").removesuffix("```").strip()
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "plugins"], capture_output=True, text=True, timeout=30
    )
    assert result.stdout.strip() == shown


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert first_block.strip().splitlines()[0].startswith("make run")
    assert first_block.strip().splitlines()[1].startswith("make test")


def test_every_commands_option_code_and_command_is_in_docs_commands():
    from edge_agent.commands import BUILTIN_COMMANDS, CODES
    from edge_agent.plugins.mqtt_commands import CommandsConfig

    documented = documented_keys("docs/commands.md")
    assert {f.name for f in dataclasses.fields(CommandsConfig)} <= documented
    assert set(CODES) <= documented
    text = (ROOT / "docs/commands.md").read_text()
    for name in BUILTIN_COMMANDS:
        assert f"| `{name}` |" in text
