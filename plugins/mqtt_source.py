"""The ``mqtt`` source: messages from a broker (usually the local one), committed, then acked.

paho's network thread only hands what arrives (messages, CONNACK, SUBACK, a
lost connection) to the source's own thread through an in-memory inbox. That
thread takes whatever has arrived, commits it with one ``emit_many`` (one
transaction), and only then acknowledges the messages (``manual_ack``: PUBACK
in the order they arrived). A crash at any moment loses nothing: the broker
keeps the session (clean start off, ``session_expiry``) and sends again what
was not acknowledged.

**Redeliveries.** The packet ids of committed QoS 1 messages are saved with
their events, in the same transaction, until the broker is known to have their
acknowledgements; a message the broker sends again that matches one was
committed already: it is acknowledged and not emitted again (see
:mod:`edge_agent.plugins.mqtt_redelivery`).

**QoS 2** subscriptions are made at QoS 1: paho answers a QoS 2 message with
PUBREC before the application sees it, so a crash between the two would lose
it. At QoS 1 with the check above, the queue still gets each message once.

How messages become events is in :mod:`edge_agent.plugins.mqtt_events`.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent import Duration, Event, Source, hookimpl, option
from edge_agent.backoff import Backoff
from edge_agent.errors import QueueError
from edge_agent.event import check_event, new_event_ids, utc_now
from edge_agent.plugins.mqtt_events import message_event, own_output
from edge_agent.plugins.mqtt_messages import (
    MqttConnectionConfig,
    connect,
    new_client,
    warn_if_insecure,
)
from edge_agent.plugins.mqtt_redelivery import RedeliveryLog, digest

if TYPE_CHECKING:
    # paho.mqtt.client (with ssl and urllib) and the client class built on it are imported
    # when the source first connects, so that `edge-agent check` and `plugins` start
    # without them.
    from edge_agent.plugins.mqtt_clients import InboundClient, Received

#: Most messages committed in one transaction.
BATCH_MAX = 2000


class Unavailable(Exception):
    """The broker cannot be reached or refused us: try again after a backoff."""


@dataclass
class TopicFilter:
    """One subscription: a topic filter and the QoS asked for it."""

    filter: str
    qos: int

    @property
    def shared(self) -> bool:
        return self.filter.startswith("$share/")


def parse_topics(entries: list[Any], default_qos: int) -> list[TopicFilter]:
    """``topics`` as the config gives them → filters; ValueError naming every bad one."""
    found: list[TopicFilter] = []
    problems: list[str] = []
    for index, entry in enumerate(entries):
        where = f"topics[{index}]"
        if isinstance(entry, str):
            text, qos = entry, default_qos
        elif isinstance(entry, dict):
            unknown = sorted(set(entry) - {"filter", "qos"})
            if unknown:
                problems.append(f"{where}: unknown key(s) {', '.join(unknown)}; known: filter, qos")
                continue
            text, qos = entry.get("filter"), entry.get("qos", default_qos)
            if not isinstance(text, str):
                problems.append(f'{where}: give the filter as filter = "sensors/#"')
                continue
            if not isinstance(qos, int) or isinstance(qos, bool) or not 0 <= qos <= 2:
                problems.append(f"{where}: qos {qos!r} is out of range; use 0, 1 or 2")
                continue
        else:
            problems.append(
                f'{where}: expected a filter ("sensors/#") or a table'
                ' ({filter = "plc/+/state", qos = 2})'
            )
            continue
        problem = filter_problem(text)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        found.append(TopicFilter(text, qos))
    if not entries:
        problems.append('topics: give at least one topic filter, e.g. topics = ["sensors/#"]')
    seen = [f.filter for f in found]
    doubles = sorted({f for f in seen if seen.count(f) > 1})
    if doubles:
        problems.append(f"topics: {', '.join(doubles)} given more than once")
    if problems:
        raise ValueError("; ".join(problems))
    return found


def filter_problem(text: str) -> str | None:
    """Why ``text`` is not an MQTT topic filter (shared ones included), or None if it is."""
    if not text:
        return "a topic filter may not be empty"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text):
        return f"the filter {text!r} holds a control character"
    if len(text.encode("utf-8", "replace")) > 65_535:
        return "the filter is longer than MQTT takes (65,535 bytes)"
    levels = text.split("/")
    if levels[0] == "$share":
        if len(levels) < 3 or not levels[1]:
            return (
                f"the shared subscription {text!r} names no group: write"
                ' "$share/GROUP/FILTER", e.g. "$share/gateways/sensors/#"'
            )
        if "+" in levels[1] or "#" in levels[1]:
            return f"the share group {levels[1]!r} may not hold + or #"
        levels = levels[2:]
        if levels == [""]:
            return f"the shared subscription {text!r} has no filter after its group"
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return f"in {text!r}, # must be a whole level and the last one (e.g. sensors/#)"
        if "+" in level and level != "+":
            return f"in {text!r}, + must be a whole level (e.g. plc/+/state)"
    return None


class MqttSource(Source):
    """Emits one event per MQTT message received under ``topics`` (see docs/sources/mqtt.md)."""

    announces_listening = True

    @dataclass(kw_only=True)
    class Config(MqttConnectionConfig):
        topics: list[Any] = option(
            example=["sensors/#"],
            doc='Topic filters: "sensors/#", or {filter = "plc/+/state", qos = 2}.',
        )
        qos: Literal[0, 1, 2] = option(
            1,
            doc="QoS of the filters given as plain strings. 0: at most once. 2 is subscribed"
            " as 1 (see the docs).",
        )
        type: str = option("mqtt.message", doc="The type of the events (not of CloudEvents).")
        retained: Literal["skip", "keep"] = option(
            "skip", doc='Retained messages sent on subscribing: "skip" or "keep".'
        )
        clean_start: bool = option(
            False, doc="Start a new session on every connection; false keeps the broker's."
        )
        session_expiry: Duration = option(
            7 * 86400.0,
            min=0,
            max=2**32 - 1,
            doc="How long the broker keeps the session, and the messages for it, while the"
            " agent is away (MQTT 5; with 3.1.1 the broker's own setting).",
        )
        receive_maximum: int = option(
            65535,
            min=1,
            max=65535,
            doc="Messages the broker may send before their acknowledgement (MQTT 5);"
            " Mosquitto's max_inflight_messages caps it.",
        )
        skip_own: bool = option(
            True, doc="Skip CloudEvents this agent published itself (no loops)."
        )

        def __post_init__(self) -> None:
            super().__post_init__()
            self.filters = parse_topics(self.topics, self.qos)
            try:
                check_event(Event(type=self.type, source="x"))
            except ValueError as exc:
                raise ValueError(f"type: {exc}") from None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        config = self.config
        warn_if_insecure(config, self.log)
        self.client_id = config.client_id or f"edge-agent-{self.agent_id}-{self.name}"
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._ready = threading.Condition()
        self._client: InboundClient | None = None
        #: Committed QoS 1 messages the broker may send again.
        self._redelivery = RedeliveryLog()
        self._own_prefix = f"edge-agent://{self.agent_id}/"
        self._qos2_said = False
        self._was_up = False

    # -- paho callbacks: network thread; hand over and return ---------------

    def _put(self, kind: str, value: Any) -> None:
        with self._ready:
            self._inbox.append((kind, value))
            self._ready.notify()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._put("connack", (reason_code, flags))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._put("suback", (mid, reason_codes))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._put("lost", str(reason_code))

    def _on_message(self, client, userdata, message) -> None:
        self._put("messages", [message])  # QoS 2 only: QoS 0 and 1 come in batches

    def _on_messages(self, messages: list[Received]) -> None:
        self._put("messages", messages)

    # -- the source's thread ----------------------------------------------

    def stop(self) -> None:
        super().stop()
        with self._ready:
            self._ready.notify_all()

    def run(self) -> None:
        self._redelivery = RedeliveryLog()
        self._redelivery.load(self.checkpoints())
        backoff = Backoff(self.config.reconnect_min, self.config.reconnect_max)
        down_since: float | None = None
        while not self.stopping.is_set():
            try:
                self._session(backoff)
            except Unavailable as exc:
                self.listening()  # tried: the broker's session keeps what comes meanwhile
                if down_since is None:
                    down_since = time.monotonic()
                    self.log.warning(
                        "%s; the broker keeps the session's messages, trying again with backoff"
                        " up to %gs",
                        exc,
                        self.config.reconnect_max,
                    )
                else:
                    self.log.debug("still unavailable: %s", exc)
            finally:
                self._close()
            if self.stopping.is_set():
                break
            if down_since is not None and self._was_up:
                down_since = None
            self.stopping.wait(backoff.next())

    def _session(self, backoff: Backoff) -> None:
        """Connect, subscribe, then commit and acknowledge until the connection ends."""
        config = self.config
        self._was_up = False
        self._inbox.clear()
        errors: list[str] = []
        for host, port in config.brokers():
            try:
                self._connect(host, port)
                break
            except Unavailable as exc:
                errors.append(f"{host}:{port}: {exc}")
                self._close()
        else:
            raise Unavailable("cannot connect to the broker: " + "; ".join(errors))
        self._subscribe()
        self._was_up = True
        backoff.reset()
        self.listening()
        v5 = config.protocol == "5"
        self._redelivery.new_connection(config.receive_maximum if v5 else None)
        self._pump()

    def _connect(self, host: str, port: int) -> None:
        from edge_agent.plugins.mqtt_clients import InboundClient

        config = self.config
        v5 = config.protocol == "5"
        client = new_client(
            config,
            self.client_id,
            clean_start=config.clean_start,
            manual_ack=True,
            client_class=InboundClient,
        )
        assert isinstance(client, InboundClient)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_messages = self._on_messages
        self._client: InboundClient | None = client
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = int(config.session_expiry)
            properties.ReceiveMaximum = config.receive_maximum
        problem = connect(
            client, host, port, config, clean_start=config.clean_start, properties=properties
        )
        if problem is not None:
            raise Unavailable(problem)
        client.loop_start()
        kind, value = self._expect(("connack", "lost"), config.connect_timeout, "a CONNACK")
        if kind == "lost":
            raise Unavailable(f"the broker closed the connection before answering ({value})")
        reason_code, flags = value
        if reason_code.is_failure:
            raise Unavailable(f"the broker refused the connection: {reason_code}")
        if not flags.session_present and not config.clean_start and self._redelivery.has_entries:
            self.log.warning(
                "the broker kept no session for %s (it expired, or the broker lost it):"
                " messages published while the agent was away are not here",
                self.client_id,
            )
        self.log.info(
            "connected to %s:%d as %s (session %s)",
            host,
            port,
            self.client_id,
            "resumed" if flags.session_present else "new",
        )

    def _subscribe(self) -> None:
        config = self.config
        client = self._client
        assert client is not None
        filters = config.filters
        asked = []
        for f in filters:
            qos = min(f.qos, 1)
            if f.qos == 2 and not self._qos2_said:
                self._qos2_said = True
                self.log.info(
                    "%s: subscribed at QoS 1, not 2: committed before it is acknowledged,"
                    " each message is queued once all the same",
                    f.filter,
                )
            if config.protocol == "5":
                # 1: retained messages only when the subscription is new (not on every
                # reconnect of a kept session); 2: never.
                handling = 1 if config.retained == "keep" else 2
                if f.shared:
                    handling = 0 if config.retained == "keep" else 2
                options = SubscribeOptions(qos=qos, retainHandling=handling)
                asked.append((f.filter, options))
            else:
                asked.append((f.filter, qos))
        result, _mid = client.subscribe(asked)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            from paho.mqtt.client import error_string

            raise Unavailable(f"cannot subscribe: {error_string(result)}")
        kind, value = self._expect(("suback", "lost"), config.connect_timeout, "a SUBACK")
        if kind == "lost":
            raise Unavailable(f"connection lost while subscribing ({value})")
        _mid, reason_codes = value
        refused = []
        for f, code in zip(filters, reason_codes, strict=False):
            failed = code.is_failure if hasattr(code, "is_failure") else code == 0x80
            if failed:
                refused.append(f"{f.filter} ({code})")
        if refused:
            self.listening()  # tried; the error is logged and the source tried again
            raise RuntimeError(
                f"the broker refused the subscription to {', '.join(refused)}: check the"
                " filter and the broker's ACL for this user"
            )
        self.count("subscribed")

    def _expect(self, kinds: tuple[str, ...], timeout: float, what: str) -> tuple[str, Any]:
        """Wait for the first item of one of ``kinds`` (anything else before it is an error)."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while not self.stopping.is_set():
                for index, (kind, value) in enumerate(self._inbox):
                    if kind in kinds:
                        del self._inbox[index]
                        return kind, value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(f"the broker sent no {what} within {timeout:g}s")
                self._ready.wait(min(left, 0.5))
        raise Unavailable("stopping")

    def _take(self, timeout: float) -> tuple[list[Received], list[str]]:
        """(up to BATCH_MAX messages, the reasons of lost connections) from the inbox."""
        messages: list[Received] = []
        lost: list[str] = []
        with self._ready:
            inbox = self._inbox
            if not inbox and not self.stopping.is_set():
                self._ready.wait(timeout)
            while inbox and len(messages) < BATCH_MAX:
                kind, value = inbox.popleft()
                if kind == "messages":
                    room = BATCH_MAX - len(messages)
                    if len(value) > room:
                        inbox.appendleft((kind, value[room:]))
                        value = value[:room]
                    messages += value
                elif kind == "lost":
                    lost.append(value)
            return messages, lost

    def _pump(self) -> None:
        while not self.stopping.is_set():
            messages, lost = self._take(0.5)
            if messages and not self._commit(messages):
                return  # stopping: not acknowledged, the broker sends them again
            if lost:
                raise Unavailable(f"connection lost ({lost[0]})")

    def _commit(self, messages: list[Received]) -> bool:
        """Emit the messages' events in one transaction, then acknowledge them in order."""
        events: list[Event] = []
        log = self._redelivery
        skip_retained = self.config.retained == "skip"
        skip_own = self.config.skip_own
        redelivered = retained = own = 0
        # Ids and the arrival time for the whole batch at once (one lock, one clock read).
        now = utc_now()
        stamps = iter(new_event_ids(len(messages)))
        for message in messages:
            stamp = (next(stamps), now)
            qos = message.qos
            mid = message.mid
            message_digest = ""
            if qos:
                message_digest = _digest(message)
                if log.seen(mid, message_digest, message.dup):
                    redelivered += 1
                    continue
            if message.retain and skip_retained:
                retained += 1
                event = None
            else:
                event = message_event(self, message, stamp)
            if event is not None and skip_own and own_output(event, self._own_prefix):
                own += 1
                event = None
            if event is None:
                if qos:
                    log.release(mid)
                continue
            events.append(event)
            if qos:
                log.keep(mid, message_digest)
        counters = self.counters
        counters["messages"] += len(messages)
        if redelivered:
            counters["redelivered"] += redelivered
        if retained:
            counters["retained_skipped"] += retained
        if own:
            counters["own_skipped"] += own
        if not self._emit(events, log.checkpoint()):
            return False
        log.committed()
        client = self._client
        if client is None:
            return True
        mids = [message.mid for message in messages if message.qos == 1]
        acked = 0
        if mids and client.ack_many(mids) == MQTTErrorCode.MQTT_ERR_SUCCESS:
            acked = len(mids)
        for message in messages:
            if message.qos == 2 and client.ack(message.mid, 2) == MQTTErrorCode.MQTT_ERR_SUCCESS:
                acked += 1
        self.count("acked", acked)
        return True

    def _emit(self, events: list[Event], checkpoint: dict[str, str | None]) -> bool:
        """Commit events and checkpoint; False if told to stop first (then nothing is
        acknowledged, and the broker sends the messages again)."""
        try:
            self.emit_many(events, checkpoint=checkpoint)
            return True
        except ValueError:
            pass  # an event a processor made invalid: the others go one by one below
        except QueueError as exc:
            if self.stopping.is_set():
                return False
            self.log.warning("could not commit %d messages: %s", len(events), exc)
        good = []
        for event in events:
            try:
                check_event(event)
                self.emit_many([event])  # also finds one a processor made invalid
                continue
            except ValueError as exc:
                self.count("invalid")
                self.log.error("a message on %s is not queued: %s", event.subject, exc)
                continue
            except QueueError:
                good.append(event)
        if not self.emit_until_accepted(good, checkpoint=checkpoint if good else None):
            return False
        while not good:  # the checkpoint alone
            try:
                self.save_checkpoint(checkpoint)
                break
            except QueueError as exc:
                self.log.warning("could not save the checkpoint: %s; trying again", exc)
                if self.stopping.wait(1.0):
                    return False
        return True

    def _close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        with contextlib.suppress(Exception):
            client.disconnect()
        with contextlib.suppress(Exception):
            client.loop_stop()
        with contextlib.suppress(Exception):
            if client.socket() is not None:
                client.socket().close()


def _digest(message: Received) -> str:
    """A digest of the message's topic and payload (what a redelivery must match)."""
    topic = getattr(message, "topic_bytes", None)
    if topic is None:  # an MQTTMessage (QoS 2, through paho's own path)
        topic = message.topic.encode("utf-8", "surrogatepass")
    return digest(topic, message.payload)


@hookimpl
def register_sources(register):
    register("mqtt", MqttSource)
