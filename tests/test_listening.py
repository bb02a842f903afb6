"""READY means listening; counters and gap events of a source's own."""

from __future__ import annotations

import logging

import pytest
from test_plugins import agent_for

from edge_agent import Source, hookimpl, status
from edge_agent.queue import read_stats
from edge_agent.testing import wait_for

pytestmark = pytest.mark.timeout(30)

order: list[str] = []


class SlowToListen(Source):
    """Takes a moment to set up its watch, as a source over a large tree does."""

    announces_listening = True

    def run(self) -> None:
        order.append("run")
        self.stopping.wait(0.3)  # the set-up this source needs
        order.append("listening")
        self.listening()
        self.stopping.wait()


class NeverListens(Source):
    announces_listening = True

    def run(self) -> None:
        self.stopping.wait()


class Lossy(Source):
    """Counts an overflow and reports the loss it caused, once."""

    def run(self) -> None:
        self.count("overflows")
        self.count("dropped_bytes", 1500)
        self.report_gap("thing.gap", {"reason": "buffer overflowed", "count": 3})
        self.stopping.wait()


class Plugin:
    @hookimpl
    def register_sources(self, register):
        register("slow", SlowToListen)
        register("deaf", NeverListens)
        register("lossy", Lossy)


def test_start_returns_only_once_every_source_listens(tmp_path):
    order.clear()
    agent = agent_for(tmp_path, [(Plugin(), "test")], "[[sources.slow]]\n[[sources.lossy]]")
    try:
        agent.start()
        order.append("started")
        assert order == ["run", "listening", "started"]
        assert all(r.source.is_listening.is_set() for r in agent.sources)
    finally:
        agent.stop()


def test_a_source_that_never_listens_is_named_and_start_goes_on(tmp_path, monkeypatch, caplog):
    from edge_agent import runtime

    monkeypatch.setattr(runtime, "LISTEN_TIMEOUT", 0.5)
    agent = agent_for(tmp_path, [(Plugin(), "test")], "[[sources.deaf]]\nname = 'radio'")
    caplog.set_level(logging.WARNING, logger="edge_agent")
    try:
        agent.start()
        assert "source radio (plugin test) is not listening yet after 0.5s" in caplog.text
        assert status.snapshot(agent)["sources"]["radio"]["listening"] is False
    finally:
        agent.stop()


def test_counters_and_gap_events_show_in_status_and_the_queue(tmp_path):
    agent = agent_for(tmp_path, [(Plugin(), "test")], "[[sources.lossy]]\nname = 'buf'")
    try:
        agent.start()
        wait_for(lambda: agent.gaps["buf"] == 1, 10, "the gap event to be committed")
        source = status.snapshot(agent)["sources"]["buf"]
        assert source["gaps"] == 1
        assert source["counters"] == {"overflows": 1, "dropped_bytes": 1500}
        assert read_stats(agent.store).events >= 1
        text = status.render({**status.snapshot(agent), "updated": "now"})
        assert "source buf: dropped_bytes 1500, overflows 1" in text
    finally:
        agent.stop()


def test_report_gap_wants_a_gap_type(tmp_path):
    source = Lossy.__new__(Lossy)
    with pytest.raises(ValueError, match=r"ends in '\.gap'"):
        Source.report_gap(source, "thing.lost", {})


def test_a_replaced_source_keeps_its_counters(tmp_path):
    from edge_agent.runtime import SourceRunner

    agent = agent_for(tmp_path, [(Plugin(), "test")], "[[sources.lossy]]\nname = 'buf'")
    try:
        agent.start()
        old = agent.sources[0]
        new = SourceRunner(old.source, "lossy")
        new.source = type(old.source)(name="buf", config=None, context=old.source.context)
        new.carry_over(old)
        assert new.source.counters["overflows"] == 1
    finally:
        agent.stop()
