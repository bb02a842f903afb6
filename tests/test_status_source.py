"""The status source, run alone in the plugin authors' harness."""

from __future__ import annotations

import logging
import time

import pytest

from edge_agent.plugins.status import StatusSource
from edge_agent.testing import SourceHarness, wait_for

pytestmark = pytest.mark.timeout(30)

STATUS = {
    "agent": "gw-1",
    "pid": 4242,
    "interval": 5,
    "queue": {"path": "/var/lib/edge-agent/queue.db", "events": 3},
    "sinks": {"cloud": {"connected": True, "errors": 0}},
}


def test_sends_the_status_without_local_details(caplog):
    with SourceHarness(StatusSource, {"interval": "1s"}, status=STATUS) as harness:
        events = harness.wait_for_events(2, timeout=5)
    assert [e.type for e in events[:2]] == ["agent.status", "agent.status"]
    data = events[0].data
    assert data["sinks"]["cloud"]["connected"] is True and data["queue"]["events"] == 3
    assert "pid" not in data and "interval" not in data and "path" not in data["queue"]


def test_a_status_that_cannot_be_queued_is_skipped_with_one_warning(caplog):
    caplog.set_level(logging.INFO)
    with SourceHarness(StatusSource, {"interval": "1s"}, status=STATUS) as harness:
        harness.fail_commits(2)
        wait_for(lambda: "queued again" in caplog.text, 10, "the source to recover")
        harness.wait_for_events(1)
    assert caplog.text.count("could not queue the status event") == 1
    assert harness.error is None, "the source did not fail"


def test_at_start_false_waits_one_interval():
    with SourceHarness(
        StatusSource, {"interval": "2s", "at_start": False}, status=STATUS
    ) as harness:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # nothing during the first second
            assert harness.events == []
            time.sleep(0.05)  # poll
        harness.wait_for_events(1, timeout=5)
