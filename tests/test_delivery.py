"""The delivery promise at the sink side: every sink confirms, refusals are not confirmations."""

from __future__ import annotations

import os
import time

import pytest
from conftest import created_paths, mqtt_agent_config

from edge_agent.testing import Mosquitto, Subscriber, wait_for

pytestmark = pytest.mark.timeout(90)


def test_an_event_leaves_the_queue_only_when_every_sink_confirmed(
    tmp_path, running_broker, agent_process
):
    # The backup broker's subscriber is in place before the agent can reach it:
    # its persistent session is saved when the broker stops and restored when it
    # starts again, so a publish in the first moments after the start is kept
    # for it instead of racing its subscription.
    second = Mosquitto(str(tmp_path / "second-broker")).start()
    second_sub = Subscriber(second.port, "edge/#").start()
    second.stop()
    config = (
        mqtt_agent_config(tmp_path, running_broker.port)
        + f"""
        [[sinks.mqtt]]
        name = "backup"
        port = {second.port}
        reconnect_min = "0.05s"
        reconnect_max = "0.3s"
        """
    )
    with Subscriber(running_broker.port, "edge/#") as first_sub:
        agent = agent_process(config).start()
        agent.wait_log("sink backup: cannot reach")
        # The first start's scan takes what is already in the folder as its silent
        # baseline: the file is written once the watch and that baseline are in place.
        agent.wait_ready()
        (tmp_path / "inbox" / "a.csv").write_text("1")
        wait_for(lambda: created_paths(first_sub.events()), 15, "delivery to the first broker")
        wait_for(lambda: agent.queued() == 2, 5, "created + closed still queued for backup")

        second.start()
        try:
            wait_for(lambda: created_paths(second_sub.events()), 15, "delivery to backup")
            wait_for(lambda: agent.queued() == 0, 10, "the queue to empty")
        finally:
            second_sub.stop()
            second.stop()
    assert agent.terminate() == 0


def test_a_broker_refusal_keeps_the_event_queued(tmp_path, agent_process):
    """MQTT 5 PUBACK 0x87 (not authorized) is logged and retried, never confirmed."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite edge/test-gw/inbox/file.closed\ntopic read #\n")
    os.chmod(acl, 0o644)
    broker = Mosquitto(str(tmp_path / "strict"), extra_config=f"acl_file {acl}").start()
    sub = Subscriber(broker.port, "edge/#").start()  # a persistent session: kept over restarts
    try:
        config = mqtt_agent_config(tmp_path, broker.port, sink='protocol = "5"')
        agent = agent_process(config).start()
        agent.wait_started()
        (tmp_path / "inbox" / "a.csv").write_text("1")
        agent.wait_log("Not authorized", timeout=15)
        # file.closed may be committed just after the refusal of file.created is logged.
        wait_for(lambda: agent.queued() == 2, 10, "the refused event and the one after it")
        assert not created_paths(sub.events())

        # The operator fixes the broker's ACL and reloads it: the same event goes through.
        acl.write_text("topic readwrite #\n")
        broker.reload()
        wait_for(lambda: created_paths(sub.events()), 20, "the refused event, once allowed")
        wait_for(lambda: agent.queued() == 0, 10, "the queue to empty")
        assert agent.terminate() == 0
    finally:
        sub.stop()
        broker.stop()


def test_a_stop_with_a_refusing_broker_waits_between_tries_and_ends_in_the_grace(
    tmp_path, agent_process
):
    """SIGTERM while the broker refuses every event: backoff goes on through the grace
    period (no storm of refusals and log lines), and the stop ends within it."""
    acl = tmp_path / "acl"
    acl.write_text("topic read #\n")  # nothing may be published
    os.chmod(acl, 0o644)
    # max_queued_messages 0 (the test broker's default) disconnects a refused client.
    extra = f"acl_file {acl}\nmax_queued_messages 1000000"
    broker = Mosquitto(str(tmp_path / "strict"), extra_config=extra).start()
    try:
        config = mqtt_agent_config(tmp_path, broker.port, sink='protocol = "5"', grace="4s")
        agent = agent_process(config).start()
        agent.wait_started()
        for i in range(50):
            (tmp_path / "inbox" / f"{i}.csv").write_text("1")
        agent.wait_log("Not authorized", timeout=15)
        before = len(agent.log().splitlines())
        started = time.monotonic()
        assert agent.terminate(timeout=15) == 0
        took = time.monotonic() - started
        lines = agent.log().splitlines()[before:]
        assert took < 4 + 3, f"the stop took {took:.1f}s with a 4s grace"
        assert len(lines) < 100, "\n".join(lines[:20])
        assert "events left queued for the next start" in lines[-1]
        assert agent.queued() > 0
    finally:
        broker.stop()
