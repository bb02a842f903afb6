"""The MQTT sink's own packed PUBLISH properties (plugins/mqtt_messages.PackedProperties)
are what paho-mqtt decodes: byte for byte through paho's decoder, and end to end through
paho's ``publish()``, a real Mosquitto and a paho MQTT 5 subscriber.

The sink hands paho this object where ``publish()`` is typed ``Properties``; a paho
release that checks the type, or packs it differently, fails here rather than on a device.
"""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent import Event
from edge_agent.plugins.mqtt_messages import MqttConfig, PackedProperties, build_messages
from edge_agent.schema import build
from edge_agent.testing import Subscriber, queued_events, wait_for

pytestmark = pytest.mark.timeout(60)

CASES = [
    ("application/json", [("id", "0191-abc")], 3600),
    ("application/cloudevents+json", [], 0),  # no expiry: the property is left out
    ("text/plain; charset=utf-8", [("subject", "Zürich/°C"), ("emoji", "🌡️")], 1),
    ("application/json", [("k", "v"), ("k", "w")], 2**32 - 1),  # repeated keys keep order
    ("application/json", [(f"key{i}", "x" * 40) for i in range(400)], 60),  # 3-byte length
]


@pytest.mark.parametrize(("content_type", "pairs", "expiry"), CASES)
def test_paho_decodes_what_the_sink_packs(content_type, pairs, expiry):
    packed = PackedProperties(content_type, pairs, expiry).pack()
    decoded, length = Properties(PacketTypes.PUBLISH).unpack(packed)
    assert length == len(packed), "paho read exactly the bytes we wrote"
    assert decoded.ContentType == content_type
    assert getattr(decoded, "UserProperty", []) == pairs
    assert getattr(decoded, "MessageExpiryInterval", 0) == expiry
    # paho's own encoding of the same properties decodes to the same thing.
    theirs = Properties(PacketTypes.PUBLISH)
    theirs.ContentType = content_type
    if expiry:
        theirs.MessageExpiryInterval = expiry
    if pairs:
        theirs.UserProperty = pairs
    assert len(theirs.pack()) == len(packed)


def sink_config(**table) -> MqttConfig:
    problems: list[tuple[str, str]] = []
    config = build(MqttConfig, {"protocol": "5", **table}, "sinks.mqtt", problems)
    assert not problems, problems
    return config


def publish_all(port: int, messages) -> None:
    """Publish as the sink does: paho's ``publish()`` with our properties object."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = []
        for message in messages:
            assert message.problem is None, message.problem
            info = client.publish(
                message.topic, message.payload, qos=1, properties=message.properties
            )
            assert info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
            infos.append(info)
        wait_for(lambda: all(i.is_published() for i in infos), 10, "PUBACKs from the broker")
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("payload", ["binary", "cloudevent"])
def test_a_paho_subscriber_receives_the_packed_properties(broker, payload):
    events = queued_events(
        [
            Event(
                type="thermal.reading",
                source="thermal",
                subject="zone/Zürich °C",
                data={"celsius": 21.5, "note": "ünïcödé"},
            ),
            Event(type="file.created", source="inbox", data={"n": 2}),
        ],
        agent_id="gw-01",
    )
    config = sink_config(payload=payload, message_expiry="1h", topic="props/{type}")
    messages = build_messages(config, events)
    assert [type(m.properties) for m in messages] == [PackedProperties] * 2
    with Subscriber(broker.port, "props/#", protocol="5") as sub:
        sent = time.monotonic()
        publish_all(broker.port, messages)
        wait_for(lambda: len(sub.messages) == 2, 10, "both messages at the subscriber")
        elapsed = time.monotonic() - sent
    by_topic = {m.topic: m for m in sub.messages}
    for message, event in zip(messages, events, strict=True):
        got = by_topic[message.topic].properties
        assert got.ContentType == message.properties.ContentType
        assert got.UserProperty == message.properties.UserProperty
        # The broker counts the expiry down while it holds the message.
        assert 3600 - elapsed - 1 <= got.MessageExpiryInterval <= 3600
        assert by_topic[message.topic].payload == message.payload
        if payload == "binary":
            attributes = dict(got.UserProperty)
            assert attributes["id"] == event.id
            assert attributes["source"] == f"edge-agent://gw-01/{event.source}"
            assert attributes["type"] == event.type
            assert got.ContentType == "application/json"
        else:
            assert got.UserProperty == [("id", event.id)]
            assert got.ContentType == "application/cloudevents+json"
    if payload == "binary":  # non-ASCII text survives the round trip
        thermal = dict(by_topic["props/thermal.reading"].properties.UserProperty)
        assert thermal["subject"] == "zone/Zürich °C"
