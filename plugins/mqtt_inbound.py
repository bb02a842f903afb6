"""The ``mqtt`` source's paho client: buffered reads, lean PUBLISH decoding, batched PUBACKs.

paho-mqtt reads each packet with about four ``recv()`` calls (command byte,
each byte of the length, the body), goes back to ``select()`` after every
packet when no QoS 2 messages are in flight, and builds an ``MQTTMessage``
(with a ``threading.Condition`` inside) and a ``Properties`` object (a dozen
dicts and lists) for every message it receives. At thousands of messages a
second that was most of the source's network thread, and every call that
releases the GIL made the agent's other threads wait their turn.

:class:`InboundClient` keeps paho for everything but the hot path:

- :meth:`InboundClient.loop_read` receives up to 64 KiB at once into a
  buffer and handles every complete packet in it. A partial packet stays in
  the buffer; its rest is still in the kernel (or, with TLS, in the SSL
  object, which paho's loop asks with ``pending()``), so ``select()`` wakes
  up for it: no byte waits in the buffer unseen.
- A QoS 0 or 1 PUBLISH becomes a :class:`Received` (MQTT 5 properties are
  parsed only when the message has some); all that arrived in one read are
  handed to ``on_messages`` in one call, in the order received. Every other
  packet (CONNACK, SUBACK, PINGRESP, DISCONNECT, QoS 2 flows) goes to paho's
  own handler, unchanged.
- :meth:`InboundClient.ack_many` queues the PUBACKs of many messages as one
  write, with one wake-up of the network thread instead of one per message.

paho-mqtt is pinned to 2.x (``paho-mqtt>=2,<3``); tests/test_mqtt_inbound.py
checks the private parts used here (``_packet_queue``, ``_packet_handle``,
``_in_packet``, ``_sock_recv``) against the installed paho.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

PUBLISH = 0x30
PUBACK = 0x40
#: Bytes asked of the socket per ``recv()``.
READ_SIZE = 65536
#: Reads per ``loop_read()`` call at most, so the network thread also gets to write.
READS_PER_LOOP = 16


class Received:
    """A message as the source needs it: what ``MQTTMessage`` holds, without its lock."""

    __slots__ = ("_topic", "dup", "mid", "payload", "properties", "qos", "retain")

    def __init__(
        self,
        topic: bytes,
        payload: bytes,
        qos: int,
        mid: int,
        dup: bool,
        retain: bool,
        properties: Properties | None,
    ) -> None:
        self._topic = topic
        self.payload = payload
        self.qos = qos
        self.mid = mid
        self.dup = dup
        self.retain = retain
        self.properties = properties

    @property
    def topic(self) -> str:
        """The topic; UnicodeDecodeError if it is not UTF-8 (as ``MQTTMessage.topic``)."""
        return self._topic.decode("utf-8")

    @property
    def topic_bytes(self) -> bytes:
        return self._topic


def _fresh_in_packet(command: int = 0, body: bytes = b"") -> dict[str, Any]:
    """paho's ``_in_packet`` for a whole packet already read (or an empty one)."""
    return {
        "command": command,
        "have_remaining": 1 if command else 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": len(body),
        "packet": bytearray(body),
        "to_process": 0,
        "pos": 0,
    }


class InboundClient(mqtt.Client):
    """A paho ``Client`` that reads in bulk and hands messages over in batches.

    Set :attr:`on_messages` to a callable taking a list of :class:`Received`;
    it runs in the network thread (hand the list over and return). QoS 2
    messages still arrive through paho's ``on_message``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_messages: Callable[[list[Received]], None] | None = None
        self._rbuf = bytearray()
        self._rbuf_sock: Any = None
        self._v5 = self._protocol == MQTTProtocolVersion.MQTTv5

    def ack_many(self, mids: Iterable[int]) -> MQTTErrorCode:
        """Queue a PUBACK (success) for each QoS 1 message id, in order, as one write."""
        packet = b"".join(bytes((PUBACK, 2, mid >> 8, mid & 0xFF)) for mid in mids)
        if not packet:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._packet_queue(PUBACK, packet, 0, 0)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """Read what the socket has (up to ``READS_PER_LOOP`` reads) and handle every
        complete packet; ``max_packets`` is ignored."""
        sock = self._sock
        if sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        if sock is not self._rbuf_sock:  # a new connection: nothing of the old one is kept
            self._rbuf = bytearray()
            self._rbuf_sock = sock
        got = False
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        for _ in range(READS_PER_LOOP):
            try:
                data = self._sock_recv(READ_SIZE)
            except BlockingIOError:
                break
            except (ConnectionError, OSError) as err:
                self._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                rc = MQTTErrorCode.MQTT_ERR_CONN_LOST
                break
            if not data:
                rc = MQTTErrorCode.MQTT_ERR_CONN_LOST
                break
            got = True
            self._rbuf += data
            rc = self._handle_buffer()
            if rc or self._sock is None or len(data) < READ_SIZE:
                break
        if got:
            with self._msgtime_mutex:
                self._last_bytes_received = time.monotonic()
        if rc:
            return self._loop_rc_handle(rc)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_buffer(self) -> MQTTErrorCode:
        """Handle every complete packet in the buffer; keep the rest of a partial one."""
        buf = self._rbuf
        end = len(buf)
        pos = 0
        batch: list[Received] = []
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        v5 = self._v5
        try:
            while end - pos >= 2:
                header = buf[pos]
                length = 0
                shift = 0
                index = pos + 1
                complete = False
                while index < end:
                    byte = buf[index]
                    index += 1
                    length |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        complete = True
                        break
                    shift += 7
                    if shift >= 28:  # more than 4 bytes of length: not MQTT
                        return MQTTErrorCode.MQTT_ERR_PROTOCOL
                if not complete or end - index < length:
                    break  # the rest of this packet is still to come
                body = bytes(buf[index : index + length])
                pos = index + length
                qos = (header >> 1) & 0x03
                if header & 0xF0 == PUBLISH and qos < 2:
                    batch.append(_decode_publish(header, qos, body, v5))
                    continue
                if batch:  # in order: what came before this packet first
                    self._deliver(batch)
                    batch = []
                self._in_packet = _fresh_in_packet(header, body)
                try:
                    rc = self._packet_handle()
                except MalformedPacket:
                    rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
                finally:
                    self._in_packet = _fresh_in_packet()
                if rc or self._sock is None:
                    break
        except (IndexError, ValueError, struct.error, MQTTException) as exc:
            self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        finally:
            del buf[:pos]
            if batch:
                self._deliver(batch)
        return rc

    def _deliver(self, batch: list[Received]) -> None:
        handler = self.on_messages
        if handler is None:
            return
        try:
            handler(batch)
        except Exception as err:  # an exception here would end paho's thread
            self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_messages: %s", err)
            if not self.suppress_exceptions:
                raise


def _decode_publish(header: int, qos: int, body: bytes, v5: bool) -> Received:
    """A QoS 0/1 PUBLISH packet's body (after the fixed header) → :class:`Received`."""
    topic_length = (body[0] << 8) | body[1]
    position = 2 + topic_length
    if position > len(body):
        raise MalformedPacket("the topic is longer than the packet")
    topic = body[2:position]
    if not v5 and not topic:
        raise MalformedPacket("topic can't be empty in MQTTv3")
    mid = 0
    if qos:
        mid = (body[position] << 8) | body[position + 1]
        position += 2
    properties = None
    if v5:
        if body[position] == 0:  # no properties: the usual case, and cheap
            position += 1
        else:
            properties = Properties(PacketTypes.PUBLISH)
            _props, used = properties.unpack(body[position:])
            position += used
    return Received(
        topic,
        body[position:],
        qos,
        mid,
        bool(header & 0x08),
        bool(header & 0x01),
        properties,
    )
