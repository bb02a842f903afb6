"""The mqtt source, with real Mosquitto brokers and the agent as a real process."""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import sqlite3
import textwrap
import threading

import paho.mqtt.client as mqtt
import pytest
from conftest import run_cli
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.testing import CuttableProxy, Mosquitto, Subscriber, wait_for


class Publisher:
    """A QoS 1 publisher (MQTT 5) that waits for every PUBACK."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, topic: str, payload, *, retain: bool = False, user: list | None = None):
        props = None
        if user:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = user
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=props)
        return info

    def send_all(self, messages: list[tuple[str, object]]) -> None:
        infos = [self.send(topic, payload) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(running_broker):
    pub = Publisher(running_broker.port)
    yield pub
    pub.close()


def config(
    tmp_path,
    port: int,
    agent_id: str,
    source: str = "",
    sink_port: int = 0,
    queue: str = "",
    sink: str = "",
) -> str:
    """An agent whose mqtt source reads ``devices/#`` and whose sink writes ``edge/...``."""
    return textwrap.dedent(
        f"""
        [agent]
        id = "{agent_id}"
        state_dir = "{tmp_path / "state"}"
        shutdown_grace = "2s"
        {queue}

        [[sources.mqtt]]
        name = "local"
        port = {port}
        reconnect_min = "0.05s"
        reconnect_max = "0.5s"
        {source or 'topics = ["devices/#"]'}

        [[sinks.mqtt]]
        name = "up"
        port = {sink_port or port}
        reconnect_min = "0.05s"
        reconnect_max = "0.5s"
        {sink}
        """
    )


def forwarded(subscriber: Subscriber, agent_id: str) -> list[dict]:
    return [m.json() for m in list(subscriber.messages) if m.topic.startswith(f"edge/{agent_id}/")]


def test_json_text_binary_and_cloudevents_become_events(
    tmp_path, running_broker, agent_process, subscriber, publisher
):
    agent = agent_process(config(tmp_path, running_broker.port, "gw-kinds"))
    agent.start()
    agent.wait_started()
    cloudevent = {
        "specversion": "1.0",
        "id": "sensor-42-0001",
        "source": "urn:plant:sensor:42",
        "type": "com.example.reading",
        "time": "2026-11-26T23:59:01Z",
        "subject": "boiler",
        "sequence": "17",
        "plant": "north",
        "data": {"celsius": 71.5},
    }
    publisher.send_all(
        [
            ("devices/a/json", json.dumps({"t": 21.5})),
            ("devices/a/pretty", json.dumps({"t": [1, 2], "u": "x"}, indent=2)),
            ("devices/a/text", "hello, world"),
            ("devices/a/bin", b"\x00\xff\x10binary"),
            ("devices/a/ce", json.dumps(cloudevent)),
            ("devices/a/surrogate", '{"s": "\\ud800"}'),  # valid UTF-8, no valid JSON value
            ("devices/a/huge", '{"t": 1e400}'),  # past a float: JSON has no infinity
            ("devices/a/ce-tab", json.dumps({**cloudevent, "id": "a\tb", "subject": None})),
        ]
    )
    binary_mode = [
        ("ce_specversion", "1.0"),
        ("ce_id", "binary-7"),
        ("ce_source", "urn:plc:7"),
        ("ce_type", "com.example.state"),
        ("line", "3"),
    ]
    publisher.send("devices/a/ce-binary", b'{"on":true}', user=binary_mode).wait_for_publish(10)
    wait_for(lambda: len(forwarded(subscriber, "gw-kinds")) >= 9, 15, "nine events")
    by_subject = {e["subject"]: e for e in forwarded(subscriber, "gw-kinds")}
    plain = by_subject["devices/a/json"]
    assert plain["type"] == "mqtt.message" and plain["data"] == {"t": 21.5}
    assert plain["source"] == "edge-agent://gw-kinds/local"
    # JSON over several lines is queued on one (stdout and the tap print an event a line)
    assert by_subject["devices/a/pretty"]["data"] == {"t": [1, 2], "u": "x"}
    pretty = next(m for m in list(subscriber.messages) if b"devices/a/pretty" in m.payload)
    assert b"\n" not in pretty.payload
    assert by_subject["devices/a/text"]["data"] == "hello, world"
    assert by_subject["devices/a/text"]["datacontenttype"].startswith("text/plain")
    raw = by_subject["devices/a/bin"]
    assert base64.b64decode(raw["data_base64"]) == b"\x00\xff\x10binary" and "data" not in raw
    kept = by_subject["boiler"]  # a CloudEvent keeps its subject, id, source, type, time
    assert kept["id"] == "sensor-42-0001" and kept["source"] == "urn:plant:sensor:42"
    assert kept["type"] == "com.example.reading" and kept["data"] == {"celsius": 71.5}
    assert kept["time"] == "2026-11-26T23:59:01.000000Z" and kept["plant"] == "north"
    assert kept["agentsource"] == "edge-agent://gw-kinds/local"
    assert kept["originsequence"] == "17" and kept["sequence"].isdigit()
    binary = next(e for e in by_subject.values() if e["id"] == "binary-7")
    assert binary["source"] == "urn:plc:7"
    assert json.loads(binary["mqttuserproperties"]) == [["line", "3"]]
    assert binary["data"] == {"on": True} and binary["subject"] == "devices/a/ce-binary"
    assert by_subject["devices/a/surrogate"]["data"] == '{"s": "\\ud800"}'  # kept as text
    assert by_subject["devices/a/huge"]["data"] == '{"t": 1e400}'  # so is this
    tab = by_subject["devices/a/ce-tab"]  # an id no broker takes: a plain message
    assert tab["type"] == "mqtt.message" and tab["data"]["id"] == "a\tb"


def test_a_processor_sees_and_changes_the_data_of_json_messages(
    tmp_path, running_broker, agent_process, subscriber, publisher
):
    # The payload's JSON text is queued as it came only when no processor ran: enrich
    # changes the data in place, and the change must reach the broker.
    processors = '[[processors]]\ntype = "enrich"\nfields = { site = "north" }\n'
    agent = agent_process(config(tmp_path, running_broker.port, "gw-enrich") + processors)
    agent.start()
    agent.wait_started()
    publisher.send_all([("devices/b/json", '{"t": 21.5}')])
    wait_for(lambda: forwarded(subscriber, "gw-enrich"), 15, "the enriched event")
    assert forwarded(subscriber, "gw-enrich")[0]["data"] == {"t": 21.5, "site": "north"}


def test_messages_before_during_and_after_a_sigkill_all_arrive(
    tmp_path, running_broker, agent_process, subscriber, publisher
):
    agent = agent_process(config(tmp_path, running_broker.port, "gw-kill"))
    agent.start()
    agent.wait_started()
    total = 0

    def send(count: int) -> None:
        nonlocal total
        publisher.send_all([("devices/k", json.dumps({"n": total + i})) for i in range(count)])
        total += count

    send(200)
    wait_for(lambda: forwarded(subscriber, "gw-kill"), 10, "the first events")
    sender = threading.Thread(target=send, args=(400,))
    sender.start()
    agent.kill()  # in the middle of the stream
    sender.join(30)
    send(100)  # while the agent is down: the broker's session keeps them
    agent.start()
    agent.wait_started()
    send(100)
    wait_for(
        lambda: {e["data"]["n"] for e in forwarded(subscriber, "gw-kill")} == set(range(total)),
        30,
        f"all {total} messages at the sink's broker",
    )
    ids = collections.defaultdict(set)
    for event in forwarded(subscriber, "gw-kill"):
        ids[event["data"]["n"]].add(event["id"])
    assert all(len(found) == 1 for found in ids.values()), "a duplicate with a new id"


def queued_rows(agent) -> list[tuple[str, str]]:
    """(event id, data) of every event in the agent's queue file, in order."""
    with contextlib.closing(sqlite3.connect(agent.state_dir / "queue.db", timeout=5)) as conn:
        return conn.execute("SELECT id, data FROM events ORDER BY rowid").fetchall()


def test_a_kill_between_commit_and_acknowledgement_queues_nothing_twice(
    tmp_path, running_broker, agent_process, publisher
):
    """The broker never gets the acknowledgements of committed messages (the agent dies
    first): it sends them again, and the source recognises every one of them."""
    proxy = CuttableProxy(running_broker.port).start()
    upstream = Mosquitto(str(tmp_path / "upstream"))  # not started: events stay queued
    agent = agent_process(config(tmp_path, proxy.port, "gw-redeliver", sink_port=upstream.port))
    try:
        agent.start()
        agent.wait_ready()
        proxy.stall_to_upstream()  # from now on the broker hears nothing from the agent
        publisher.send_all([("devices/r", json.dumps({"n": i})) for i in range(50)])
        # Committed: in the queue file. Acknowledged: never, as far as the broker knows.
        wait_for(lambda: agent.queued() >= 10, 15, "committed messages in the queue")
        committed = queued_rows(agent)
        agent.kill()
        proxy.cut()  # the held acknowledgements die with the connection
        proxy.restore()
        proxy.resume()
        agent.start()
        agent.wait_ready()
        wait_for(lambda: agent.queued() >= 50, 20, "all 50 messages in the queue")

        def redelivered() -> int:
            result = run_cli("status", "-c", str(agent.config_path), "--json")
            source = json.loads(result.stdout)["status"]["sources"]["local"]
            return source.get("counters", {}).get("redelivered", 0)

        wait_for(lambda: redelivered() > 0, 10, "redelivered messages counted")
        rows = queued_rows(agent)
        payloads = [json.loads(data)["n"] for _id, data in rows]
        assert sorted(payloads) == list(range(50)), "each message queued exactly once"
        assert len({event_id for event_id, _ in rows}) == len(rows)
        assert rows[: len(committed)] == committed, "the first commit kept as it was"
        assert redelivered() >= len(committed) > 0
    finally:
        proxy.stop()


def test_a_full_blocking_queue_stops_acknowledging_and_resumes(
    tmp_path, running_broker, agent_process, publisher
):
    upstream = Mosquitto(str(tmp_path / "upstream"))  # not started: the sink waits
    agent = agent_process(
        config(
            tmp_path,
            running_broker.port,
            "gw-block",
            sink_port=upstream.port,
            queue='[queue]\nmax_events = 20\nwhen_full = "block"',
        )
    )
    agent.start()
    agent.wait_ready()
    publisher.send_all([("devices/b", json.dumps({"n": i})) for i in range(60)])

    def counters() -> dict:
        result = run_cli("status", "-c", str(agent.config_path), "--json")
        return json.loads(result.stdout)["status"]["sources"]["local"].get("counters", {})

    wait_for(lambda: agent.queued() >= 20, 15, "a full queue")
    # Received, but not all acknowledged: the rest waits at the broker.
    wait_for(lambda: counters().get("messages", 0) >= 20, 15, "messages received")
    assert counters().get("acked", 0) < 60 and agent.queued() <= 20
    upstream.start()
    try:
        with Subscriber(upstream.port, "edge/#") as sub:
            wait_for(
                lambda: {m.json()["data"]["n"] for m in sub.messages} >= set(range(60)),
                30,
                "all 60 messages upstream once room was made",
            )
    finally:
        upstream.stop()
    wait_for(lambda: counters().get("acked", 0) == 60, 15, "all 60 acknowledged")


def test_retained_messages_are_skipped_or_kept(
    tmp_path, running_broker, agent_process, subscriber, publisher
):
    publisher.send("devices/retained/r1", "old state", retain=True).wait_for_publish(10)
    source = """topics = ["devices/retained/#"]
        retained = "skip"

        [[sources.mqtt]]
        name = "keeper"
        port = {port}
        topics = ["devices/retained/#"]
        retained = "keep"
        """.replace("{port}", str(running_broker.port))
    agent = agent_process(config(tmp_path, running_broker.port, "gw-ret", source=source))
    agent.start()
    agent.wait_started()
    publisher.send("devices/retained/r2", "live").wait_for_publish(10)
    wait_for(lambda: len(forwarded(subscriber, "gw-ret")) >= 3, 15, "three events")
    events = forwarded(subscriber, "gw-ret")
    kept = [e for e in events if e["source"].endswith("/keeper")]
    skipping = [e for e in events if e["source"].endswith("/local")]
    assert sorted(e["data"] for e in kept) == ["live", "old state"]
    assert [e.get("mqttretain") for e in kept if e["data"] == "old state"] == [True]
    assert [e["data"] for e in skipping] == ["live"]
    publisher.send("devices/retained/r1", "", retain=True).wait_for_publish(10)  # clear it


@pytest.mark.parametrize("payload", ["cloudevent", "binary"])
def test_no_loop_when_source_and_sink_share_a_broker(
    tmp_path, running_broker, agent_process, subscriber, publisher, payload
):
    # The source reads everything, the sink's own output (edge/...) included; in binary
    # mode the sink's CloudEvents attributes are user properties named as the attributes.
    agent = agent_process(
        config(
            tmp_path,
            running_broker.port,
            f"gw-loop-{payload}",
            source='topics = ["#"]',
            sink=f'payload = "{payload}"',
        )
    )
    agent.start()
    agent.wait_started()
    publisher.send("sensors/loop", json.dumps({"v": 1})).wait_for_publish(10)
    wait_for(lambda: forwarded(subscriber, f"gw-loop-{payload}"), 10, "the event upstream")

    def skipped() -> int:
        result = run_cli("status", "-c", str(agent.config_path), "--json")
        counters = json.loads(result.stdout)["status"]["sources"]["local"].get("counters", {})
        return counters.get("own_skipped", 0)

    wait_for(lambda: skipped() >= 1, 10, "its own message skipped")
    publisher.send("sensors/loop", json.dumps({"v": 2})).wait_for_publish(10)
    wait_for(lambda: skipped() >= 2, 10, "the second one skipped too")
    sent = forwarded(subscriber, f"gw-loop-{payload}")
    if payload == "cloudevent":
        sent = [e["data"] for e in sent]
    assert sent == [{"v": 1}, {"v": 2}]


def test_a_shared_subscription_splits_the_stream(
    tmp_path, running_broker, agent_process, subscriber, publisher
):
    source = """topics = ["$share/gateways/devices/shared/#"]

        [[sources.mqtt]]
        name = "other"
        port = {port}
        topics = ["$share/gateways/devices/shared/#"]
        """.replace("{port}", str(running_broker.port))
    agent = agent_process(config(tmp_path, running_broker.port, "gw-share", source=source))
    agent.start()
    agent.wait_started()
    publisher.send_all([("devices/shared/x", json.dumps({"n": i})) for i in range(100)])
    wait_for(lambda: len(forwarded(subscriber, "gw-share")) >= 100, 15, "100 events")
    events = forwarded(subscriber, "gw-share")
    assert sorted(e["data"]["n"] for e in events) == list(range(100))  # each once in total
    assert {e["source"].rsplit("/", 1)[1] for e in events} == {"local", "other"}


def test_the_source_reconnects_and_resubscribes_after_a_broker_restart(
    tmp_path, running_broker, agent_process, subscriber, publisher
):
    agent = agent_process(config(tmp_path, running_broker.port, "gw-restart"))
    agent.start()
    agent.wait_started()
    publisher.send("devices/r", json.dumps({"n": 1})).wait_for_publish(10)
    wait_for(lambda: forwarded(subscriber, "gw-restart"), 10, "the first event")
    publisher.close()
    running_broker.stop()
    running_broker.start()
    agent.wait_log("session resumed", timeout=20)
    publisher.__init__(running_broker.port)
    publisher.send("devices/r", json.dumps({"n": 2})).wait_for_publish(10)
    wait_for(lambda: len(forwarded(subscriber, "gw-restart")) >= 2, 20, "the second event")


@pytest.mark.parametrize(
    ("topics", "expected"),
    [
        ('["sensors/#/x"]', "# must be a whole level and the last one"),
        ('[{filter = "plc/+/state", qos = 3}]', "qos 3 is out of range"),
        ('["$share//sensors/#"]', "names no group"),
        ('["$share/group"]', "names no group"),
        ('["a/b+"]', "+ must be a whole level"),
        ("[]", "give at least one topic filter"),
    ],
)
def test_bad_topic_filters_are_reported_by_check(tmp_path, topics, expected):
    path = tmp_path / "agent.toml"
    path.write_text(
        f'[agent]\nid = "gw"\nstate_dir = "{tmp_path}"\n\n'
        f"[[sources.mqtt]]\ntopics = {topics}\n\n[[sinks.stdout]]\n"
    )
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 78, result.stdout + result.stderr
    assert expected in result.stdout + result.stderr
    assert "sources.mqtt" in result.stdout + result.stderr
