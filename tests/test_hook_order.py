"""Hooks run in pluggy's order, through pluggy, one plugin's failure costing only itself."""

from __future__ import annotations

import textwrap
import tomllib

import pytest

from edge_agent import Event, hookimpl
from edge_agent.config import parse_config
from edge_agent.plugin_host import load_plugins
from edge_agent.runtime import Agent

pytestmark = pytest.mark.timeout(60)


def recorder(name: str, calls: list[str], **marks: bool) -> object:
    """A plugin whose hooks note their plugin's name in ``calls`` (and in the event)."""

    class Recorder:
        @hookimpl(**marks)
        def startup(self, agent):
            calls.append(f"startup {name}")

        @hookimpl(**marks)
        def shutdown(self, agent):
            calls.append(f"shutdown {name}")

        @hookimpl(**marks)
        def process_event(self, event):
            event.data.setdefault("path", []).append(name)
            return event

    return Recorder()


def agent_with(tmp_path, plugins: list[tuple[object, str]]) -> Agent:
    host = load_plugins(extra=plugins)
    data = tomllib.loads(
        textwrap.dedent(
            f"""
            [agent]
            id = "gw"
            state_dir = "{tmp_path / "state"}"
            shutdown_grace = 1
            [[sinks.stdout]]
            """
        )
    )
    return Agent(parse_config(data, "test.toml", host), host)


def four_plugins(calls: list[str]) -> list[tuple[object, str]]:
    # Registered in this order on purpose: neither the registration order nor its
    # reverse is pluggy's order once tryfirst and trylast are in play.
    return [
        (recorder("first", calls, tryfirst=True), "first"),
        (recorder("B", calls), "B"),
        (recorder("last", calls, trylast=True), "last"),
        (recorder("D", calls), "D"),
    ]


PLUGGY_ORDER = ["first", "D", "B", "last"]


def test_hooks_run_in_pluggys_order(tmp_path):
    calls: list[str] = []
    agent = agent_with(tmp_path, four_plugins(calls))
    # pluggy's own order, asked of pluggy itself, is the one this test expects.
    agent.host.pm.hook.startup(agent=agent)
    assert calls == [f"startup {n}" for n in PLUGGY_ORDER]
    calls.clear()

    agent.start()
    try:
        processed = agent._process(Event(type="a.b", source="s", data={}))
    finally:
        agent.stop()
    assert processed.data["path"] == PLUGGY_ORDER
    assert calls == [f"startup {n}" for n in PLUGGY_ORDER] + [f"shutdown {n}" for n in PLUGGY_ORDER]


def test_pluggys_hook_call_monitoring_sees_each_call(tmp_path):
    calls: list[str] = []
    agent = agent_with(tmp_path, four_plugins(calls))
    seen: list[tuple[str, list[str]]] = []
    undo = agent.host.pm.add_hookcall_monitoring(
        lambda name, impls, kwargs: seen.append((name, [i.plugin_name for i in impls])),
        lambda outcome, name, impls, kwargs: None,
    )
    try:
        agent.host.process_event(Event(type="a.b", source="s", data={}), agent)
    finally:
        undo()
    assert seen == [("process_event", [name]) for name in PLUGGY_ORDER]


def test_a_raising_hook_costs_only_its_plugin_and_the_order_holds(tmp_path, caplog):
    calls: list[str] = []

    class Raising:
        @hookimpl
        def startup(self, agent):
            raise RuntimeError("cannot start")

        @hookimpl
        def process_event(self, event):
            raise RuntimeError("cannot process")

    plugins = four_plugins(calls)
    plugins.insert(2, (Raising(), "raising"))  # called between D and B
    agent = agent_with(tmp_path, plugins)
    agent.host.call_each("startup", agent=agent)
    assert calls == [f"startup {n}" for n in PLUGGY_ORDER]
    assert "plugin raising failed in hook startup: cannot start" in caplog.text
    processed = agent.host.process_event(Event(type="a.b", source="s", data={}), agent)
    assert processed.data["path"] == PLUGGY_ORDER
    assert "plugin raising raised in process_event for a.b event from s" in caplog.text


def test_a_dropping_hook_stops_the_chain(tmp_path):
    calls: list[str] = []

    class Dropping:
        @hookimpl
        def process_event(self, event):
            return None

    plugins = four_plugins(calls)
    plugins.insert(2, (Dropping(), "dropping"))  # called between D and B
    agent = agent_with(tmp_path, plugins)
    event = Event(type="a.b", source="s", data={})
    assert agent.host.process_event(event, agent) is None
    assert event.data["path"] == ["first", "D"]


@pytest.mark.parametrize("mark", ["wrapper", "hookwrapper"])
def test_a_wrapper_implementation_is_refused_naming_its_plugin(tmp_path, mark):
    class Wrapping:
        @hookimpl(**{mark: True})
        def process_event(self, event):
            yield

    host = load_plugins(extra=[(Wrapping(), "wrapping")])
    [message] = [m for n, m in host.errors if n == "wrapping"]
    assert f"implements process_event as a {mark}=True hook" in message
    assert "implement the hook plainly" in message
    assert "wrapping" not in [name for name, _ in host.pm.list_name_plugin()]
    event = Event(type="a.b", source="s", data={"kept": True})
    assert host.process_event(event, None) is event
