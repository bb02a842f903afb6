"""paho clients for the ``mqtt`` source and sink: buffered reads, lean decoding, fewer writes.

paho-mqtt reads each packet with about four ``recv()`` calls (command byte,
each byte of the length, the body), goes back to ``select()`` after every
packet when no QoS 2 messages are in flight, builds an ``MQTTMessage`` (with
a ``threading.Condition`` inside) and a ``Properties`` object (a dozen dicts
and lists) for every message it receives, a ``ReasonCode`` and a
``Properties`` for every PUBACK, and writes every packet with a ``send()`` of
its own. At thousands of messages a second that was most of the agent's CPU,
and every call that releases the GIL made the agent's other threads wait
their turn.

Both clients keep paho for everything but the hot path:

- :meth:`BufferedClient.loop_read` receives up to 64 KiB at once into a
  buffer and handles every complete packet in it. A partial packet stays in
  the buffer; its rest is still in the kernel (or, with TLS, in the SSL
  object, which paho's loop and the sink ask with ``pending()``), so the
  next ``select()``/``poll()`` wakes up for it: no byte waits in the buffer
  unseen. Packets without a fast path go to paho's own handler, unchanged.
- :class:`InboundClient` (the source): a QoS 0 or 1 PUBLISH becomes a
  :class:`Received` (MQTT 5 properties parsed only when the message has
  some); all that arrived in one read are handed to ``on_messages`` in one
  call, in the order received. :meth:`InboundClient.ack_many` queues the
  PUBACKs of many messages as one write, with one wake-up of the network
  thread instead of one per message.
- :class:`OutboundClient` (the sink): :meth:`OutboundClient.publish_qos1`
  builds a QoS 1 PUBLISH itself, without paho's ``MQTTMessage``,
  ``MQTTMessageInfo`` (a ``Condition`` each) and outgoing store, and its
  PUBACK goes to ``on_publish`` with its reason code as paho would pass it. A
  PUBACK with success (no reason code, 0x00, or 0x10 "no matching
  subscribers") and no properties goes straight to ``on_publish`` (with one
  shared ``ReasonCode`` per code); between :meth:`OutboundClient.cork` and
  :meth:`OutboundClient.uncork` packets are queued, then written together.

paho-mqtt is pinned to 2.x (``paho-mqtt>=2,<3``); tests/test_mqtt_clients.py
checks these clients against the installed paho.
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
from paho.mqtt.reasoncodes import ReasonCode

PUBLISH = 0x30
PUBACK = 0x40
DISCONNECT = 0xE0
#: Largest write made of queued packets joined together.
JOIN_BYTES = 256 * 1024
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


class BufferedClient(mqtt.Client):
    """A paho ``Client`` whose :meth:`loop_read` reads in bulk (see the module docstring).

    Subclasses handle some packets themselves in :meth:`_fast_packet`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = bytearray()
        self._rbuf_sock: Any = None
        self._v5 = self._protocol == MQTTProtocolVersion.MQTTv5

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
            except OSError as err:  # ConnectionError too
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
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
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
                rc = self._fast_packet(header, body)
                if rc is None:
                    self._before_paho()
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
            self._after_read()
        return rc

    def _fast_packet(self, header: int, body: bytes) -> MQTTErrorCode | None:
        """Handle a packet without paho, or return None to leave it to paho."""
        return None

    def _before_paho(self) -> None:
        """Called before paho handles a packet (deliver what came before it first)."""

    def _after_read(self) -> None:
        """Called once the packets of a read are handled."""


class InboundClient(BufferedClient):
    """The source's client: messages in batches, acknowledgements in one write.

    Set :attr:`on_messages` to a callable taking a list of :class:`Received`;
    it runs in the network thread (hand the list over and return). QoS 2
    messages still arrive through paho's ``on_message``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_messages: Callable[[list[Received]], None] | None = None
        self._batch: list[Received] = []

    def ack_many(self, mids: Iterable[int]) -> MQTTErrorCode:
        """Queue a PUBACK (success) for each QoS 1 message id, in order, as one write."""
        packet = b"".join(bytes((PUBACK, 2, mid >> 8, mid & 0xFF)) for mid in mids)
        if not packet:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._packet_queue(PUBACK, packet, 0, 0)

    def _fast_packet(self, header: int, body: bytes) -> MQTTErrorCode | None:
        qos = (header >> 1) & 0x03
        if header & 0xF0 != PUBLISH or qos == 2:
            return None
        self._batch.append(_decode_publish(header, qos, body, self._v5))
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _before_paho(self) -> None:
        self._deliver()

    def _after_read(self) -> None:
        self._deliver()

    def _deliver(self) -> None:
        batch = self._batch
        if not batch:
            return
        self._batch = []
        handler = self.on_messages
        if handler is None:
            return
        try:
            handler(batch)
        except Exception as err:  # an exception here would end paho's thread
            self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_messages: %s", err)
            if not self.suppress_exceptions:
                raise


#: What a PUBACK without reason code or properties means; shared, never changed.
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)
#: PUBACK reason codes of success the sink's client handles itself; shared, never changed.
_SUCCESS = {0x00: _PUBACK_SUCCESS, 0x10: ReasonCode(PacketTypes.PUBACK, identifier=0x10)}


class OutboundClient(BufferedClient):
    """The sink's client: a thread of its own is never started; the owner drives the
    socket (``loop_read``/``loop_write``), and may queue many packets for one write.

    :meth:`publish_qos1` sends a QoS 1 message without paho's bookkeeping (an
    ``MQTTMessage``, an ``MQTTMessageInfo`` with its ``Condition``, its
    outgoing store): the owner keeps its own and resends from disk, never
    through paho. Its PUBACK still ends in ``on_publish``, with the reason code.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._corked = False
        #: Packet ids of messages sent with publish_qos1 and not yet acknowledged.
        self._own_mids: set[int] = set()

    def cork(self) -> None:
        """Queue packets from now on instead of writing each at once."""
        self._corked = True

    def uncork(self) -> MQTTErrorCode:
        """Write what was queued since :meth:`cork` (as few ``send()`` calls as the socket
        takes; the rest when it is writable again, see ``want_write()``)."""
        self._corked = False
        if not self._out_packet or self._sock is None:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self.loop_write()

    def publish_qos1(
        self, topic: bytes, payload: bytes, retain: bool, properties: bytes | None
    ) -> tuple[MQTTErrorCode, int]:
        """Queue a QoS 1 PUBLISH; (rc, packet id). ``topic`` must be a valid topic name
        (UTF-8, no wildcards) and ``properties`` packed MQTT 5 properties (None: none);
        the caller checks both, and the size, before. Not sent again by paho, ever."""
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN, 0
        mid = self._mid_generate()
        props = (properties or b"\x00") if self._v5 else b""
        remaining = 4 + len(topic) + len(props) + len(payload)
        packet = b"".join(
            (
                bytes((PUBLISH | 0x02 | (0x01 if retain else 0),)),
                _varint(remaining),
                len(topic).to_bytes(2, "big"),
                topic,
                mid.to_bytes(2, "big"),
                props,
                payload,
            )
        )
        self._own_mids.add(mid)
        return self._packet_queue(PUBLISH | 0x02, packet, mid, 1), mid

    def _packet_queue(
        self,
        command: int,
        packet: bytes | bytearray,
        mid: int,
        qos: int,
        info: mqtt.MQTTMessageInfo | None = None,
    ) -> MQTTErrorCode:
        if not self._corked:
            return super()._packet_queue(command, packet, mid, qos, info)
        self._out_packet.append(
            {
                "command": command,
                "mid": mid,
                "qos": qos,
                "pos": 0,
                "to_process": len(packet),
                "packet": packet,
                "info": info,
            }
        )
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_write(self) -> MQTTErrorCode:
        """paho's, after joining the queued packets that need nothing done once written
        (all but QoS 0 PUBLISH and DISCONNECT) into one."""
        out = self._out_packet
        if len(out) > 1 and _plain(out[0]) and _plain(out[1]):
            parts = []
            size = 0
            while out and _plain(out[0]) and size < JOIN_BYTES:
                packet = out.popleft()
                part = packet["packet"][packet["pos"] :]
                parts.append(part)
                size += len(part)
            joined = b"".join(parts)
            out.appendleft(
                {
                    "command": PUBACK,  # nothing is done once it is written
                    "mid": 0,
                    "qos": 1,
                    "pos": 0,
                    "to_process": len(joined),
                    "packet": joined,
                    "info": None,
                }
            )
        return super()._packet_write()

    def _fast_packet(self, header: int, body: bytes) -> MQTTErrorCode | None:
        if header != PUBACK:
            return None
        size = len(body)
        if size < 2:
            return None  # malformed: paho says so
        mid = (body[0] << 8) | body[1]
        success = size == 2 or (
            self._v5 and (size == 3 or (size == 4 and body[3] == 0)) and body[2] in _SUCCESS
        )
        if mid in self._own_mids:
            if success:
                reason = _SUCCESS[body[2]] if size > 2 else _PUBACK_SUCCESS
                properties = _NO_PROPERTIES
            else:
                try:
                    reason, properties = _puback_reason(body)
                except (ValueError, KeyError, IndexError, MalformedPacket):
                    # paho too ends the connection over a reason code MQTT 5 does not
                    # allow in a PUBACK (Mosquitto 2.0 sends 0x95 for a message over
                    # its message_size_limit).
                    return MQTTErrorCode.MQTT_ERR_PROTOCOL
            self._own_mids.discard(mid)
            return self._own_on_publish(mid, reason, properties)
        if not success:
            return None  # a refusal, or properties: paho's own handler
        # MQTT 5, success with a reason code and no properties: 0x10 "no matching
        # subscribers" is what a broker says to every message nobody subscribed to.
        reason = _SUCCESS[body[2]] if size > 2 else _PUBACK_SUCCESS
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, reason, _NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _own_on_publish(
        self, mid: int, reason: ReasonCode, properties: Properties
    ) -> MQTTErrorCode:
        """``on_publish`` for a message of :meth:`publish_qos1`, as paho calls it."""
        on_publish = self.on_publish
        if on_publish is not None:
            with self._in_callback_mutex:
                try:
                    on_publish(self, self._userdata, mid, reason, properties)
                except Exception as err:  # as paho: logged, and raised unless suppressed
                    self._easy_log(mqtt.MQTT_LOG_ERR, "Caught exception in on_publish: %s", err)
                    if not self.suppress_exceptions:
                        raise
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def _puback_reason(body: bytes) -> tuple[ReasonCode, Properties]:
    """The reason code and properties of an MQTT 5 PUBACK's body (raises if malformed)."""
    reason = ReasonCode(PacketTypes.PUBACK)
    reason.unpack(body[2:3])
    properties = Properties(PacketTypes.PUBACK)
    if len(body) > 3:
        properties.unpack(body[3:])
    return reason, properties


def _varint(value: int) -> bytes:
    """MQTT's variable byte integer (a packet's remaining length)."""
    out = bytearray()
    while True:
        value, byte = divmod(value, 128)
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _plain(packet: dict[str, Any]) -> bool:
    """True if paho does nothing once this queued packet is written."""
    command = packet["command"] & 0xF0
    if command == PUBLISH:
        return packet["qos"] > 0
    return command != DISCONNECT


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
