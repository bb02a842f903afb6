"""The MQTT sink follows an MQTT 5 broker's advice: server moved / use another server
(only to a configured broker), server busy / quota exceeded (wait about reconnect_max).

Mosquitto never sends these, so a scripted MQTT 5 server answers the CONNECT
here; the broker the sink is sent to is a real Mosquitto.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading

import pytest

from edge_agent.errors import SinkUnavailable
from edge_agent.event import Event
from edge_agent.plugins.mqtt import MqttSink
from edge_agent.testing import Listener, free_port, plugin_config, queued_events, wait_for


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _properties(reference: str | None) -> bytes:
    body = b""
    if reference is not None:
        text = reference.encode()
        body = b"\x1c" + len(text).to_bytes(2, "big") + text
    return _varint(len(body)) + body


def connack(reason: int, reference: str | None = None) -> bytes:
    body = bytes((0, reason)) + _properties(reference)
    return b"\x20" + _varint(len(body)) + body


def disconnect(reason: int, reference: str | None = None) -> bytes:
    body = bytes((reason,)) + _properties(reference)
    return b"\xe0" + _varint(len(body)) + body


class ScriptedServer:
    """Answers the n-th thing a client sends (the CONNECT first) with ``replies[n]``, then
    keeps the connection open until the client closes it; counts connections."""

    def __init__(self, *replies: bytes) -> None:
        self.replies = replies
        self.port = free_port()
        self.connections = 0
        self.conns: list[socket.socket] = []
        self.listener = Listener(self.port, self._handle)

    def _handle(self, conn: socket.socket) -> None:
        self.connections += 1
        self.conns.append(conn)
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(10)
            for reply in self.replies:
                if not conn.recv(4096):  # a packet (small: one read)
                    return
                conn.sendall(reply)
            while conn.recv(4096):
                pass

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()


@pytest.fixture
def servers():
    made: list[ScriptedServer] = []

    def make(*replies: bytes) -> ScriptedServer:
        server = ScriptedServer(*replies)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def sink(hosts: list[str], **extra) -> MqttSink:
    config = {"hosts": hosts, "connect_timeout": "3s", "reconnect_max": "30s", **extra}
    return MqttSink(name="cloud", config=plugin_config(MqttSink, config, "cloud"), agent_id="gw")


def test_server_moved_goes_to_the_configured_broker_it_names(servers, running_broker, caplog):
    real = f"127.0.0.1:{running_broker.port}"
    moved = servers(connack(0x9D, real))
    skipped = servers(connack(0x00))
    mqtt = sink([f"127.0.0.1:{moved.port}", f"127.0.0.1:{skipped.port}", real])
    with caplog.at_level(logging.INFO):
        mqtt.open()
    try:
        assert mqtt.target == real
        assert skipped.connections == 0  # went straight where the broker said
        assert f"says server moved: trying {real} next" in caplog.text
    finally:
        mqtt.close()


def test_a_reference_to_a_broker_not_configured_is_not_followed(servers, caplog):
    elsewhere = servers(connack(0x00))
    moved = servers(connack(0x9C, f"127.0.0.1:{elsewhere.port}"))
    mqtt = sink([f"127.0.0.1:{moved.port}"])
    with pytest.raises(SinkUnavailable) as info:
        mqtt.open()
    assert not info.value.busy
    assert elsewhere.connections == 0
    assert "not among this sink's brokers" in caplog.text
    assert "add it to hosts" in caplog.text


@pytest.mark.parametrize("reason", [0x89, 0x97])
def test_server_busy_or_quota_exceeded_asks_for_a_long_wait(servers, reason, caplog):
    busy = servers(connack(reason))
    mqtt = sink([f"127.0.0.1:{busy.port}"])
    with pytest.raises(SinkUnavailable) as info:
        mqtt.open()
    assert info.value.busy
    assert "waiting about reconnect_max (30s)" in caplog.text


def test_a_disconnect_with_server_moved_sends_the_next_connect_there(
    servers, running_broker, caplog
):
    moving = servers(connack(0x00), disconnect(0x9C, f"localhost:{running_broker.port}"))
    # "localhost" is how the operator wrote it; the reference must name a configured broker.
    mqtt = sink([f"127.0.0.1:{moving.port}", f"localhost:{running_broker.port}"])
    caplog.set_level(logging.INFO)
    mqtt.open()
    try:
        assert mqtt.target == f"127.0.0.1:{moving.port}"

        def lost() -> bool:
            try:
                mqtt.check_connection()
            except SinkUnavailable:
                return True
            return False

        event = queued_events([Event(type="t.x", source="s", data=1)])[0]
        with pytest.raises(SinkUnavailable):  # the server answers it with DISCONNECT
            mqtt.publish([event])
        wait_for(lost, 10, "the connection to be known lost")
        mqtt.close()
        mqtt.open()
        assert mqtt.target == f"localhost:{running_broker.port}"
        assert moving.connections == 1
        assert "says use another server: trying localhost:" in caplog.text
    finally:
        mqtt.close()
