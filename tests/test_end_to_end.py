"""The walking skeleton end to end: files → queue → real Mosquitto → real subscriber."""

from __future__ import annotations

import os
import uuid

import pytest
from conftest import created_paths, first_deliveries, make_files, mqtt_agent_config

from edge_agent.testing import wait_for

pytestmark = pytest.mark.timeout(120)


def test_created_files_arrive_as_cloudevents(tmp_path, subscriber, running_broker, agent_process):
    agent = agent_process(mqtt_agent_config(tmp_path, running_broker.port)).start()
    agent.wait_started()
    paths = make_files(tmp_path / "inbox", 3)

    wait_for(lambda: len(created_paths(subscriber.events())) == 3, 15, "3 file.created events")
    created = [m for m in subscriber.messages if m.json()["type"] == "file.created"]
    assert {m.topic for m in created} == {"edge/test-gw/inbox/file.created"}
    for message, path in zip(created, paths, strict=True):
        event = message.json()
        assert event["specversion"] == "1.0"
        assert uuid.UUID(event["id"]).version == 7
        assert event["source"] == "edge-agent://test-gw/inbox"
        assert event["time"].endswith("Z")
        assert event["subject"] == path
        assert event["data"]["path"] == path
        assert event["datacontenttype"] == "application/json"
    # The writer finished each file, so each also gets file.closed with its size.
    wait_for(
        lambda: sum(e["type"] == "file.closed" for e in subscriber.events()) == 3, 10, "closed"
    )
    closed = [e for e in subscriber.events() if e["type"] == "file.closed"]
    assert all(e["data"]["size"] == len("row 0\n") for e in closed)
    # Sequence numbers count per source, in the order events were accepted.
    sequences = [int(e["sequence"]) for e in subscriber.events()]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    assert agent.terminate() == 0


def test_backlog_while_broker_is_down_arrives_in_order(
    tmp_path, subscriber, running_broker, agent_process
):
    agent = agent_process(mqtt_agent_config(tmp_path, running_broker.port)).start()
    agent.wait_started()
    running_broker.stop()
    agent.wait_log("Offline", timeout=15)
    agent.wait_ready()  # the file source watches: files made now are seen

    paths = make_files(tmp_path / "inbox", 500)
    wait_for(lambda: agent.queued() >= 1000, 30, "1000 events (created + closed) queued")

    running_broker.start()
    wait_for(lambda: len(set(created_paths(subscriber.events()))) == 500, 60, "all 500 files")

    firsts = first_deliveries(subscriber.events())
    assert set(created_paths(firsts)) == set(paths)
    sequences = [int(e["sequence"]) for e in firsts]
    assert sequences == sorted(sequences), "first deliveries must keep the accepted order"
    assert "sending" in agent.log() and "waiting events in order" in agent.log()
    assert agent.terminate() == 0


def test_sigkill_with_backlog_loses_nothing(tmp_path, subscriber, running_broker, agent_process):
    agent = agent_process(mqtt_agent_config(tmp_path, running_broker.port)).start()
    agent.wait_started()
    running_broker.stop()
    agent.wait_log("Offline", timeout=15)
    agent.wait_ready()  # the file source watches: files made now are seen
    paths = make_files(tmp_path / "inbox", 300)
    wait_for(lambda: agent.queued() >= 600, 30, "600 events queued")
    agent.kill()

    running_broker.start()
    agent.start()
    wait_for(lambda: len(set(created_paths(subscriber.events()))) == 300, 60, "all 300 files")
    events = subscriber.events()
    assert set(created_paths(events)) == set(paths)
    # A duplicate is possible after a kill; it must carry the same id and sequence.
    by_id: dict[str, dict] = {}
    for event in events:
        assert by_id.setdefault(event["id"], event) == event
    wait_for(lambda: agent.queued() == 0, 15, "the queue to empty once everything is confirmed")
    assert agent.terminate() == 0


def test_offline_at_start_says_so_once_and_buffers(tmp_path, agent_process):
    from edge_agent.testing import free_port

    agent = agent_process(mqtt_agent_config(tmp_path, free_port())).start()
    agent.wait_log("Offline", timeout=15)
    agent.wait_ready()  # the file source watches: files made now are seen
    make_files(tmp_path / "inbox", 5)
    wait_for(lambda: agent.queued() == 10, 15, "10 events queued")
    assert agent.process is not None and agent.process.poll() is None, "the agent keeps running"
    log = agent.log()
    assert log.count("Offline") == 1, log
    assert "cannot reach 127.0.0.1:" in log and "events are kept on disk" in log
    assert agent.terminate() == 0


def test_sigterm_commits_and_exits_zero_within_grace(tmp_path, running_broker, agent_process):
    agent = agent_process(mqtt_agent_config(tmp_path, running_broker.port, grace="2s")).start()
    agent.wait_started()
    running_broker.stop()
    agent.wait_log("Offline", timeout=15)
    agent.wait_ready()  # the file source watches: files made now are seen
    make_files(tmp_path / "inbox", 50)
    wait_for(lambda: agent.queued() == 100, 15, "100 events queued")

    import time

    started = time.monotonic()
    assert agent.terminate() == 0
    assert time.monotonic() - started < 2 + 5
    assert "stopped" in agent.log()
    assert agent.queued() == 100, "what was accepted is still on disk after the stop"


def test_bad_inputs_are_reported_and_the_rest_keeps_running(
    tmp_path, subscriber, running_broker, agent_process
):
    missing = tmp_path / "not-there-yet"
    config = mqtt_agent_config(tmp_path, running_broker.port).replace(
        f'paths = ["{tmp_path / "inbox"}"]',
        f'paths = ["{tmp_path / "inbox"}", "{missing}"]\n        retry_missing = "0.2s"',
    )
    agent = agent_process(config).start()
    agent.wait_log(f"cannot watch {missing}: no such file or folder")
    agent.wait_started()

    # A name that is not UTF-8 is sent with replacement characters and the raw bytes.
    raw_name = os.fsencode(str(tmp_path / "inbox")) + b"/bad-\xff-name.txt"
    with open(raw_name, "wb") as handle:
        handle.write(b"x")
    wait_for(lambda: created_paths(subscriber.events()), 15, "the odd file's event")
    event = next(e for e in subscriber.events() if e["type"] == "file.created")
    assert event["data"]["path"].endswith("bad-\ufffd-name.txt")
    import base64

    assert base64.b64decode(event["data"]["path_base64"]) == raw_name
    agent.wait_log("not valid UTF-8")

    # The missing folder is watched once it appears.
    missing.mkdir()
    agent.wait_log(f"watching {missing} now")
    (missing / "late.csv").write_text("x")
    wait_for(
        lambda: str(missing / "late.csv") in created_paths(subscriber.events()), 15, "late.csv"
    )
    assert agent.terminate() == 0
