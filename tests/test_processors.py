"""Processors: each built-in, their order in the file, the old table form, and a broken one."""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_agent.errors import ConfigError
from edge_agent.event import Event
from edge_agent.plugin_host import load_plugins
from edge_agent.runtime import Agent


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
        [[processors]]
        type = "drop"
        match = { "data.path" = "*.tmp" }
        [[processors]]
        type = "keep"
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
        [[processors]]
        type = "enrich"
        fields = { stage = "one" }
        [[processors]]
        type = "drop"
        match = { "data.stage" = "two" }
        [[processors]]
        type = "enrich"
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
        [[processors]]
        type = "enrich"
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
        [[processors]]
        type = "rate_limit"
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
        [[processors]]
        type = "dedupe"
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
            [[processors]]
            type = "drop"
            [[processors]]
            type = "rate_limit"
            rate = -1
            [[processors]]
            type = "dedupe"
            window = "1s"
            fields = ["colour"]
            """,
        )
    text = str(error.value)
    assert "processors[0]: give at least one of types, sources or match" in text
    assert "processors[1].rate: must be more than 0, got -1" in text
    assert "processors[2].fields: fields knows" in text


def test_a_processor_that_raises_lets_the_event_through(tmp_path, caplog):
    agent = agent_with(tmp_path, '[[processors]]\ntype = "enrich"\nfields = { a = 1 }\n')

    def broken(event):
        raise RuntimeError("boom")

    agent.processors[0].process = broken
    assert agent._process(event()) is not None
    assert "processor enrich raised for a file.created event from inbox: boom" in caplog.text
    assert agent.processor_errors == {"enrich": 1}


def test_order_is_toml_s_own_and_names_are_chosen(tmp_path):
    # An inline array keeps its order too; "name" chooses the instance's name.
    path = tmp_path / "agent.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            processors = [
              {{ type = "keep", name = "only-files", types = ["file.*"] }},
              {{ type = "enrich", fields = {{ stage = "one" }} }},
              {{ type = "drop", match = {{ "data.stage" = "one" }} }},
            ]
            [agent]
            state_dir = "{tmp_path / "state"}"
            [[sinks.stdout]]
            """
        )
    )
    host = load_plugins()
    agent = Agent(load_config(str(path), host), host)
    agent.replace_processors()
    assert [(p.name, type(p).__name__) for p in agent.processors] == [
        ("only-files", "Keep"),
        ("enrich", "Enrich"),
        ("drop", "Drop"),
    ]
    assert agent._process(event()) is None
    assert [p.dropped for p in agent.processors] == [0, 0, 1]


@pytest.mark.parametrize("header", ["[[processors.drop]]", '[[processors."drop"]]'])
def test_the_old_table_form_is_refused_with_the_new_one_shown(tmp_path, header):
    # TOML groups [[processors.NAME]] tables by name: the order written across names is
    # gone before the agent sees it, so the agent refuses the form instead of guessing.
    with pytest.raises(ConfigError) as error:
        agent_with(
            tmp_path,
            f"""
            [[processors.enrich]]
            fields = {{ stage = "one" }}
            {header}
            types = ["x"]
            """,
        )
    problems = {p.key: p.message for p in error.value.problems}
    assert set(problems) == {"processors.enrich", "processors.drop"}
    assert (
        'write each processor as [[processors]] with type = "drop"' in problems["processors.drop"]
    )
    assert "in the order they should run" in problems["processors.enrich"]


def test_an_old_table_after_a_new_one_is_named(tmp_path):
    # TOML reads [[processors.drop]] after [[processors]] as an array inside that table.
    with pytest.raises(ConfigError) as error:
        agent_with(
            tmp_path,
            """
            [[processors]]
            type = "enrich"
            fields = { a = 1 }
            [[processors.drop]]
            types = ["x"]
            """,
        )
    [problem] = error.value.problems
    assert problem.key == "processors[0].drop"
    assert 'write it as [[processors]] with type = "drop"' in problem.message


def test_a_processor_without_a_known_type_is_named(tmp_path):
    with pytest.raises(ConfigError) as error:
        agent_with(
            tmp_path,
            """
            [[processors]]
            types = ["x"]
            [[processors]]
            type = "dorp"
            [[processors]]
            type = "keep"
            name = "k"
            types = ["x"]
            [[processors]]
            type = "keep"
            name = "k"
            types = ["y"]
            """,
        )
    problems = {p.key: p.message for p in error.value.problems}
    assert "expected the processor plugin's name" in problems["processors[0].type"]
    assert "did you mean 'drop'?" in problems["processors[1].type"]
    assert problems["processors[3].name"] == "processor name 'k' is already used by processors[2]"


def test_the_docs_example_does_what_its_comments_say(tmp_path):
    text = (Path(__file__).parent.parent / "docs/processors.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    agent_with(tmp_path, "")  # writes agent.toml: [agent] and a sink
    host = load_plugins()
    path = tmp_path / "agent.toml"
    path.write_text(example + path.read_text())
    agent = Agent(load_config(str(path), host), host)
    agent.replace_processors()
    assert [p.name for p in agent.processors] == ["no-swap", "no-tmp", "enrich", "rate_limit"]
    # "Drop editor swap files and anything under /tmp, from any source."
    assert agent._process(event(data={"path": "/home/a/.notes.txt.swp"})) is None
    assert agent._process(event(source="other", data={"path": "/tmp/x/y.csv"})) is None
    kept = agent._process(event(data={"path": "/var/spool/inbox/a.csv"}))
    # "Tag every event with where the device stands and its host name."
    assert kept is not None and kept.data["site"] == "berlin-3" and kept.data["rack"] == 4
    assert kept.data["host"] == socket.gethostname()


def test_a_processor_plugin_with_an_option_named_type_is_refused(tmp_path):
    from dataclasses import dataclass

    from edge_agent import Processor, hookimpl, option
    from edge_agent.config import parse_config

    class Tagger(Processor):
        @dataclass(kw_only=True)
        class Config:
            type: str = option("", doc="Clashes with the table's own type key.")

        def process(self, event):
            return event

    class Plugin:
        @hookimpl
        def register_processors(self, register):
            register("tagger", Tagger)

    host = load_plugins(extra=[(Plugin(), "tagger-plugin")])
    data = {"processors": [{"type": "tagger"}], "sinks": {"stdout": [{}]}}
    with pytest.raises(ConfigError) as error:
        parse_config(data, "agent.toml", host)
    [problem] = error.value.problems
    assert problem.key == "processors[0].type"
    assert "has an option named 'type'" in problem.message
