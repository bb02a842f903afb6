"""Losses the agent itself can see are reported in the event stream (type queue.gap)."""

from __future__ import annotations

import glob
import os

import pytest
from conftest import created_paths, mqtt_agent_config
from test_bounds import batch

from edge_agent.queue import QueueStore, QueueWriter
from edge_agent.testing import wait_for

pytestmark = pytest.mark.timeout(60)


def test_a_damaged_queue_is_reported_as_a_queue_gap_event(
    tmp_path, running_broker, subscriber, agent_process
):
    agent = agent_process(mqtt_agent_config(tmp_path, running_broker.port))
    store = QueueStore(str(agent.state_dir))
    store.open()
    writer = QueueWriter(store)
    writer.append(batch("inbox", 2000, size=500))  # waiting for a broker that never came
    writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    writer.close()
    size = os.path.getsize(store.path)
    with open(store.path, "r+b") as handle:  # a bad sector in the middle of the file
        handle.seek(size // 2)
        handle.write(b"\xff" * 8192)

    agent.start()
    agent.wait_started()

    def gaps() -> list[dict]:
        return [e for e in subscriber.events() if e["type"] == "queue.gap"]

    wait_for(gaps, 20, f"a queue.gap event at the broker; log:\n{agent.log()}")
    (gap,) = gaps()
    assert gap["source"] == "edge-agent://test-gw/agent"
    assert gap["data"]["moved_to"].startswith(str(agent.state_dir / "queue.db.corrupt-"))
    assert os.path.exists(gap["data"]["moved_to"])
    assert gap["data"]["events"] == 2000  # what could still be read of it
    assert "were not sent" in gap["data"]["reason"]
    assert agent.terminate() == 0


FAKETIME = next(iter(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1")), "")


@pytest.mark.skipif(not FAKETIME, reason="libfaketime is not installed (make test installs it)")
def test_a_clock_step_of_30_days_expires_nothing(tmp_path, broker, subscriber, agent_process):
    """NTP fixing a device without a real-time clock: the wall clock jumps 30 days ahead
    while 5 events wait for the broker, with max_age = 7d. None of them may be dropped."""
    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    agent = agent_process(
        mqtt_agent_config(tmp_path, broker.port, source='events = ["created"]').replace(
            'shutdown_grace = "3s"', 'shutdown_grace = "3s"\nlog_level = "debug"'
        )
        + '\n[queue]\nmax_age = "7d"\n'
    )
    broker.stop()
    agent.start(
        env={
            "LD_PRELOAD": FAKETIME,
            "FAKETIME_TIMESTAMP_FILE": str(clock),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # the real clock still ticks since boot
        }
    )
    wait_for(lambda: "every source listens" in agent.run_log(), 15, "the agent to be ready")
    for i in range(5):
        (tmp_path / "inbox" / f"before-{i}").write_text("x")
    wait_for(lambda: agent.queued() == 5, 10, "5 events queued")

    clock.write_text("+30d\n")  # the step
    stepped_at = len(agent.run_log())
    (tmp_path / "inbox" / "after").write_text("x")
    wait_for(lambda: agent.queued() == 6, 10, "the 6th event queued")
    wait_for(
        lambda: agent.run_log()[stepped_at:].count("max_age checked") >= 2,
        20,
        "two max_age checks after the step",
    )
    assert agent.queued() == 6
    assert "events expired" in agent.run_log() and "0 events expired" in agent.run_log()
    assert " 1 events expired" not in agent.run_log()

    broker.start()
    wait_for(lambda: len(set(created_paths(subscriber.events()))) == 6, 20, "6 events delivered")
    times = sorted(e["time"] for e in subscriber.events())
    assert times[-1][:10] > times[0][:10]  # the step shows in the events' own times
    assert agent.terminate() == 0
