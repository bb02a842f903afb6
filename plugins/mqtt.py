"""The ``mqtt`` sink: events to an MQTT broker, confirmed by the broker's acknowledgement.

Delivery is confirmed only in paho's ``on_publish`` callback with a success
reason code (a PUBACK for QoS 1, PUBCOMP for QoS 2), never because
``publish()`` returned: ``is_published()`` and ``wait_for_publish()`` misreport
across reconnects. Each connection uses a fresh paho client with automatic
reconnect off, so paho never re-sends on its own; the forwarder re-sends
unconfirmed events from disk, in order, after it reconnects.
"""

from __future__ import annotations

import contextlib
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import Duration, QueuedEvent, Sink, SinkUnavailable, hookimpl, option

TOPIC_FIELDS = ("agent", "source", "type")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_UNSAFE_IN_TOPIC = re.compile(r"[+#\x00]")


def render_topic(template: str, event: QueuedEvent) -> str:
    """Fill ``{agent}``, ``{source}`` and ``{type}``; wildcards and NUL become ``_``."""
    values = {"agent": event.agent_id, "source": event.source, "type": event.type}
    return _PLACEHOLDER.sub(lambda m: _UNSAFE_IN_TOPIC.sub("_", values[m.group(1)]), template)


class MqttSink(Sink):
    """Publishes each event as a CloudEvents JSON message."""

    @dataclass(kw_only=True)
    class Config:
        host: str = option("127.0.0.1", doc="Broker host name or address.")
        port: int = option(1883, doc="Broker port.")
        topic: str = option(
            "edge/{agent}/{source}/{type}",
            doc="Topic template; knows {agent}, {source} and {type}.",
        )
        qos: Literal[0, 1, 2] = option(
            1, doc="1 or 2: at least once, confirmed by the broker. 0: at most once."
        )
        protocol: Literal["3.1.1", "5"] = option(
            "5",
            doc='MQTT version: "5", or "3.1.1" for old brokers (which cannot report a'
            " refused message: it is acknowledged as if delivered).",
        )
        client_id: str = option("", doc="MQTT client id. Default: edge-agent-{agent}-{name}.")
        username: str = option("", doc="User name, if the broker wants one.")
        password: str = option("", secret=True, doc="Password; or password_file = PATH.")
        keepalive: int = option(30, doc="Seconds between keepalive pings.")
        max_inflight: int = option(
            100, doc="Messages sent before their acknowledgements arrive. 1 keeps strict order."
        )
        connect_timeout: Duration = option(10.0, doc="How long a connection attempt may take.")
        ack_timeout: Duration = option(
            30.0, doc="How long to wait for acknowledgements before reconnecting."
        )
        reconnect_min: Duration = option(1.0, doc="Shortest wait between connection attempts.")
        reconnect_max: Duration = option(60.0, doc="Longest wait between connection attempts.")

        def __post_init__(self) -> None:
            unknown = [
                m.group(1)
                for m in _PLACEHOLDER.finditer(self.topic)
                if m.group(1) not in TOPIC_FIELDS
            ]
            if unknown:
                raise ValueError(
                    f"topic {self.topic!r} uses unknown field(s) {', '.join(unknown)};"
                    f" known: {', '.join('{' + f + '}' for f in TOPIC_FIELDS)}"
                )
            if _UNSAFE_IN_TOPIC.search(_PLACEHOLDER.sub("", self.topic)) or not self.topic:
                raise ValueError(
                    f"topic {self.topic!r} may not be empty or hold the wildcards + or #"
                )
            if not 1 <= self.port <= 65535:
                raise ValueError(f"port must be 1 to 65535, got {self.port}")
            if self.max_inflight < 1 or self.keepalive < 0:
                raise ValueError("max_inflight must be at least 1 and keepalive 0 or more")
            for name in ("connect_timeout", "ack_timeout", "reconnect_min", "reconnect_max"):
                if getattr(self, name) <= 0:
                    raise ValueError(f"{name} must be more than 0")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        config = self.config
        if config.qos == 2 and config.protocol == "5":
            self.log.warning(
                "qos 2 with MQTT 5: a refusal in PUBREC cannot be seen by the MQTT library, so"
                " a refused message may count as delivered; use qos 1 where refusals matter"
            )
        self.max_batch = max(1, config.max_inflight)
        self.retry_min = config.reconnect_min
        self.retry_max = config.reconnect_max
        self._client: mqtt.Client | None = None
        self._connack: queue.SimpleQueue = queue.SimpleQueue()
        self._acks: queue.SimpleQueue = queue.SimpleQueue()
        self._connected = threading.Event()
        self._disconnect_reason: str | None = None
        self._inflight: dict[int, QueuedEvent] = {}  # queue position -> event, this connection
        self._mids: dict[int, int] = {}  # paho message id -> queue position
        #: Messages the broker refused (a reason code of 0x80 or above), since start.
        self.refused = 0

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    # -- paho callbacks: network thread; no I/O, no exceptions -------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        # Set here, in the network thread, so a disconnect right after CONNACK
        # (handled after this in the same thread) always leaves it cleared.
        if not reason_code.is_failure:
            self._connected.set()
        self._connack.put((reason_code, properties))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._disconnect_reason = str(reason_code)
        self._connected.clear()
        self._acks.put(None)  # wake a waiting publish()
        self._connack.put(None)  # and a waiting open()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acks.put((mid, reason_code))

    # -- the sink ------------------------------------------------------------

    def open(self) -> None:
        config = self.config
        v5 = config.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id or f"edge-agent-{self.agent_id}-{self.name}",
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(self.max_batch)
        client.max_queued_messages_set(0)
        client.connect_timeout = config.connect_timeout
        if config.username:
            client.username_pw_set(config.username, config.password or None)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._connack = queue.SimpleQueue()
        self._acks = queue.SimpleQueue()
        self._connected.clear()
        self._disconnect_reason = None
        self._inflight = {}
        self._mids = {}
        self._client = client
        try:
            client.connect(config.host, config.port, keepalive=config.keepalive)
        except (OSError, ValueError) as exc:
            raise SinkUnavailable(getattr(exc, "strerror", None) or str(exc)) from None
        sock = client.socket()
        if isinstance(sock, socket.socket):
            # Small PUBLISH packets must not wait for Nagle's algorithm; paho leaves it on.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.loop_start()
        deadline = time.monotonic() + config.connect_timeout
        answer = None
        while answer is None and not self.stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                raise SinkUnavailable(
                    f"the broker accepted the TCP connection but sent no CONNACK within"
                    f" {config.connect_timeout:g}s"
                )
            try:
                answer = self._connack.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if answer is None:
                raise SinkUnavailable(
                    "the broker closed the connection before answering"
                    f" ({self._disconnect_reason or 'no reason given'})"
                )
        if answer is None:
            raise SinkUnavailable("stopping")
        reason_code, properties = answer
        if reason_code.is_failure:
            raise SinkUnavailable(f"the broker refused the connection: {reason_code}")
        window = self.config.max_inflight
        receive_maximum = getattr(properties, "ReceiveMaximum", None) if v5 else None
        if receive_maximum:
            window = min(window, receive_maximum)  # paho ignores the broker's limit
        self.max_batch = max(1, window)
        if not self._connected.is_set():
            raise SinkUnavailable(
                f"connection lost right after CONNACK ({self._disconnect_reason})"
            )

    def publish(self, events: list[QueuedEvent]) -> list[QueuedEvent]:
        """Keep up to ``max_inflight`` messages in flight; return those acknowledged so far.

        A sliding window: events already in flight on this connection are not
        sent again, new ones fill the free places, and the call returns as
        soon as acknowledgements arrive (waiting at most ``ack_timeout`` for
        the first). Waiting for a whole batch instead would leave the line idle
        while the last acknowledgements trickle in.
        """
        client = self._client
        if client is None or not self._connected.is_set():
            raise SinkUnavailable(f"not connected ({self._disconnect_reason or 'no connection'})")
        config = self.config
        properties = None
        for event in events:
            if event.position in self._inflight:
                continue
            if len(self._inflight) >= self.max_batch:
                break
            if config.protocol == "5":
                properties = Properties(PacketTypes.PUBLISH)
                properties.ContentType = "application/cloudevents+json"
                properties.UserProperty = [("id", event.id)]
            info = client.publish(
                render_topic(config.topic, event),
                event.to_cloudevent_json().encode("utf-8"),
                qos=config.qos,
                properties=properties,
            )
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                if not self._inflight:
                    raise SinkUnavailable(f"connection lost ({self._disconnect_reason})")
                break  # nothing more can go out; what went out may still be acked
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise SinkUnavailable(f"publish failed: {mqtt.error_string(info.rc)}")
            self._inflight[event.position] = event
            self._mids[info.mid] = event.position
        return self._collect_acks()

    def _collect_acks(self) -> list[QueuedEvent]:
        """Wait for the first acknowledgement (up to ack_timeout), then take all that came."""
        confirmed: list[QueuedEvent] = []
        refused: list[str] = []
        deadline = time.monotonic() + self.config.ack_timeout
        block = True
        while self._inflight and not self.stopping.is_set():
            try:
                if block:
                    item = self._acks.get(timeout=max(0.0, min(deadline - time.monotonic(), 0.5)))
                else:
                    item = self._acks.get_nowait()
            except queue.Empty:
                if not block or time.monotonic() >= deadline:
                    break
                continue
            if item is None:
                if not self._connected.is_set():
                    break
                continue
            mid, reason_code = item
            event = self._inflight.pop(self._mids.pop(mid, -1), None)
            if event is None:
                continue
            block = False  # got one: now take whatever else is already there
            if reason_code.is_failure:
                refused.append(f"{event.id}: {reason_code}")
            else:
                confirmed.append(event)
        if refused:
            self.refused += len(refused)
            self.log.warning(
                "broker refused %d events (%d since start); they stay queued and are sent"
                " again: %s",
                len(refused),
                self.refused,
                "; ".join(refused[:3]),
            )
        if self._inflight and not confirmed and not refused and not self.stopping.is_set():
            if not self._connected.is_set():
                raise SinkUnavailable(f"connection lost ({self._disconnect_reason})")
            raise SinkUnavailable(f"no acknowledgement within {self.config.ack_timeout:g}s")
        confirmed.sort(key=lambda e: e.position)
        return confirmed

    def check_connection(self) -> None:
        if not self._connected.is_set():
            raise SinkUnavailable(
                f"connection lost ({self._disconnect_reason or 'unknown reason'})"
            )

    def close(self) -> None:
        client, self._client = self._client, None
        self._connected.clear()
        if client is None:
            return
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()


@hookimpl
def register_sinks(register):
    register("mqtt", MqttSink)
