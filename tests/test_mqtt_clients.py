"""The source's and the sink's paho clients (plugins/mqtt_clients.py) against a real broker:
what they read in bulk arrives whole and in order, batched PUBACKs reach the broker, and
corked publishes are all written and confirmed."""

from __future__ import annotations

import select
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent.plugins.mqtt_clients import InboundClient, OutboundClient, Received
from edge_agent.plugins.mqtt_redelivery import RedeliveryLog
from edge_agent.testing import wait_for


def inbound(port: int, client_id: str, collected: list[Received]) -> InboundClient:
    """A persistent-session InboundClient subscribed to ``t/#`` at QoS 1 (manual acks)."""
    client = InboundClient(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=True,
    )
    subscribed = threading.Event()
    lock = threading.Lock()

    def take(batch: list[Received]) -> None:
        with lock:
            collected.extend(batch)

    client.on_messages = take
    client.on_subscribe = lambda *args: subscribed.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    client.connect("127.0.0.1", port, clean_start=False, properties=props)
    client.loop_start()
    client.subscribe([("t/#", SubscribeOptions(qos=1))])
    assert subscribed.wait(10), "no SUBACK"
    return client


def publisher(port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.max_inflight_messages_set(200)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def test_bulk_reads_deliver_every_message_whole_and_in_order(running_broker):
    collected: list[Received] = []
    client_id = f"in-{uuid.uuid4().hex[:8]}"
    reader = inbound(running_broker.port, client_id, collected)
    pub = publisher(running_broker.port)
    try:
        sent = []
        for n in range(1500):
            # Large ones span several 64 KiB reads; small ones share a read.
            payload = (b"%d:" % n) + b"x" * (150_000 if n % 500 == 7 else n % 90)
            props = None
            if n % 3 == 0:
                props = Properties(PacketTypes.PUBLISH)
                props.ContentType = "text/plain"
                props.UserProperty = [("n", str(n))]
            sent.append((f"t/{n % 4}", payload, n % 3 == 0))
            pub.publish(f"t/{n % 4}", payload, qos=1, properties=props)
        acked = 0

        def ack_what_came() -> bool:  # as the source does: the broker sends 20 at a time
            nonlocal acked
            came = list(collected)
            if len(came) > acked:
                assert reader.ack_many([m.mid for m in came[acked:]]) == 0
                acked = len(came)
            return acked >= 1500

        wait_for(ack_what_came, 30, "1,500 messages")
        got = [(m.topic, m.payload, m.properties is not None) for m in collected]
        assert got == sent
        for message in collected:
            assert message.qos == 1 and not message.dup and not message.retain
            if message.properties is not None:
                assert message.properties.ContentType == "text/plain"
                n = message.payload.split(b":")[0].decode()
                assert message.properties.UserProperty == [("n", n)]
        # Reconnect with the same session after a clean disconnect (written after the
        # acknowledgements): nothing may come again.
        wait_for(lambda: not reader.want_write(), 10, "the acknowledgements written")
        reader.disconnect()
        wait_for(lambda: reader.socket() is None, 10, "the DISCONNECT written")
        reader.loop_stop()
        again: list[Received] = []
        reader = inbound(running_broker.port, client_id, again)
        pub.publish("t/marker", b"marker", qos=1).wait_for_publish(10)
        wait_for(lambda: again, 10, "the marker")
        assert [m.payload for m in again] == [b"marker"], "acknowledged messages sent again"
    finally:
        reader.disconnect()
        reader.loop_stop()
        pub.disconnect()
        pub.loop_stop()


@pytest.mark.parametrize("own", [False, True], ids=["paho-publish", "publish_qos1"])
@pytest.mark.parametrize("protocol", [MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311])
def test_corked_publishes_are_written_together_and_all_confirmed(running_broker, protocol, own):
    received: list[bytes] = []
    counter = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    ready = threading.Event()
    counter.on_subscribe = lambda *args: ready.set()
    counter.on_message = lambda client, userdata, message: received.append(message.payload)
    counter.connect("127.0.0.1", running_broker.port)
    counter.loop_start()
    counter.subscribe("out/#", qos=1)
    assert ready.wait(10)
    sink = OutboundClient(CallbackAPIVersion.VERSION2, protocol=protocol)
    sink.max_inflight_messages_set(0)
    acks: list[tuple[int, bool]] = []
    sink.on_publish = lambda client, userdata, mid, rc, props: acks.append((mid, rc.is_failure))
    connected = threading.Event()
    sink.on_connect = lambda *args: connected.set()

    def service(seconds: float) -> None:
        sock = sink.socket()
        readable, writable, _ = select.select(
            [sock], [sock] if sink.want_write() else [], [], seconds
        )
        if readable:
            assert sink.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        if writable:
            assert sink.loop_write() == MQTTErrorCode.MQTT_ERR_SUCCESS
        sink.loop_misc()

    try:
        sink.connect("127.0.0.1", running_broker.port)
        wait_for(lambda: service(0.1) or connected.is_set(), 10, "CONNACK")
        payloads = [b"m%04d" % n for n in range(500)]
        sink.cork()
        if own:  # the sink's own QoS 1 path, without paho's bookkeeping
            sent = [sink.publish_qos1(b"out/x", p, False, None) for p in payloads]
            assert {rc for rc, _ in sent} == {MQTTErrorCode.MQTT_ERR_SUCCESS}
            mids = [mid for _, mid in sent]
        else:
            mids = [sink.publish("out/x", p, qos=1).mid for p in payloads]
        assert acks == [] and sink.want_write()  # queued, not written yet
        assert sink.uncork() == MQTTErrorCode.MQTT_ERR_SUCCESS
        wait_for(lambda: service(0.1) or len(acks) >= 500, 20, "500 acknowledgements")
        assert sorted(mid for mid, _ in acks) == sorted(mids)
        assert not any(failed for _, failed in acks)
        wait_for(lambda: len(received) >= 500, 10, "500 messages at the subscriber")
        assert received == payloads
    finally:
        sink.disconnect()
        counter.disconnect()
        counter.loop_stop()


@pytest.mark.parametrize("own", [False, True], ids=["paho-publish", "publish_qos1"])
def test_pubacks_saying_no_matching_subscribers_confirm_the_messages(running_broker, own):
    """MQTT 5: a broker acknowledges a message nobody subscribed to with reason 0x10, a
    success the sink's client handles itself; a refusal still goes through paho."""
    sink = OutboundClient(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    sink.max_inflight_messages_set(0)
    acks: list[tuple[int, int, bool]] = []
    sink.on_publish = lambda client, userdata, mid, rc, props: acks.append(
        (mid, rc.value, rc.is_failure)
    )
    connected = threading.Event()
    sink.on_connect = lambda *args: connected.set()

    def service(seconds: float) -> None:
        sock = sink.socket()
        readable, writable, _ = select.select(
            [sock], [sock] if sink.want_write() else [], [], seconds
        )
        if readable:
            assert sink.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        if writable:
            assert sink.loop_write() == MQTTErrorCode.MQTT_ERR_SUCCESS
        sink.loop_misc()

    try:
        sink.connect("127.0.0.1", running_broker.port)
        wait_for(lambda: service(0.1) or connected.is_set(), 10, "CONNACK")
        sink.cork()
        topics = [f"nobody/{uuid.uuid4().hex}" for _ in range(50)]
        if own:
            mids = [sink.publish_qos1(t.encode(), b"x", False, None)[1] for t in topics]
        else:
            mids = [sink.publish(t, b"x", qos=1).mid for t in topics]
        sink.uncork()
        wait_for(lambda: service(0.1) or len(acks) >= 50, 20, "50 acknowledgements")
        assert sorted(mid for mid, _, _ in acks) == sorted(mids)
        assert {(value, failed) for _, value, failed in acks} == {(0x10, False)}
    finally:
        sink.disconnect()


def _commit(log: RedeliveryLog, messages: list[tuple[int, str, bool]]) -> tuple[list, dict]:
    """One commit of (packet id, digest, dup) messages: (those already committed, rows)."""
    again = []
    for mid, message_digest, dup in messages:
        if log.seen(mid, message_digest, dup):
            again.append(mid)
        else:
            log.keep(mid, message_digest)
    rows = log.checkpoint()
    log.committed()
    return again, rows


def test_packet_ids_are_kept_until_the_broker_must_have_their_acknowledgements():
    saved: dict[str, str] = {}

    def commit(log: RedeliveryLog, messages) -> list:
        again, rows = _commit(log, messages)
        for key, value in rows.items():
            if value is None:
                saved.pop(key, None)
            else:
                saved[key] = value
        return again

    log = RedeliveryLog()
    log.new_connection(receive_maximum=4)
    commit(log, [(1, "a", False), (2, "b", False)])
    commit(log, [(3, "c", False)])
    assert set(log.entries) == {1, 2, 3}, "written acknowledgements prove nothing"
    commit(log, [(4, "d", False), (5, "e", False), (6, "f", False)])
    # 6 messages with at most 4 unacknowledged: the broker had the acks of 1 and 2.
    assert set(log.entries) == {3, 4, 5, 6}
    commit(log, [(3, "z", False)])  # id 3 used again: its old message was acknowledged
    assert log.entries[3][0] == "z"

    # A restart: a new log reads what was saved; the broker re-sends 4-6 and then 7.
    log = RedeliveryLog()
    log.load(dict(saved))
    assert set(log.entries) == {3, 4, 5, 6}
    log.new_connection(receive_maximum=None)
    again = commit(log, [(4, "d", True), (5, "other", True), (6, "f", True)])
    assert again == [4, 6], "5 came with other content: it was never committed"
    commit(log, [(7, "g", False)])  # the first new one: 3 did not come back, so it is done
    assert set(log.entries) == {4, 5, 6, 7}, "those sent again stay until acknowledged"
    assert all(key.startswith("u") for key in saved)


def test_ids_saved_one_key_each_by_version_0_1_are_read_and_saved_again_as_a_row():
    log = RedeliveryLog()
    log.load({"m12": "abcd 0190-id", "m13": "ef01 0190-id2", "offset": "7"})
    assert log.entries == {12: ("abcd", 1), 13: ("ef01", 1)}
    log.new_connection(receive_maximum=100)
    again, rows = _commit(log, [(12, "abcd", True)])
    assert again == [12]
    assert rows["m12"] is None and rows["m13"] is None and "offset" not in rows
    assert rows["u1"] == "12:abcd 13:ef01 12:abcd"
