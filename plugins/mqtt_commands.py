"""Remote commands over MQTT 5 for the ``mqtt`` sink: the ``[sinks.mqtt.commands]`` table.

Off by default. With the table, the agent opens a second MQTT connection to
the sink's broker (same hosts, TLS, user name and password; client id
``{sink's client id}-cmd``), subscribes to ``edge/{agent}/cmd/+`` and answers
each request on its MQTT 5 response topic with its correlation data. What the
commands do and how they are checked is in :mod:`edge_agent.commands`.

A connection of its own, not the sink's: the sink's connection belongs to its
forwarder, which may be busy draining a backlog with a full window or waiting
out a backoff; a command must be answered meanwhile, and must never hold back
events. The connection uses a clean start and no session expiry: a command
sent while the agent is offline is not kept for later (a stale ``reload``
hours later would surprise), and the requester times out instead.

Threads: ``commands:SINK`` owns the connection (paho driven by ``poll()``,
as the sink does, so a descriptor above 1024 is no problem) and publishes the
answers; ``commands:SINK:requests`` checks and runs one request at a time
through the dispatcher, whose handlers run in a thread of their own with a
timeout. Nothing of a command runs in the network thread.

Authorisation is the broker's: whoever may publish to the agent's command
topic may run the allowed commands. The ACL example is in docs/commands.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent import ByteSize, Duration, OptionError, option
from edge_agent.backoff import Backoff
from edge_agent.commands import BUILTIN_COMMANDS, DEFAULT_ALLOW, Dispatcher, command_name_problem

if TYPE_CHECKING:
    # paho's client (with ssl) is imported when a listener connects: `edge-agent check`
    # and `plugins` start without it.
    import paho.mqtt.client as mqtt

log = logging.getLogger("edge_agent.commands")

#: Requests waiting for the one before them; more are answered "busy" at once.
MAX_WAITING = 16
#: The user property a requester (or a broker that adds it) names itself with.
REQUESTER_PROPERTY = "client_id"
_READ = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


def _error_string(rc: Any) -> str:
    from paho.mqtt.client import error_string

    return error_string(rc)


def _check_allow(names: list[str]) -> None:
    for name in names:
        problem = command_name_problem(name)
        if problem is not None:
            raise ValueError(f"{name!r}: {problem}")


@dataclass(kw_only=True)
class CommandsConfig:
    """The ``commands`` table of an ``[[sinks.mqtt]]``: remote commands, off without it."""

    topic: str = option(
        "edge/{agent}/cmd/+",
        doc="Topic filter the agent subscribes to; {agent} is the agent's id, and the last"
        " level, +, is the command's name.",
    )
    allow: list[str] = option(
        list(DEFAULT_ALLOW),
        validator=_check_allow,
        doc="The commands this agent runs: of ping, status, reload, queue-stats and those"
        " plugins register. Others are refused, also when they exist.",
    )
    timeout: Duration = option(
        10.0, above=0, max=3600, doc="A command not done within this is answered 'timeout'."
    )
    max_request_bytes: ByteSize = option(
        ByteSize(16 * 1024),
        min=2,
        max=1024**2,
        doc="A larger request is refused ('too_large') without being parsed.",
    )
    client_id: str = option(
        "", doc="MQTT client id of the command connection. Default: the sink's, plus -cmd."
    )

    def __post_init__(self) -> None:
        prefix = self.topic.removesuffix("/+")
        if prefix == self.topic or not prefix:
            raise OptionError("topic", f"{self.topic!r} must end in '/+' (the command's name)")
        bare = prefix.replace("{agent}", "")
        if any(c in bare for c in "+#{}\x00"):
            raise OptionError(
                "topic",
                f"{self.topic!r}: only the last level may be a wildcard; {{agent}}"
                " is the one field known",
            )

    def prefix(self, agent_id: str) -> str:
        """The topic levels before the command's name, for ``agent_id``."""
        return self.topic.removesuffix("/+").replace("{agent}", agent_id)


def requester_of(properties: Any) -> str | None:
    """The requester's client id, if the message carries one as a user property."""
    for key, value in getattr(properties, "UserProperty", None) or []:
        if key == REQUESTER_PROPERTY:
            return value
    return None


class CommandListener:
    """One ``commands`` table: its connection, its subscription and its requests."""

    def __init__(self, agent: Any, sink_name: str, config: Any, dispatcher: Dispatcher) -> None:
        self.agent = agent
        self.sink_name = sink_name
        self.config = config  # the sink's MqttConfig as it was at start
        self.commands: CommandsConfig = config.commands
        self.dispatcher = dispatcher
        sink_id = config.client_id or f"edge-agent-{agent.id}-{sink_name}"
        self.client_id = self.commands.client_id or f"{sink_id}-cmd"
        self.prefix = self.commands.prefix(agent.id)
        self.filter = f"{self.prefix}/+"
        self.stopping = threading.Event()
        #: Set while the subscription is acknowledged (a test or status may wait for it).
        self.subscribed = threading.Event()
        self._requests: queue.Queue[tuple[str, bytes, Any] | None] = queue.Queue(MAX_WAITING)
        self._outbox: queue.Queue[tuple[str, bytes, bytes | None]] = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._answers: dict[int, str] = {}  # mid -> response topic, until acknowledged
        self._client: mqtt.Client | None = None
        self._connected = False
        self._broker = ""
        self._network = threading.Thread(
            target=self._run_network, name=f"commands:{sink_name}", daemon=True
        )
        self._worker = threading.Thread(
            target=self._run_requests, name=f"commands:{sink_name}:requests", daemon=True
        )

    def start(self) -> None:
        known = set(self.dispatcher.known())
        for name in self.commands.allow:
            if name not in known:
                log.warning(
                    "sink %s: commands.allow lists %r, which neither the agent nor a plugin"
                    " provides; a request for it is answered 'unknown'",
                    self.sink_name,
                    name,
                )
        self._worker.start()
        self._network.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        self._wake()
        with contextlib.suppress(queue.Full):
            self._requests.put_nowait(None)
        self._network.join(timeout)
        self._worker.join(timeout)
        for sock in (self._wake_r, self._wake_w):
            sock.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # -- the network thread ---------------------------------------------------

    def _run_network(self) -> None:
        from edge_agent.plugins.mqtt_messages import connect, new_client

        backoff = Backoff(self.config.reconnect_min, self.config.reconnect_max)
        brokers = self.config.brokers()
        turn = 0
        last_problem = None
        while not self.stopping.is_set():
            host, port = brokers[turn % len(brokers)]
            turn += 1
            self._broker = f"{host}:{port}"
            client = new_client(self.config, self.client_id, clean_start=True)
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_subscribe = self._on_subscribe
            client.on_message = self._on_message
            client.on_publish = self._on_publish
            self._client = client
            problem = connect(client, host, port, self.config, clean_start=True)
            if problem is None:
                problem = self._serve(client)
            self._connected = False
            self.subscribed.clear()
            with contextlib.suppress(Exception):
                client.disconnect()
            with contextlib.suppress(Exception):
                if client.socket() is not None:
                    client.socket().close()
            if self.stopping.is_set():
                return
            if problem is None:  # it was up: start the backoff again
                backoff.reset()
            elif problem != last_problem:
                log.warning(
                    "sink %s: the command connection to %s failed: %s; commands are not"
                    " received until it is back (retrying with backoff)",
                    self.sink_name,
                    self._broker,
                    problem,
                )
            last_problem = problem
            self.stopping.wait(backoff.next())

    def _serve(self, client: mqtt.Client) -> str | None:
        """Drive the connection until it ends; why it could not be used, or None."""
        ok = MQTTErrorCode.MQTT_ERR_SUCCESS
        deadline = time.monotonic() + self.config.connect_timeout
        while not self.stopping.is_set():
            sock = client.socket()
            if sock is None:
                return None if self._connected else "the broker closed the connection"
            if not self._connected and time.monotonic() > deadline:
                return f"no CONNACK within {self.config.connect_timeout:g}s"
            self._send_answers(client)
            poller = select.poll()
            try:
                poller.register(sock, _READ | (select.POLLOUT if client.want_write() else 0))
                poller.register(self._wake_r, select.POLLIN)
                events = dict(poller.poll(500))
            except (OSError, ValueError, TypeError):
                return "the connection was closed"
            if self._wake_r.fileno() in events:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            mask = events.get(sock.fileno(), 0)
            if mask & select.POLLNVAL:
                return "the connection was closed"
            if mask & _READ or (getattr(sock, "pending", None) and sock.pending() > 0):
                rc = client.loop_read()
                if rc != ok:
                    return None if self._connected else _error_string(rc)
            if mask & select.POLLOUT:
                rc = client.loop_write()
                if rc != ok:
                    return None if self._connected else _error_string(rc)
            if client.loop_misc() != ok:
                return None if self._connected else "the connection was lost"
        return None

    def _send_answers(self, client: mqtt.Client) -> None:
        while True:
            try:
                topic, payload, correlation = self._outbox.get_nowait()
            except queue.Empty:
                return
            properties = Properties(PacketTypes.PUBLISH)
            properties.ContentType = "application/json"
            if correlation is not None:
                properties.CorrelationData = correlation
            try:
                info = client.publish(topic, payload, qos=1, properties=properties)
            except (ValueError, TypeError, UnicodeError) as exc:
                log.warning(
                    "sink %s: cannot answer on response topic %r: %s", self.sink_name, topic, exc
                )
                continue
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._answers[info.mid] = topic
                if len(self._answers) > 1000:  # acknowledgements that never came
                    self._answers.clear()
            else:
                log.warning(
                    "sink %s: the answer on %s was not sent (%s); the requester times out",
                    self.sink_name,
                    topic,
                    _error_string(info.rc),
                )

    # -- paho callbacks: in the network thread; no exceptions -----------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning(
                "sink %s: the broker %s refused the command connection: %s",
                self.sink_name,
                self._broker,
                reason_code,
            )
            return
        self._connected = True
        options = SubscribeOptions(
            qos=1, noLocal=True, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND
        )
        client.subscribe(self.filter, options=options)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected and not self.stopping.is_set():
            log.warning(
                "sink %s: the command connection to %s was lost (%s); reconnecting",
                self.sink_name,
                self._broker,
                reason_code,
            )
        self.subscribed.clear()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            log.error(
                "sink %s: the broker %s refused the subscription to %s (%s): no command can"
                " arrive. Let this device's MQTT user read that topic in the broker's ACL",
                self.sink_name,
                self._broker,
                self.filter,
                refused[0],
            )
            return
        self.subscribed.set()
        log.info(
            "sink %s: commands listen on %s at %s as %s (allowed: %s)",
            self.sink_name,
            self.filter,
            self._broker,
            self.client_id,
            ", ".join(self.commands.allow) or "none",
        )

    def _on_message(self, client, userdata, message) -> None:
        try:
            if message.retain:  # a retained command would run again at every connect
                log.warning(
                    "sink %s: ignored a retained message on %s: commands are never retained",
                    self.sink_name,
                    message.topic,
                )
                return
            self._requests.put_nowait((message.topic, message.payload, message.properties))
        except queue.Full:
            self._refuse_now(message, "busy", f"{MAX_WAITING} requests are already waiting")
        except Exception as exc:
            log.error("sink %s: a command message could not be taken: %s", self.sink_name, exc)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        topic = self._answers.pop(mid, None)
        if topic is not None and reason_code.is_failure:
            log.warning(
                "sink %s: the broker refused the answer on %s (%s): let this device's MQTT"
                " user write its response topics in the broker's ACL",
                self.sink_name,
                topic,
                reason_code,
            )

    def _refuse_now(self, message: Any, code: str, reason: str) -> None:
        properties = message.properties
        response = getattr(properties, "ResponseTopic", None)
        log.warning("command on %s refused (%s): %s", message.topic, code, reason)
        if response:
            name = message.topic.rpartition("/")[2]
            answer = {"agent": self.agent.id, "command": name, "ok": False}
            answer.update(code=code, error=reason, seconds=0.0)
            self._outbox.put((response, _encode(answer), _correlation(properties)))

    # -- the requests thread ------------------------------------------------

    def _run_requests(self) -> None:
        while not self.stopping.is_set():
            item = self._requests.get()
            if item is None:
                return
            try:
                self._handle(*item)
            except Exception as exc:  # never let one request end the thread
                log.exception("sink %s: a command failed unexpectedly: %s", self.sink_name, exc)

    def _settings(self) -> CommandsConfig | None:
        """The commands table as configured now (a reload may have changed allow)."""
        for instance in self.agent.config.sinks:
            if instance.name == self.sink_name:
                return getattr(instance.config, "commands", None)
        return None

    def _handle(self, topic: str, payload: bytes, properties: Any) -> None:
        name = topic.removeprefix(self.prefix + "/")
        requester = requester_of(properties)
        who = (
            f"client {requester!r} (as the message says)"
            if requester
            else "an unnamed client (the broker does not pass client ids; see docs/commands.md)"
        )
        response = getattr(properties, "ResponseTopic", None)
        if not response:
            log.warning(
                "command %r from %s on %s refused: it has no response topic (an MQTT 5"
                " request needs one); nothing was run",
                name,
                who,
                topic,
            )
            return
        settings = self._settings()
        if settings is None:
            answer = {"agent": self.agent.id, "command": name, "ok": False, "code": "not_allowed"}
            answer["error"] = (
                f"commands were turned off for sink {self.sink_name} by a reload; nothing is"
                " run (restart the agent to close this subscription)"
            )
        else:
            answer = self.dispatcher.answer(
                name,
                payload,
                allow=settings.allow,
                timeout=settings.timeout,
                max_bytes=settings.max_request_bytes,
            )
        if answer["ok"]:
            log.info(
                "command %r from %s answered on %s in %.3fs",
                name,
                who,
                response,
                answer["seconds"],
            )
        else:
            log.warning(
                "command %r from %s refused (%s): %s", name, who, answer["code"], answer["error"]
            )
        self._outbox.put((response, _encode(answer), _correlation(properties)))
        self._wake()


def _correlation(properties: Any) -> bytes | None:
    return getattr(properties, "CorrelationData", None)


def _encode(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer, ensure_ascii=False, default=str).encode()


# -- the agent's life -----------------------------------------------------------

_listeners: dict[int, list[CommandListener]] = {}


def start_listeners(agent: Any) -> None:
    """Start a listener for every MQTT sink with a ``commands`` table (none: nothing runs)."""
    from edge_agent.plugins.mqtt_messages import MqttConfig

    wanted = [
        instance
        for instance in agent.config.sinks
        if isinstance(instance.config, MqttConfig) and instance.config.commands is not None
    ]
    if not wanted:
        return
    dispatcher = Dispatcher(agent)
    listeners = [CommandListener(agent, i.name, i.config, dispatcher) for i in wanted]
    _listeners[id(agent)] = listeners
    for listener in listeners:
        listener.start()


def stop_listeners(agent: Any) -> None:
    """Close the command connections of ``agent``."""
    for listener in _listeners.pop(id(agent), []):
        listener.stop()


def listeners_of(agent: Any) -> list[CommandListener]:
    """The running listeners of ``agent`` (for tests and status)."""
    return list(_listeners.get(id(agent), []))


__all__ = ["BUILTIN_COMMANDS", "CommandListener", "CommandsConfig", "start_listeners"]
