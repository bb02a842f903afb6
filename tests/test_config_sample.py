"""``edge-agent config sample``: a commented sample that passes ``check`` as it stands."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest
from conftest import run_cli

from edge_agent.plugin_host import load_plugins

HOST = load_plugins()
BUILT_INS = [
    f"{kind}.{name}"
    for kind in ("sources", "processors", "sinks")
    for name, registration in getattr(HOST, kind).items()
    if registration.package == "edge-event-agent"
]


def checked(tmp_path, sample: str) -> str:
    """``edge-agent check`` on the sample, with only the state dir pointed at tmp_path."""
    assert "\n[agent]\n" in sample
    text = sample.replace("\n[agent]\n", f'\n[agent]\nstate_dir = "{tmp_path / "state"}"\n', 1)
    path = tmp_path / "agent.toml"
    path.write_text(text)
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, f"{result.stderr}\n{text}"
    return result.stdout


def test_there_are_built_ins_to_sample():
    assert "sources.serial" in BUILT_INS and "sinks.mqtt" in BUILT_INS and len(BUILT_INS) >= 19


@pytest.mark.parametrize("plugin", BUILT_INS)
def test_each_built_ins_sample_passes_check(tmp_path, plugin):
    result = run_cli("config", "sample", plugin)
    assert result.returncode == 0, result.stderr
    kind, name = plugin.split(".")
    header = (
        "[[processors]]\ntype = " + f'"{name}"' if kind == "processors" else f"[[{kind}.{name}]]"
    )
    assert f"\n{header}\n" in result.stdout
    out = checked(tmp_path, result.stdout)
    # A sample of a source alone gets the stdout sink, so that it runs.
    assert "1 sinks" in out or kind == "sinks"
    registration = getattr(HOST, kind)[name]
    schema = registration.cls.Config
    for field in dataclasses.fields(schema):
        assert f"{field.name} = " in result.stdout, field.name
        doc = field.metadata.get("doc", "")
        assert " ".join(doc.split()[:3]) in " ".join(result.stdout.replace("##", "").split())


def test_the_whole_sample_passes_check_and_documents_every_option(tmp_path):
    result = run_cli("config", "sample")
    assert result.returncode == 0, result.stderr
    data = tomllib.loads(result.stdout)
    for plugin in BUILT_INS:
        kind, name = plugin.split(".")
        if kind == "processors":  # one array, in the order they would run
            assert name in [table["type"] for table in data[kind]], plugin
        else:
            assert name in data[kind], plugin
    out = checked(tmp_path, result.stdout)
    assert "10 sources, 4 sinks" in out
    # Defaults are shown commented out, in the units a person writes.
    assert '# max_bytes = "256MiB"' in result.stdout
    assert '# shutdown_grace = "10s"' in result.stdout
    assert "## Least severe log level written to stderr." in result.stdout
    # Required options are live, with their example.
    assert 'port = "/dev/ttyUSB0"' in result.stdout.split("[[sources.serial]]")[1]


def test_a_name_that_is_a_source_and_a_sink_gives_both_and_an_unknown_one_is_refused(tmp_path):
    both = run_cli("config", "sample", "mqtt").stdout
    assert "[[sources.mqtt]]" in both and "[[sinks.mqtt]]" in both
    assert "[[sinks.stdout]]" not in both  # a sink was asked for
    checked(tmp_path, both)
    several = run_cli("config", "sample", "tail", "sinks.http").stdout
    assert "[[sources.tail]]" in several and "[[sinks.http]]" in several
    assert "[[sources.http]]" not in several
    wrong = run_cli("config", "sample", "tial")
    assert wrong.returncode == 2
    assert "no plugin named 'tial'; installed: " in wrong.stderr and "tail" in wrong.stderr
