"""Losses the agent itself can see are reported in the event stream (type queue.gap)."""

from __future__ import annotations

import os

import pytest
from conftest import mqtt_agent_config
from test_bounds import batch

from agent.queue import QueueStore, QueueWriter
from agent.testing import wait_for

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
