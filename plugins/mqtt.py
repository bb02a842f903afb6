"""The ``mqtt`` sink: events to an MQTT broker, confirmed by the broker's acknowledgement.

Delivery is confirmed only in paho's ``on_publish`` callback with a success
reason code (a PUBACK for QoS 1, PUBCOMP for QoS 2), never because
``publish()`` returned: ``is_published()`` and ``wait_for_publish()`` misreport
across reconnects. Each connection uses a fresh paho client with automatic
reconnect off, so paho never re-sends on its own; the forwarder re-sends
unconfirmed events from disk, in order, after it reconnects.

paho runs without a thread of its own: the forwarder's thread drives the
socket (paho's ``loop_read``/``loop_write``/``loop_misc`` after a ``select``)
while it waits for acknowledgements, and about once a second while idle
(:meth:`MqttSink.check_connection`), which keeps the keepalive. Publishing
from one thread while paho's thread reads the acknowledgements took twice
the CPU per message: every message and every acknowledgement crossed threads.

One event never holds back the others. A message that cannot be sent (a
topic MQTT forbids, larger than ``max_message_bytes`` or the broker's Maximum
Packet Size) is rejected as invalid before it is sent; a refusal in a PUBACK
(reason code 0x80 or above) is rejected as permanent, except "quota exceeded",
"server busy" and "packet identifier in use", which are for now. A message the
broker answers by dropping the connection (Mosquitto 2.0 does so for one over
its ``message_size_limit``, which it does not announce) is found by sending
carefully: when a connection is lost for a protocol error, or before it
confirmed anything, the messages then in flight are suspects, sent one at a
time on the next connections; a connection lost while a suspect was the only
message in flight rejects it as permanent. The forwarder sets rejected events
aside as dead letters (see :meth:`edge_agent.Sink.reject`).

The options and how events become messages are in :mod:`edge_agent.plugins.mqtt_messages`.
"""

from __future__ import annotations

import contextlib
import select
import time
from typing import TYPE_CHECKING, Any

from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent import QueuedEvent, Sink, SinkUnavailable, hookimpl
from edge_agent.plugins import mqtt_commands
from edge_agent.plugins.mqtt_hints import BUSY, MOVED, reason_value, server_reference
from edge_agent.plugins.mqtt_messages import (
    MQTT_MAX_PACKET,
    Message,
    MqttConfig,
    TopicCache,
    build_messages,
    connect,
    message_problem,
    new_client,
    warn_if_insecure,
)

if TYPE_CHECKING:
    # paho.mqtt.client (with ssl and urllib) and the client classes built on it are imported
    # when the sink first connects, so that `edge-agent check` and `plugins` start without them.
    import paho.mqtt.client as mqtt

    from edge_agent.plugins.mqtt_clients import OutboundClient

#: poll() events that send the sink to loop_read: data, or a hang-up or error it reports.
_READ = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
#: PUBACK reason codes that refuse a message for now: sent again after a backoff.
TRANSIENT_REFUSALS = {0x89: "server busy", 0x91: "packet identifier in use", 0x97: "quota exceeded"}
#: DISCONNECT reason codes that blame what the client sent (MQTT 5).
_PROTOCOL_DISCONNECTS = {0x81, 0x82, 0x90, 0x95, 0x99}
#: What to do about a broker's DISCONNECT reasons that have a usual cause.
_DISCONNECT_HINTS = {
    0x8E: "another client connected with the same client id; give each agent its own"
    " [[sinks.mqtt]] client_id (the default is made from [agent] id and the sink's name)",
    0x8B: "the broker is shutting down",
    0x87: "the broker's ACL or authentication no longer allows this client",
}


def broker_disconnect_reason(reason_code: Any, properties: Any) -> str:
    """The broker's MQTT 5 DISCONNECT as a person reads it: code, name, the broker's
    own reason string if it sent one, and what to do about the usual causes."""
    value = getattr(reason_code, "value", None)
    text = f"the broker disconnected us: {reason_code}"
    if isinstance(value, int):
        text += f" (0x{value:02X})"
    reason_string = getattr(properties, "ReasonString", None)
    if reason_string:
        text += f', "{reason_string}"'
    hint = _DISCONNECT_HINTS.get(value) if isinstance(value, int) else None
    return f"{text}: {hint}" if hint else text


class MqttSink(Sink):
    """Publishes events to MQTT: CloudEvents JSON by default, batched if asked."""

    Config = MqttConfig

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        config = self.config
        if config.qos == 2 and config.protocol == "5":
            self.log.warning(
                "qos 2 with MQTT 5: a refusal in PUBREC cannot be seen by the MQTT library, so"
                " a refused message may count as delivered; use qos 1 where refusals matter"
            )
        self.window = config.max_inflight
        self.max_batch = self.window * config.batch_max_events
        self.retry_min = config.reconnect_min
        self.retry_max = config.reconnect_max
        self.retry_jitter = "full" if config.reconnect_jitter else "none"
        self.first_open_delay = config.first_connect_delay
        #: The broker an MQTT 5 "use another server" / "server moved" pointed to: tried next.
        self._redirect: tuple[str, int] | None = None
        #: The broker said "server busy" or "quota exceeded" (CONNACK or DISCONNECT).
        self._busy = False
        self._topics = TopicCache(config.topic)
        self._client: OutboundClient | None = None
        self._broker = config.brokers()[0]
        self._connack: list[tuple[Any, Any] | None] = []
        self._acks: list[tuple[int, Any]] = []
        self._connected = False  # only the forwarder's thread reads or sets it
        self._disconnect_reason: str | None = None
        self._client_id = ""
        self._inflight: dict[int, QueuedEvent] = {}  # queue position -> event, this connection
        self._mids: dict[int, list[int]] = {}  # paho message id -> positions it carries
        self._protocol_error = False  # the connection ended for a protocol error
        self._loss_judged = False  # _judge_loss() ran for this connection
        self._confirmed_here = 0  # messages confirmed on this connection
        #: Positions in flight when a connection was lost suspiciously: sent one at a time.
        self._suspects: set[int] = set()
        #: The broker's Maximum Packet Size (MQTT 5 CONNACK), else MQTT's largest.
        self.max_packet = MQTT_MAX_PACKET
        #: The most messages in flight at once on any connection (at most ``window``).
        self.most_inflight = 0
        #: Messages the broker refused (a reason code of 0x80 or above), since start.
        self.refused = 0
        warn_if_insecure(config, self.log)

    @property
    def target(self) -> str:
        host, port = self._broker
        return f"{host}:{port}"

    # -- paho callbacks: run inside _service(); no I/O, no exceptions ------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            self._connected = True
        self._connack.append((reason_code, properties))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if getattr(flags, "is_disconnect_packet_from_server", False):
            # The broker said why (MQTT 5): keep it. paho calls this again once it
            # notices the closed socket, with "Unspecified error", which says nothing.
            self._disconnect_reason = broker_disconnect_reason(reason_code, properties)
        elif self._disconnect_reason is None or self._connected:
            # paho's "Unspecified error" means the socket closed: say that, and the
            # usual cause, rather than an error paho made up.
            unspecified = getattr(reason_code, "value", None) == 0x80
            self._disconnect_reason = self._closed_silently() if unspecified else str(reason_code)
        self._hint(reason_code, properties)
        self._protocol_error |= getattr(reason_code, "value", 0) in _PROTOCOL_DISCONNECTS
        self._connected = False
        self._connack.append(None)  # ends a wait in open()

    def _closed_silently(self) -> str:
        mqtt5 = " (no MQTT 5 DISCONNECT with a reason)" if self.config.protocol == "5" else ""
        return (
            f"the connection was closed without a reason from the broker{mqtt5}; if this"
            " repeats soon after each connect, another client may be using the client id"
            f" {self._client_id!r} (Mosquitto closes the older connection of a client id"
            " without a word): give each its own client_id"
        )

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acks.append((mid, reason_code))

    def _service(self, timeout: float) -> bool:
        """Move bytes both ways for up to ``timeout`` seconds; False once the connection is gone.

        What paho's ``loop()`` does, without its wake-up socket pair: paho
        writes a byte to that pair on every publish, for a thread that is not
        there.
        """
        client = self._client
        sock = client.socket() if client is not None else None
        if sock is None:
            return False
        pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted
        if pending is not None and pending() > 0:
            timeout = 0.0
        # poll(), not select(): select() cannot watch a descriptor of 1024 or more,
        # which an agent tailing many files may well hand out to this socket.
        poller = select.poll()
        try:
            poller.register(sock, _READ | (select.POLLOUT if client.want_write() else 0))
            happened = 0
            for _fd, mask in poller.poll(int(timeout * 1000)):
                happened |= mask
        except (OSError, ValueError, TypeError):  # closed under us
            return self._lost(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        if happened & select.POLLNVAL:
            return self._lost(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        readable = happened & _READ  # a hang-up or an error too: loop_read finds out
        writable = happened & select.POLLOUT
        ok = MQTTErrorCode.MQTT_ERR_SUCCESS
        if readable or (pending is not None and pending() > 0):
            rc = client.loop_read()
            if rc != ok or client.socket() is None:
                return self._lost(rc)
        if writable:
            rc = client.loop_write()
            if rc != ok or client.socket() is None:
                return self._lost(rc)
        rc = client.loop_misc()
        return rc == ok or self._lost(rc)

    def _lost(self, rc: MQTTErrorCode) -> bool:
        """The connection is unusable (paho said why in ``rc``): always False."""
        if self._disconnect_reason is None or self._connected:
            from paho.mqtt.client import error_string

            self._disconnect_reason = error_string(rc)
        # paho's answer to a packet it cannot take, such as the PUBACK with 0x95
        # (packet too large) that Mosquitto 2.0 sends for a message over its
        # message_size_limit, a code MQTT 5 does not allow in a PUBACK.
        self._protocol_error |= rc == MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._connected = False
        return False

    # -- connecting ----------------------------------------------------------

    def _client_for(self) -> mqtt.Client:
        from edge_agent.plugins.mqtt_clients import OutboundClient

        config = self.config
        client_id = config.client_id or f"edge-agent-{self.agent_id}-{self.name}"
        if self.probing:  # beside the running agent: never take over its session
            client_id += "-check"
        self._client_id = client_id
        client = new_client(
            config,
            client_id,
            clean_start=config.clean_start or self.probing,
            client_class=OutboundClient,
        )
        # The window is kept by publish() (never more than self.window in flight); paho's
        # own limit would only make it walk its whole store on every acknowledgement.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        if config.status_topic and not self.probing:
            client.will_set(self._status_topic(), config.status_offline, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _status_topic(self) -> str:
        return self.config.status_topic.replace("{agent}", self.agent_id)

    def open(self) -> None:
        """Connect to the first broker of ``hosts`` that answers (one a broker pointed to
        with an MQTT 5 server reference first; see plugins/mqtt_hints.py)."""
        brokers = self.config.brokers()
        if self._redirect in brokers:
            brokers = [self._redirect, *[b for b in brokers if b != self._redirect]]
        self._redirect = None
        self._busy = False
        failures = []
        tried: set[tuple[str, int]] = set()
        while brokers:
            broker = brokers.pop(0)
            if broker in tried:
                continue
            tried.add(broker)
            self._broker = broker
            try:
                self._connect(*broker)
                return
            except SinkUnavailable as exc:
                failures.append(
                    f"{broker[0]}:{broker[1]}: {exc}" if len(tried) > 1 or brokers else str(exc)
                )
                self.close()
                if self._redirect is not None and self._redirect not in tried:
                    brokers.insert(0, self._redirect)  # where the broker sent us: next
                self._redirect = None
                if self.stopping.is_set():
                    break
        raise SinkUnavailable("; ".join(failures), busy=self._busy)

    def _hint(self, reason_code: Any, properties: Any) -> None:
        """Take an MQTT 5 broker's advice in a CONNACK or DISCONNECT (plugins/mqtt_hints.py)."""
        value = reason_value(reason_code)
        if value in BUSY:
            self._busy = True
            self.log.warning(
                "broker %s:%s says %s (0x%02X): waiting about reconnect_max (%gs) before"
                " connecting again",
                *self._broker,
                BUSY[value],
                value,
                self.retry_max,
            )
        elif value in MOVED:
            target, why = server_reference(
                reason_code, properties, self._broker, self.config.brokers()
            )
            if target is not None:
                self._redirect = target
                self.log.info(
                    "broker %s:%s says %s: trying %s:%s next", *self._broker, MOVED[value], *target
                )
            else:
                self.log.warning(
                    "broker %s:%s says %s (0x%02X), but %s; going on with the configured brokers",
                    *self._broker,
                    MOVED[value],
                    value,
                    why,
                )

    def _connect(self, host: str, port: int) -> None:
        config = self.config
        v5 = config.protocol == "5"
        client = self._client_for()
        from edge_agent.plugins.mqtt_clients import OutboundClient

        assert isinstance(client, OutboundClient)
        self._connack = []
        self._acks = []
        self._connected = False
        self._disconnect_reason = None
        self._inflight = {}
        self._mids = {}
        self._protocol_error = self._loss_judged = False
        self._confirmed_here = 0
        self._client = client
        properties = None
        if v5 and config.session_expiry and not self.probing:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = int(config.session_expiry)
        problem = connect(
            client,
            host,
            port,
            config,
            clean_start=config.clean_start or self.probing,
            properties=properties,
        )
        if problem is not None:
            raise SinkUnavailable(problem)
        reason_code, connack_properties = self._await_connack()
        if reason_code.is_failure:
            self._hint(reason_code, connack_properties)
            raise SinkUnavailable(f"the broker refused the connection: {reason_code}")
        window = config.max_inflight
        receive_maximum = getattr(connack_properties, "ReceiveMaximum", None) if v5 else None
        if receive_maximum:
            window = min(window, receive_maximum)  # paho ignores the broker's limit
        self.window = max(1, window)
        self.max_batch = self.window * config.batch_max_events
        max_packet = getattr(connack_properties, "MaximumPacketSize", None) if v5 else None
        self.max_packet = min(max_packet or MQTT_MAX_PACKET, MQTT_MAX_PACKET)
        if not self._connected:
            raise SinkUnavailable(
                f"connection lost right after CONNACK ({self._disconnect_reason})"
            )
        if config.status_topic and not self.probing:
            client.publish(self._status_topic(), config.status_online, qos=1, retain=True)

    def _await_connack(self) -> tuple[Any, Any]:
        timeout = self.config.connect_timeout
        deadline = time.monotonic() + timeout
        while not self.stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                raise SinkUnavailable(
                    "the broker accepted the TCP connection but sent no CONNACK within"
                    f" {timeout:g}s"
                )
            if not self._connack:
                if not self._service(min(left, 0.5)) and not self._connack:
                    self._connack.append(None)  # closed without a word
                continue
            answer = self._connack.pop(0)
            if answer is None:
                raise SinkUnavailable(
                    "the broker closed the connection before answering"
                    f" ({self._disconnect_reason or 'no reason given'})"
                )
            return answer
        raise SinkUnavailable("stopping")

    # -- publishing ------------------------------------------------------------

    def publish(self, events: list[QueuedEvent]) -> list[QueuedEvent]:
        """Keep up to ``max_inflight`` messages in flight; return the events acknowledged so far.

        A sliding window: events already in flight on this connection are not
        sent again, new ones fill the free places, and the call returns as
        soon as acknowledgements arrive (waiting at most ``ack_timeout`` for
        the first). Waiting for a whole batch instead would leave the line idle
        while the last acknowledgements trickle in. A message that cannot be
        sent is rejected as invalid (see the module docstring), not sent.
        """
        client = self._client
        if client is None or not self._connected:
            self._judge_loss()
            raise SinkUnavailable(
                f"not connected ({self._disconnect_reason or 'no connection'})", busy=self._busy
            )
        if self._suspects:  # forget those confirmed or set aside meanwhile
            self._suspects &= {e.position for e in events}
        window = 1 if self._suspects else self.window
        fresh = [e for e in events if e.position not in self._inflight]
        client.cork()  # one write for all the messages below, at uncork()
        try:
            self._publish_fresh(client, fresh, window)
        finally:
            rc = client.uncork()
        if rc in (MQTTErrorCode.MQTT_ERR_NO_CONN, MQTTErrorCode.MQTT_ERR_CONN_LOST):
            self._lost(rc)
        self.most_inflight = max(self.most_inflight, len(self._mids))
        return self._collect_acks()

    def _publish_fresh(self, client: OutboundClient, fresh: list[QueuedEvent], window: int) -> None:
        """Hand paho the messages of ``fresh`` events while the window has room."""
        config = self.config
        for message in build_messages(config, fresh, self._topics, self.max_packet):
            if len(self._mids) >= window:
                break
            problem = message_problem(
                message, config.qos, config.max_message_bytes, self.max_packet
            )
            if problem is None:
                try:
                    rc, mid = self._send(client, message)
                except ValueError as exc:  # paho refuses the message itself
                    problem = f"the MQTT library cannot send it: {exc}"
            if problem is not None:
                for event in message.events:
                    self.reject(event, problem, invalid=True)
                continue
            if rc in (MQTTErrorCode.MQTT_ERR_NO_CONN, MQTTErrorCode.MQTT_ERR_CONN_LOST):
                self._lost(rc)
                if not self._inflight:
                    raise SinkUnavailable(
                        f"connection lost ({self._disconnect_reason})", busy=self._busy
                    )
                break  # nothing more can go out; what went out may still be acked
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                from paho.mqtt.client import error_string

                raise SinkUnavailable(f"publish failed: {error_string(rc)}")
            for event in message.events:
                self._inflight[event.position] = event
            self._mids[mid] = [event.position for event in message.events]

    def _send(self, client: OutboundClient, message: Message) -> tuple[MQTTErrorCode, int]:
        """Hand one checked message to the client: (rc, packet id).

        QoS 1, the usual case, goes out without paho's bookkeeping for each
        message (about a third of the CPU per message): the forwarder keeps
        the messages in flight and resends from disk, never paho.
        """
        config = self.config
        if config.qos == 1:
            properties = message.properties.pack() if message.properties is not None else None
            return client.publish_qos1(
                message.topic.encode("utf-8"), message.payload, config.retain, properties
            )
        info = client.publish(
            message.topic,
            message.payload,
            qos=config.qos,
            retain=config.retain,
            properties=message.properties,
        )
        return info.rc, info.mid

    def _judge_loss(self) -> None:
        """The connection is lost: find the message the broker could not take, if one was.

        Brokers read packets in order and answer them in order; but when the
        broker hangs up, the acknowledgements of the messages before the bad one
        may be lost with the connection. So a loss for a protocol error, or one
        before anything was confirmed, makes the messages in flight suspects,
        sent one at a time from then on; a loss while one suspect (or, after a
        protocol error, one message) was alone in flight rejects it. After
        ``dead_letter_after`` such losses in a row, the forwarder sets it aside.
        A loss after confirmations (an ordinary outage) suspects nothing.
        """
        if self._loss_judged or not self._mids:
            return
        self._loss_judged = True
        in_flight = list(self._mids.values())
        if len(in_flight) == 1 and (
            self._protocol_error or any(p in self._suspects for p in in_flight[0])
        ):
            for position in in_flight[0]:
                event = self._inflight.get(position)
                if event is not None:
                    self.reject(
                        event,
                        "the broker dropped the connection while it was the only message in"
                        f" flight ({self._disconnect_reason}): a message the broker cannot"
                        " take, such as one over its message_size_limit (set max_message_bytes"
                        " to that limit)",
                    )
        if self._protocol_error or not self._confirmed_here:
            self._suspects.update(p for positions in in_flight for p in positions)

    def _collect_acks(self) -> list[QueuedEvent]:
        """Wait for the first acknowledgement (up to ack_timeout), then take all that came."""
        confirmed: list[QueuedEvent] = []
        refused: list[str] = []
        transient = False
        deadline = time.monotonic() + self.config.ack_timeout
        acks = self._acks
        mids = self._mids
        # Acks of other messages (the status topic's) do not end the wait.
        while mids and not any(mid in mids for mid, _ in acks) and not self.stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or not self._service(min(left, 0.5)):
                break
        for mid, reason_code in acks:
            positions = self._mids.pop(mid, None)
            if positions is None:
                continue
            events = [self._inflight.pop(p) for p in positions if p in self._inflight]
            if reason_code.is_failure:
                code = getattr(reason_code, "value", 0)
                why = f"the broker refused it: {reason_code} (0x{code:02X})"
                for event in events:
                    self.reject(event, why, permanent=code not in TRANSIENT_REFUSALS)
                transient |= code in TRANSIENT_REFUSALS
                refused += [f"{event.id}: {reason_code}" for event in events]
            else:
                confirmed += events
                self._confirmed_here += 1
                self._suspects.difference_update(positions)
        acks.clear()
        if refused:
            self.refused += len(refused)
            self.log.warning(
                "broker refused %d events (%d since start); %s: %s",
                len(refused),
                self.refused,
                "they are sent again after a backoff"
                if transient
                else "they are sent again, and set aside as dead letters after"
                " [queue] dead_letter_after refusals",
                "; ".join(refused[:3]),
            )
        if self._mids and not confirmed and not refused and not self.stopping.is_set():
            if not self._connected:
                self._judge_loss()
                raise SinkUnavailable(
                    f"connection lost ({self._disconnect_reason})", busy=self._busy
                )
            raise SinkUnavailable(f"no acknowledgement within {self.config.ack_timeout:g}s")
        confirmed.sort(key=lambda e: e.position)
        return confirmed

    def check_connection(self) -> None:
        """Answer pings and send the keepalive; raise if the connection is gone."""
        if self._connected:
            self._service(0.0)
        if not self._connected:
            self._judge_loss()
            raise SinkUnavailable(
                f"connection lost ({self._disconnect_reason or 'unknown reason'})",
                busy=self._busy,
            )

    def close(self) -> None:
        client = self._client
        if client is None:
            return
        clean = True
        if self._connected and self.config.status_topic and not self.probing:
            # A clean disconnect: say so, since the broker does not send the will then.
            clean = False
            with contextlib.suppress(Exception):
                info = client.publish(
                    self._status_topic(), self.config.status_offline, qos=1, retain=True
                )
                deadline = time.monotonic() + 1.0
                while not info.is_published() and time.monotonic() < deadline:
                    if not self._service(0.1):
                        break
                clean = info.is_published()
        self._client = None
        self._connected = False
        if clean:  # else no DISCONNECT: the broker then sends the will ("offline") itself
            with contextlib.suppress(Exception):
                client.disconnect()  # written at once; paho closes the socket after it
        with contextlib.suppress(Exception):
            if client.socket() is not None:
                client.socket().close()


@hookimpl
def register_sinks(register):
    register("mqtt", MqttSink)


@hookimpl
def startup(agent):
    """Open the command connections of MQTT sinks with a ``commands`` table."""
    mqtt_commands.start_listeners(agent)


@hookimpl
def shutdown(agent):
    mqtt_commands.stop_listeners(agent)
