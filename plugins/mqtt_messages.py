"""The MQTT sink's configuration and how events become MQTT messages.

Kept apart from the connection handling in :mod:`edge_agent.plugins.mqtt` so that topic
templates, payload modes and batching can be read (and tested) on their own.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_agent import ByteSize, Duration, OptionError, QueuedEvent, option
from edge_agent.plugins.mqtt_commands import CommandsConfig
from edge_agent.units import split_host

if TYPE_CHECKING:
    # Imported by new_client() and connect(), when a client is made: the options and
    # the messages need neither, and `edge-agent check` and `plugins` start without them.
    import paho.mqtt.client as mqtt

TOPIC_FIELDS = ("agent", "source", "type", "subject")
#: The largest MQTT packet: a fixed header byte, 4 bytes of length, 268,435,455 bytes.
MQTT_MAX_PACKET = 1 + 4 + 268_435_455
#: The largest UTF-8 string MQTT carries (a topic, a property), in bytes.
MQTT_MAX_STRING = 65_535
# Control characters (C0, DEL, C1), and the wildcards: a topic may hold none of them.
_NOT_IN_TOPIC = re.compile(r"[\x00-\x1f\x7f-\x9f+#]")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_UNSAFE_IN_TOPIC = re.compile(r"[+#\x00]")
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"


@dataclass(kw_only=True)
class TlsConfig:
    """The ``tls`` table: TLS to the broker, the server's name always checked unless insecure."""

    ca_file: str = option(
        "", doc="CA certificate(s) to trust for the broker. Empty: the system's CAs."
    )
    cert_file: str = option("", doc="Client certificate, for mutual TLS.")
    key_file: str = option("", doc="Client private key, for mutual TLS.")
    insecure: bool = option(
        False, doc="Do not check the broker's host name against its certificate. Tests only."
    )

    def __post_init__(self) -> None:
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise OptionError(name, f"cannot read {path}; check the path and permissions")
            if path and not os.path.isfile(path):
                raise OptionError(name, f"{path} is not a regular file; give a PEM file")
        if bool(self.cert_file) != bool(self.key_file):
            missing = "key_file" if self.cert_file else "cert_file"
            raise OptionError(missing, "give cert_file and key_file together, for mutual TLS")


@dataclass(kw_only=True)
class MqttConnectionConfig:
    """The options of a connection to a broker, the same for the ``mqtt`` sink and source."""

    host: str = option("127.0.0.1", doc="Broker host name or address.")
    port: int = option(1883, min=1, max=65535, doc="Broker port.")
    hosts: list[str] = option(
        [], doc='Brokers tried in turn, "host:port" each; replaces host and port.'
    )
    transport: Literal["tcp", "websockets"] = option("tcp", doc='"tcp" or "websockets".')
    ws_path: str = option("/mqtt", doc="The URL path, with websockets.")
    tls: TlsConfig | None = option(
        None,
        example={"ca_file": "/etc/edge-agent/ca.pem"},
        doc="TLS settings; no table: plain TCP.",
    )
    protocol: Literal["3.1.1", "5"] = option(
        "5",
        doc='MQTT version: "5", or "3.1.1" for old brokers (which cannot report a'
        " refused message: it is acknowledged as if delivered).",
    )
    client_id: str = option("", doc="MQTT client id. Default: edge-agent-{agent}-{name}.")
    username: str = option("", doc="User name, if the broker wants one.")
    password: str = option("", secret=True, doc="Password; or password_file = PATH.")
    # At least 2: an idle connection is serviced about once a second, and the broker
    # drops a client silent for 1.5 keepalives.
    keepalive: int = option(
        30, off=0, min=2, max=65535, doc="Seconds between keepalive pings; 0: none."
    )
    connect_timeout: Duration = option(10.0, above=0, doc="How long a connection attempt may take.")
    reconnect_min: Duration = option(1.0, above=0, doc="Shortest wait between connection attempts.")
    reconnect_max: Duration = option(60.0, above=0, doc="Longest wait between connection attempts.")

    def __post_init__(self) -> None:
        for entry in self.hosts:
            split_host(entry, self.port)
        if self.reconnect_min > self.reconnect_max:
            raise ValueError(
                f"reconnect_min ({self.reconnect_min:g}s) is more than reconnect_max"
                f" ({self.reconnect_max:g}s)"
            )

    def brokers(self) -> list[tuple[str, int]]:
        """(host, port) of every broker, in the order they are tried."""
        if self.hosts:
            return [split_host(entry, self.port) for entry in self.hosts]
        return [(self.host, self.port)]


@dataclass(kw_only=True)
class MqttConfig(MqttConnectionConfig):
    """The ``[[sinks.mqtt]]`` table."""

    topic: str = option(
        "edge/{agent}/{source}/{type}",
        doc="Topic template: {agent}, {source}, {type}, {subject} and {data.FIELD}.",
    )
    qos: Literal[0, 1, 2] = option(
        1, doc="1 or 2: at least once, confirmed by the broker. 0: at most once."
    )
    retain: bool = option(False, doc="Publish events as retained messages.")
    payload: Literal["cloudevent", "data", "binary"] = option(
        "cloudevent",
        doc='"cloudevent": the whole envelope; "data": the data alone; "binary": the data,'
        " with the CloudEvents attributes as MQTT 5 user properties.",
    )
    batch_max_events: int = option(
        1,
        min=1,
        doc="Put up to this many events in one message (a JSON array); 1: one per message.",
    )
    batch_max_bytes: ByteSize = option(
        ByteSize(256 * 1024), min=1024, doc="Largest payload of a batched message."
    )
    clean_start: bool = option(True, doc="Start a new session; false keeps the broker's.")
    session_expiry: Duration = option(
        0.0,
        min=0,
        max=2**32 - 1,
        doc="How long the broker keeps the session after a disconnect (MQTT 5).",
    )
    message_expiry: Duration = option(
        0.0,
        min=0,
        max=2**32 - 1,
        doc="Brokers drop a message not delivered within this (MQTT 5); 0: never.",
    )
    max_inflight: int = option(
        100,
        min=1,
        max=65535,
        doc="Messages sent before their acknowledgements arrive. 1 keeps strict order. The"
        " broker's Receive Maximum (MQTT 5) lowers it.",
    )
    max_message_bytes: ByteSize = option(
        ByteSize(256 * 1024**2),
        min=1,
        max=MQTT_MAX_PACKET,
        doc="Largest payload sent; a larger event is set aside as a dead letter at once."
        " Set it to the broker's own limit (Mosquitto's message_size_limit, which it does"
        " not announce); the Maximum Packet Size an MQTT 5 broker announces applies too.",
    )
    ack_timeout: Duration = option(
        30.0, above=0, doc="How long to wait for acknowledgements before reconnecting."
    )
    status_topic: str = option(
        "",
        doc='Retained status topic, e.g. "edge/{agent}/status": the birth message on'
        " connect, the broker-side last will when the agent vanishes. Empty: none.",
    )
    reconnect_jitter: bool = option(
        True,
        doc="Draw each wait between connection attempts at random between 0 and its"
        " doubling ceiling, from the first retry on (full jitter); false: the ceiling"
        " itself (reconnect_min, twice that, ... up to reconnect_max), every time.",
    )
    first_connect_delay: Duration = option(
        0.0,
        min=0,
        doc='The first connection after start waits a random time up to this; "10s" spreads'
        " a fleet that starts at once (after a power cut). 0: connect at once.",
    )
    status_online: str = option("online", doc="Birth message.")
    status_offline: str = option("offline", doc="Last will, and the word left on a clean stop.")
    commands: CommandsConfig | None = option(
        None,
        example={"allow": ["ping", "status"]},
        doc="Remote commands (MQTT 5): answer allow-listed requests on edge/{agent}/cmd/+."
        " No table: off. See docs/commands.md.",
    )

    def __post_init__(self) -> None:
        for template in (self.topic, self.status_topic):
            unknown = [
                m.group(1)
                for m in _PLACEHOLDER.finditer(template)
                if m.group(1) not in TOPIC_FIELDS and not m.group(1).startswith("data.")
            ]
            if unknown:
                raise ValueError(
                    f"topic {template!r} uses unknown field(s) {', '.join(unknown)};"
                    " known: {agent}, {source}, {type}, {subject}, {data.FIELD}"
                )
        if not self.topic or _UNSAFE_IN_TOPIC.search(_PLACEHOLDER.sub("", self.topic)):
            raise ValueError(f"topic {self.topic!r} may not be empty or hold the wildcards + or #")
        if any(f in self.status_topic for f in ("{data.", "{source}", "{subject}")):
            raise ValueError("status_topic knows {agent} only")
        super().__post_init__()
        if self.payload == "binary" and (self.protocol != "5" or self.batch_max_events > 1):
            raise ValueError('payload = "binary" needs protocol = "5" and no batching')
        if self.commands is not None and self.protocol != "5":
            raise OptionError(
                "commands",
                'remote commands need protocol = "5": an MQTT 3.1.1 request carries no response'
                " topic or correlation data to answer with. Use MQTT 5, or remove the table",
            )


def new_client(
    config: MqttConnectionConfig,
    client_id: str,
    *,
    clean_start: bool,
    manual_ack: bool = False,
    client_class: type[mqtt.Client] | None = None,
) -> mqtt.Client:
    """A paho client (``client_class``, default paho's ``Client``) for ``config``: protocol,
    transport, TLS (the server's name checked unless ``tls.insecure``), user name and
    password, connect timeout; paho's own reconnect off."""
    import ssl

    import paho.mqtt.client as mqtt

    v5 = config.protocol == "5"
    client = (client_class or mqtt.Client)(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else clean_start,
        transport=config.transport,
        reconnect_on_failure=False,
        manual_ack=manual_ack,
    )
    if config.transport == "websockets":
        client.ws_set_options(path=config.ws_path)
    if config.tls is not None:
        tls = config.tls
        client.tls_set(
            ca_certs=tls.ca_file or None,
            certfile=tls.cert_file or None,
            keyfile=tls.key_file or None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        client.tls_insecure_set(tls.insecure)
    client.connect_timeout = config.connect_timeout
    if config.username:
        client.username_pw_set(config.username, config.password or None)
    return client


def connect(
    client: mqtt.Client,
    host: str,
    port: int,
    config: MqttConnectionConfig,
    *,
    clean_start: bool,
    properties: Any = None,
) -> str | None:
    """Open ``client``'s connection (CONNECT sent, not yet answered) with TCP_NODELAY on:
    None, or why it could not, in words for the operator (TLS problems explained)."""
    import ssl

    import paho.mqtt.client as mqtt

    from edge_agent.tls import describe_tls_error

    v5 = config.protocol == "5"
    try:
        client.connect(
            host,
            port,
            keepalive=config.keepalive,
            clean_start=clean_start if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
    except ssl.SSLError as exc:
        return describe_tls_error(exc, host)
    except (OSError, ValueError) as exc:
        return getattr(exc, "strerror", None) or str(exc)
    sock = client.socket()
    if isinstance(sock, socket.socket):
        # Small packets (PUBLISH, PUBACK) must not wait for Nagle's algorithm; paho leaves it on.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return None


def warn_if_insecure(config: MqttConnectionConfig, log: logging.Logger) -> None:
    """Log why ``tls.insecure = true`` is for tests only."""
    if config.tls is not None and config.tls.insecure:
        log.warning(
            "tls.insecure = true: the broker's certificate is not checked against its host"
            " name, so any server whose certificate a trusted CA signed can pose as %s. For"
            " tests only: give the broker a certificate for the name used here instead",
            ", ".join(f"{h}:{p}" for h, p in config.brokers()),
        )


def render_topic(template: str, event: QueuedEvent, data: Any = None) -> str:
    """Fill the template; wildcards and NUL in values become ``_``, a missing field ``_``.

    ``{subject}`` (a file's path, an MQTT source's topic) keeps its ``/`` as topic
    levels, so a bridge can keep a device's topic layout under a prefix.
    """

    def value(name: str) -> str:
        if name == "agent":
            return event.agent_id
        if name == "source":
            return event.source
        if name == "type":
            return event.type
        if name == "subject":
            return event.subject or "_"
        found: Any = data if data is not None else event.data
        for part in name[len("data.") :].split("."):
            found = found.get(part) if isinstance(found, dict) else None
        return "_" if found is None else str(found)

    return _PLACEHOLDER.sub(lambda m: _UNSAFE_IN_TOPIC.sub("_", value(m.group(1))) or "_", template)


class TopicCache:
    """Topics of templates without data fields or the subject depend only on (source, type):
    remember them."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.uses_data = "{data." in template or "{subject}" in template
        self._topics: dict[tuple[str, str, str], str] = {}

    def topic(self, event: QueuedEvent) -> str:
        if self.uses_data:
            return render_topic(self.template, event, event.data)
        key = (event.agent_id, event.source, event.type)
        topic = self._topics.get(key)
        if topic is None:
            if len(self._topics) > 10_000:  # a source inventing types without end
                self._topics.clear()
            topic = self._topics[key] = render_topic(self.template, event)
        return topic


class PackedProperties:
    """MQTT 5 PUBLISH properties, encoded once.

    paho-mqtt only calls ``pack()`` on the properties of a PUBLISH; its own
    ``Properties`` class spends about 75 µs a message validating and packing,
    as long as the rest of a publish. The encoding is the standard's:
    a variable byte integer length, then (identifier, value) pairs.
    """

    __slots__ = ("ContentType", "MessageExpiryInterval", "UserProperty", "_packed")

    def __init__(self, content_type: str, pairs: list[tuple[str, str]], expiry: float) -> None:
        self.ContentType = content_type
        self.UserProperty = pairs
        self.MessageExpiryInterval = int(expiry)
        body = bytearray(b"\x03" + _utf8(content_type))
        if self.MessageExpiryInterval:
            body += b"\x02" + self.MessageExpiryInterval.to_bytes(4, "big")
        for key, value in pairs:
            body += b"\x26" + _utf8(key) + _utf8(value)
        self._packed = _varint(len(body)) + bytes(body)

    def pack(self) -> bytes:
        return self._packed


def _utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(2, "big") + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@dataclass
class Message:
    """One MQTT message and the events it carries; ``problem`` says why it cannot be sent."""

    topic: str
    payload: bytes
    properties: PackedProperties | None
    events: list[QueuedEvent]
    problem: str | None = None

    def packet_size(self, qos: int) -> int:
        """Bytes of the PUBLISH packet that carries it."""
        remaining = 2 + len(self.topic.encode("utf-8")) + (2 if qos else 0) + len(self.payload)
        if self.properties is not None:
            remaining += len(self.properties.pack())
        return 1 + len(_varint(remaining)) + remaining


@functools.lru_cache(maxsize=4096)  # most events share a few topics: check each once
def topic_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be an MQTT topic name, or None if it can."""
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return f"the topic {topic[:200]!r} is not valid UTF-8 (a lone surrogate)"
    found = _NOT_IN_TOPIC.search(topic)
    if found:
        return (
            f"the topic {topic[:200]!r} holds {found.group(0)!r}, which MQTT forbids in a"
            " topic name (control characters, the wildcards + and #)"
        )
    if size > MQTT_MAX_STRING:
        return f"the topic is {size} bytes long; MQTT takes at most {MQTT_MAX_STRING}"
    if not size:
        return "the topic is empty"
    return None


def message_problem(message: Message, qos: int, max_payload: int, max_packet: int) -> str | None:
    """Why ``message`` cannot be sent (its topic, its size), or None if it can."""
    if message.problem:
        return message.problem
    problem = topic_problem(message.topic)
    if problem:
        return problem
    if len(message.payload) > max_payload:
        return (
            f"the message is {len(message.payload)} bytes, over max_message_bytes"
            f" ({max_payload} bytes)"
        )
    props = len(message.properties.pack()) if message.properties is not None else 0
    if len(message.payload) + 4 * len(message.topic) + props + 16 <= max_packet:
        return None  # fits whatever the topic's UTF-8 length: no need to count exactly
    size = message.packet_size(qos)
    if size > max_packet:
        return f"the message takes a {size}-byte packet; the broker takes at most {max_packet}"
    return None


def build_messages(
    config: MqttConfig,
    events: list[QueuedEvent],
    topics: TopicCache | None = None,
    max_packet: int = MQTT_MAX_PACKET,
) -> list[Message]:
    """Events in queue order → messages; consecutive events for one topic share a batch.

    A batch stays within ``batch_max_bytes``, ``max_message_bytes`` and
    ``max_packet`` (the broker's Maximum Packet Size). An event that cannot
    become a message (a property MQTT cannot carry) gets one with a ``problem``.
    """
    v5 = config.protocol == "5"
    topics = topics or TopicCache(config.topic)
    expiry = config.message_expiry
    messages: list[Message] = []
    if config.payload == "binary":
        for event in events:
            topic = topics.topic(event)
            try:
                attributes = event.attributes()
                content_type = attributes.pop("datacontenttype")
                props = PackedProperties(content_type, list(attributes.items()), expiry)
                payload = binary_payload(event)
            except (UnicodeEncodeError, OverflowError, ValueError) as exc:
                messages.append(Message(topic, b"", None, [event], _unpackable(exc)))
                continue
            messages.append(Message(topic, payload, props, [event]))
        return messages
    data_only = config.payload == "data"
    if config.batch_max_events == 1:
        content_type = "application/json" if data_only else STRUCTURED
        for event in events:
            topic = topics.topic(event)
            body = event.data_json if data_only else event.to_cloudevent_json()
            try:
                props = PackedProperties(content_type, [("id", event.id)], expiry) if v5 else None
                payload = body.encode("utf-8")
            except (UnicodeEncodeError, OverflowError) as exc:
                messages.append(Message(topic, b"", None, [event], _unpackable(exc)))
                continue
            messages.append(Message(topic, payload, props, [event]))
        return messages
    # Batches: runs of consecutive events for one topic, within the count and size limits.
    content_type = "application/json" if data_only else BATCH
    limit = min(config.batch_max_bytes, config.max_message_bytes)
    # (topic, events, bodies, payload bytes, bytes of the packet besides the payload)
    groups: list[tuple[str, list[QueuedEvent], list[bytes], int, int]] = []
    for event in events:
        topic = topics.topic(event)
        body = (event.data_json if data_only else event.to_cloudevent_json()).encode("utf-8")
        more = _id_property_bytes(event) if v5 else 0
        if groups:
            last_topic, members, bodies, size, overhead = groups[-1]
            if (
                last_topic == topic
                and len(members) < config.batch_max_events
                and size + len(body) + 1 <= limit
                and size + len(body) + 1 + overhead + more <= max_packet
            ):
                members.append(event)
                bodies.append(body)
                groups[-1] = (topic, members, bodies, size + len(body) + 1, overhead + more)
                continue
        overhead = _packet_overhead(topic, content_type, v5) + more
        groups.append((topic, [event], [body], len(body) + 2, overhead))
    for topic, members, bodies, _size, _overhead in groups:
        try:
            props = (
                PackedProperties(content_type, [("id", e.id) for e in members], expiry)
                if v5
                else None
            )
        except (UnicodeEncodeError, OverflowError) as exc:
            messages.append(Message(topic, b"", None, members, _unpackable(exc)))
            continue
        messages.append(Message(topic, b"[" + b",".join(bodies) + b"]", props, members))
    return messages


def _packet_overhead(topic: str, content_type: str, v5: bool) -> int:
    """At most how many bytes a batch's PUBLISH packet takes besides its payload and
    its events' ``id`` properties."""
    fixed = 1 + 4 + 2 + len(topic.encode("utf-8", "replace")) + 2
    return fixed + (4 + 3 + len(content_type) + 5 if v5 else 0)


def _id_property_bytes(event: QueuedEvent) -> int:
    """The ``id`` user property of one event in a batch: 0x26, two lengths, "id", the id."""
    return 7 + len(event.id)


def binary_payload(event: QueuedEvent) -> bytes:
    """The payload of an event in CloudEvents binary mode: the bytes of base64 data, the
    text of string data whose content type is not JSON, else the data as JSON."""
    if event.attributes_json is not None:
        if event.is_base64:
            return base64.b64decode(event.data)
        content_type = event.extra_attributes().get("datacontenttype", "application/json")
        data = event.data
        if isinstance(data, str) and "json" not in str(content_type):
            return data.encode("utf-8")
    return event.data_json.encode("utf-8")


def _unpackable(exc: Exception) -> str:
    if isinstance(exc, ValueError) and not isinstance(exc, UnicodeError):
        return f"its base64 data cannot be decoded: {exc}"
    if isinstance(exc, UnicodeEncodeError):
        return f"an MQTT property of it is not valid UTF-8: {exc.reason}"
    return f"an MQTT property of it is longer than MQTT takes ({MQTT_MAX_STRING} bytes)"
