"""A burst of 200,000 files in one watched folder, through the real agent and broker.

In a module of its own so that the test runner can give it a worker of its own:
on a loaded machine it is the longest test of the suite.
"""

from __future__ import annotations

import time

import pytest
from conftest import mqtt_agent_config
from test_file_catchup import BATCHED, CREATED_ONLY, paths_of, received, touch_many

from edge_agent.testing import wait_for


@pytest.mark.timeout(300)  # a burst of 200,000 files through the real agent and broker
def test_a_burst_of_200000_files_is_reported_in_full(
    tmp_path, subscriber, running_broker, agent_process
):
    config = mqtt_agent_config(tmp_path, running_broker.port, sink=BATCHED, source=CREATED_ONLY)
    agent = agent_process(config).start()
    agent.wait_started()
    started = time.monotonic()
    made = set(touch_many(tmp_path / "inbox", 200_000, "b"))
    created = time.monotonic() - started
    wait_for(
        lambda: made <= paths_of(received(subscriber), "file.created"),
        240,
        "200,000 files reported",
    )
    reported = paths_of(received(subscriber), "file.created")
    with open(f"/proc/{agent.pid}/status") as handle:
        peak = next(line.split()[1] for line in handle if line.startswith("VmHWM"))
    print(
        f"200,000 files made in {created:.1f}s, all {len(reported & made)} reported after"
        f" {time.monotonic() - started:.1f}s; by a scan:"
        f" {len(paths_of(received(subscriber), 'file.created', scan=True))};"
        f" the agent's peak RSS {int(peak) / 1024:.0f} MiB"
    )
    assert agent.terminate() == 0
