"""Processors: each built-in, their order in the file, and a broken one."""

from __future__ import annotations

import socket
import textwrap

import pytest

from agent.config import load_config
from agent.errors import ConfigError
from agent.event import Event
from agent.plugins import load_plugins
from agent.runtime import Agent


def event(type="file.created", source="inbox", data=None, subject=None) -> Event:
    return Event(type=type, source=source, data=data if data is not None else {}, subject=subject)


def agent_with(tmp_path, processors: str) -> Agent:
    path = tmp_path / "agent.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [agent]
            id = "gw"
            state_dir = "{tmp_path / "state"}"
            [[sinks.stdout]]
            """
        )
        + textwrap.dedent(processors)
    )
    host = load_plugins()
    agent = Agent(load_config(str(path), host), host)
    agent.replace_processors()
    return agent


def test_drop_and_keep_match_types_sources_and_fields(tmp_path):
    agent = agent_with(
        tmp_path,
        """
        [[processors.drop]]
        match = { "data.path" = "*.tmp" }
        [[processors.keep]]
        types = ["file.*"]
        sources = ["in*"]
        """,
    )
    assert agent._process(event(data={"path": "/a/b.csv"})) is not None
    assert agent._process(event(data={"path": "/a/b.tmp"})) is None
    assert agent._process(event(type="log.line")) is None
    assert agent._process(event(source="other")) is None
    assert [p.dropped for p in agent.processors] == [1, 2]


def test_processors_run_in_file_order(tmp_path):
    agent = agent_with(
        tmp_path,
        """
        [[processors.enrich]]
        fields = { stage = "one" }
        [[processors.drop]]
        match = { "data.stage" = "two" }
        [[processors.enrich]]
        fields = { stage = "two" }
        overwrite = true
        """,
    )
    assert [p.name for p in agent.processors] == ["enrich-1", "drop", "enrich-2"]
    result = agent._process(event())
    assert result is not None and result.data["stage"] == "two"


def test_enrich_adds_fields_and_the_host_name(tmp_path):
    agent = agent_with(
        tmp_path,
        """
        [[processors.enrich]]
        fields = { site = "berlin", rack = 4 }
        hostname = "host"
        """,
    )
    result = agent._process(event(data={"site": "kept"}))
    assert result.data == {"site": "kept", "rack": 4, "host": socket.gethostname()}
    assert agent._process(event(data=[1, 2])).data["value"] == [1, 2]


def test_rate_limit_per_source(tmp_path):
    agent = agent_with(
        tmp_path,
        """
        [[processors.rate_limit]]
        rate = 0.001
        burst = 3
        """,
    )
    kept_a = [agent._process(event(source="a")) for _ in range(10)]
    kept_b = [agent._process(event(source="b")) for _ in range(10)]
    assert sum(e is not None for e in kept_a) == 3
    assert sum(e is not None for e in kept_b) == 3


def test_dedupe_within_a_window(tmp_path):
    agent = agent_with(
        tmp_path,
        """
        [[processors.dedupe]]
        window = "1h"
        fields = ["type", "data.path"]
        """,
    )
    assert agent._process(event(data={"path": "/x", "size": 1})) is not None
    assert agent._process(event(data={"path": "/x", "size": 2})) is None
    assert agent._process(event(data={"path": "/y"})) is not None
    assert agent._process(event(type="file.deleted", data={"path": "/x"})) is not None


def test_processor_config_errors_are_named(tmp_path):
    with pytest.raises(ConfigError) as error:
        agent_with(
            tmp_path,
            """
            [[processors.drop]]
            [[processors.rate_limit]]
            rate = -1
            [[processors.dedupe]]
            window = "1s"
            fields = ["colour"]
            """,
        )
    text = str(error.value)
    assert "processors.drop: give at least one of types, sources or match" in text
    assert "processors.rate_limit.rate: must be more than 0, got -1" in text
    assert "processors.dedupe.fields: fields knows" in text


def test_a_processor_that_raises_lets_the_event_through(tmp_path, caplog):
    agent = agent_with(tmp_path, "[[processors.enrich]]\nfields = { a = 1 }\n")

    def broken(event):
        raise RuntimeError("boom")

    agent.processors[0].process = broken
    assert agent._process(event()) is not None
    assert "processor enrich raised for a file.created event from inbox: boom" in caplog.text
    assert agent.processor_errors == {"enrich": 1}
