"""Helpers for testing the agent and its plugins against real parts.

``Mosquitto`` starts a throw-away broker on a free loopback port that a test
can stop and start again; ``Subscriber`` collects what arrives; ``wait_for``
polls a condition with a deadline instead of sleeping; ``CuttableProxy`` sits
between a client and its server and can cut the line; ``SourceHarness`` and
``SinkHarness`` run one plugin against a config.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it is truthy; raise AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)  # poll interval, bounded by the deadline above
        delay = min(delay * 2, 0.2)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mosquitto_binary() -> str:
    """The mosquitto broker binary: on PATH, or Debian's /usr/sbin/mosquitto."""
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )
    if found is None:
        raise RuntimeError("mosquitto is not installed (Debian: apt-get install mosquitto)")
    return found


class Mosquitto:
    """A Mosquitto broker of its own, on a free loopback port, that can be stopped and restarted.

    Persistence is on (saved on SIGTERM) so that a subscriber's session and
    its queued messages survive a restart; queue limits are off so the broker
    never drops what it acknowledged.
    """

    def __init__(self, directory: str, port: int | None = None, extra_config: str = "") -> None:
        self.directory = directory
        self.port = port or free_port()
        self.extra_config = extra_config
        self.process: subprocess.Popen | None = None
        os.makedirs(directory, exist_ok=True)
        self.config_path = os.path.join(directory, "mosquitto.conf")
        self.log_path = os.path.join(directory, "mosquitto.log")

    def write_config(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.directory}/",
            "autosave_interval 0",
            "max_queued_messages 0",
            "max_queued_bytes 0",
            f"log_dest file {self.log_path}",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto' and cannot read tmp dirs
        with open(self.config_path, "w") as handle:
            handle.write("\n".join(lines) + "\n" + self.extra_config + "\n")

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self.write_config()
        self.process = subprocess.Popen(
            [mosquitto_binary(), "-c", self.config_path],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def listening() -> bool:
            if self.process is not None and self.process.poll() is not None:
                log = ""
                if os.path.exists(self.log_path):
                    with open(self.log_path) as handle:
                        log = handle.read()
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}: {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_for(listening, timeout, f"mosquitto to listen on port {self.port}")
        return self

    def stop(self) -> None:
        """SIGTERM, so it saves its persistence file, and wait for it to exit."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def reload(self) -> None:
        """SIGHUP: the broker reads its ACL and password files again."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Message:
    topic: str
    payload: bytes
    properties: Any = None

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """A real MQTT client that collects messages under a topic filter.

    Uses a persistent session (clean session off) and QoS 1, so messages
    published while it reconnects after a broker restart are kept for it.
    """

    def __init__(
        self,
        port: int,
        topic: str = "#",
        *,
        protocol: str = "3.1.1",
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.v5 = v5 = protocol == "5"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            # Unique per subscriber (id() is reused once an object is gone): a new one
            # must never resume an earlier one's persistent session and its messages.
            client_id=f"test-subscriber-{port}-{os.getpid()}-{uuid.uuid4().hex[:12]}",
            clean_session=None if v5 else False,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        )
        self.client.reconnect_delay_set(0.05, 0.5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.topic = topic
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.port = port

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append(
                Message(message.topic, message.payload, getattr(message, "properties", None))
            )

    def start(self) -> Subscriber:
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            self.client.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        else:
            self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        wait_for(self._subscribed.is_set, 10, "the subscription to be acknowledged")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def events(self) -> list[dict]:
        """The payloads received so far, parsed as JSON."""
        with self._lock:
            return [m.json() for m in self.messages]

    def __enter__(self) -> Subscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def plugin_config(plugin_class: type, config: dict[str, Any], name: str) -> Any:
    """Validate ``config`` against the plugin's Config as ``check`` would; ValueError if bad."""
    from edge_agent.schema import build

    if plugin_class.Config is None:
        return None
    problems: list[tuple[str, str]] = []
    built = build(plugin_class.Config, config, name, problems)
    if problems:
        raise ValueError("; ".join(f"{key}: {message}" for key, message in problems))
    return built


class SourceHarness:
    """Run one source plugin against a config and collect what it commits.

    Commits go to memory, events and checkpoints together, as the real queue
    does. ``fail_commits(n)`` makes the next ``n`` commits fail with
    ``QueueError``, as a full disk would; ``status`` is what
    ``Source.agent_status()`` returns::

        with SourceHarness(TailSource, {"paths": [str(log)]}) as harness:
            log.write_text("hello\\n")
            harness.wait_for_events(1)
            assert harness.events[0].data["line"] == "hello"
    """

    def __init__(
        self,
        source_class: type,
        config: dict[str, Any],
        *,
        name: str = "test",
        agent_id: str = "test-agent",
        checkpoints: dict[str, str] | None = None,
        status: dict[str, Any] | None = None,
    ) -> None:
        from edge_agent.api import SourceContext

        built = plugin_config(source_class, config, name)
        self.events: list[Any] = []
        self.saved_checkpoints: dict[str, str] = dict(checkpoints or {})
        #: Events per successful commit, in order (how the source groups its commits).
        self.commit_sizes: list[int] = []
        self._lock = threading.Lock()
        self._failures = 0
        context = SourceContext(
            agent_id=agent_id,
            commit=self._commit,
            read_checkpoints=self._read_checkpoints,
            status=None if status is None else lambda: copy.deepcopy(status),
        )
        self.source = source_class(name=name, config=built, context=context)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"harness:{name}", daemon=True)

    def _commit(self, events: Any, checkpoint: Any) -> None:
        from edge_agent.errors import QueueError
        from edge_agent.event import check_event, encode_data

        with self._lock:
            if self._failures:
                self._failures -= 1
                raise QueueError("simulated commit failure")
            for event in events:
                check_event(event)
                encode_data(event.data)
            self.events.extend(events)
            self.commit_sizes.append(len(events))
            for key, value in (checkpoint or {}).items():
                if value is None:
                    self.saved_checkpoints.pop(key, None)
                else:
                    self.saved_checkpoints[key] = value

    def _read_checkpoints(self) -> dict[str, str]:
        with self._lock:
            return dict(self.saved_checkpoints)

    def _run(self) -> None:
        if not self.source.announces_listening:
            self.source.listening()
        try:
            self.source.run()
        except BaseException as exc:  # reported by stop() and wait_for_events()
            self.error = exc

    def fail_commits(self, count: int) -> None:
        """Make the next ``count`` commits raise QueueError."""
        with self._lock:
            self._failures = count

    def start(self) -> SourceHarness:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.source.stop()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"source {self.source.name} did not stop within {timeout}s")
        if self.error is not None:
            raise self.error

    def wait_listening(self, timeout: float = 10.0) -> None:
        """Wait until the source listens (see :meth:`edge_agent.Source.listening`)."""

        def listening() -> bool:
            if self.error is not None:
                raise self.error
            return self.source.is_listening.is_set()

        wait_for(listening, timeout, f"source {self.source.name} to listen")

    def wait_for_events(self, count: int, timeout: float = 10.0) -> list[Any]:
        """Wait until at least ``count`` events were committed; return them all."""

        def enough() -> bool:
            if self.error is not None:
                raise self.error
            with self._lock:
                return len(self.events) >= count

        wait_for(enough, timeout, f"{count} events from source {self.source.name}")
        with self._lock:
            return list(self.events)

    def __enter__(self) -> SourceHarness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def queued_events(events: list[Any], agent_id: str = "test-agent") -> list[Any]:
    """Turn :class:`edge_agent.Event` objects into the :class:`edge_agent.QueuedEvent` a
    sink receives."""
    from edge_agent.event import QueuedEvent, encode_attributes, encode_data

    sequences: dict[str, int] = {}
    result = []
    for position, event in enumerate(events, start=1):
        sequences[event.source] = sequences.get(event.source, 0) + 1
        result.append(
            QueuedEvent(
                position=position,
                id=event.id,
                source=event.source,
                type=event.type,
                time=event.time,
                subject=event.subject,
                sequence=sequences[event.source],
                data_json=encode_data(event.data),
                agent_id=agent_id,
                attributes_json=encode_attributes(event),
            )
        )
    return result


class SinkHarness:
    """Run one sink plugin against a list of events and see what it confirmed.

    Drives the sink the way the agent's forwarder does: ``open()``, then
    ``publish()`` with batches of at most ``max_batch`` events in order,
    handing over again whatever was not confirmed, then ``close()``::

        harness = SinkHarness(MySink, {"path": str(tmp_path / "out.jsonl")})
        confirmed = harness.deliver([Event(type="t.x", source="s", data={"n": 1})])
        assert len(confirmed) == 1

    Rejections (:meth:`edge_agent.Sink.reject`) are kept in :attr:`rejections`; an
    event rejected ``dead_letter_after`` times in a row once an event behind it
    was confirmed (or once, as invalid) is set aside as the forwarder would, in
    :attr:`dead_letters` as ``(event, reason)``, and not handed over again.
    """

    def __init__(
        self,
        sink_class: type,
        config: dict[str, Any],
        *,
        name: str = "test",
        agent_id: str = "test-agent",
        dead_letter_after: int = 3,
    ) -> None:
        built = plugin_config(sink_class, config, name)
        self.agent_id = agent_id
        self.dead_letter_after = dead_letter_after
        self.sink = sink_class(name=name, config=built, agent_id=agent_id)
        #: Every rejection the sink made, in order (:class:`edge_agent.Rejection`).
        self.rejections: list[Any] = []
        #: (event, reason) of each event set aside, in order.
        self.dead_letters: list[tuple[Any, str]] = []

    def deliver(self, events: list[Any], timeout: float = 10.0) -> list[Any]:
        """Publish ``events`` until each is confirmed or set aside, or ``timeout`` passes.

        Returns the events the sink confirmed, as :class:`edge_agent.QueuedEvent`.
        An exception from ``open()`` or ``publish()`` goes to the caller.
        """
        pending = queued_events(events, self.agent_id)
        confirmed: list[Any] = []
        refusals: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        self.sink.open()
        try:
            while pending and time.monotonic() < deadline:
                batch = pending[: self.sink.max_batch]
                try:
                    done = {e.position for e in self.sink.publish(batch)}
                except Exception:
                    self._judge(batch, set(), refusals)  # what it rejected before raising
                    raise
                confirmed += [e for e in batch if e.position in done]
                dead = self._judge(batch, done, refusals)
                pending = [e for e in pending if e.position not in done | dead]
        finally:
            self.sink.close()
        return confirmed

    def _judge(self, batch: list[Any], done: set[int], refusals: dict[int, int]) -> set[int]:
        handed = {e.position for e in batch}
        dead: set[int] = set()
        self._confirmed_up_to = max([getattr(self, "_confirmed_up_to", 0), *done])
        for rejection in self.sink.take_rejections():
            self.rejections.append(rejection)
            position = rejection.event.position
            if position not in handed or position in done or position in dead:
                continue
            if not rejection.permanent:
                continue
            refusals[position] = refusals.get(position, 0) + 1
            limit = self.dead_letter_after
            # As the agent: only once an event behind it was delivered.
            proven = self._confirmed_up_to > position
            if rejection.invalid or (limit and refusals[position] >= limit and proven):
                dead.add(position)
                self.dead_letters.append((rejection.event, rejection.reason))
        return dead


def shutdown_socket(sock: socket.socket) -> None:
    """Wake any thread blocked on ``sock`` (close() alone does not, on Linux)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class Listener:
    """A loopback listening socket with an accept thread that hands connections on."""

    def __init__(self, port: int, handle) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.sock.settimeout(0.05)  # lets the accept loop notice close() promptly
        self.closing = threading.Event()
        self.handle = handle
        self.thread = threading.Thread(target=self._accept, name=f"listen:{port}", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setblocking(True)
            if self.closing.is_set():
                conn.close()
                return
            self.handle(conn)

    def close(self) -> None:
        """Stop accepting and close the socket: new connections are refused from now on."""
        self.closing.set()
        self.thread.join(5)
        self.sock.close()


class CuttableProxy:
    """Forwards TCP from its own loopback port to ``upstream_port``; can be cut and restored."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.accepted = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._pumps: list[threading.Thread] = []
        self._listener: Listener | None = None
        self._flowing = threading.Event()
        self._flowing.set()
        self._upward = threading.Event()  # cleared: bytes to upstream are held back
        self._upward.set()

    def start(self) -> CuttableProxy:
        self._listener = Listener(self.port, self._handle)
        return self

    def _handle(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = (client, upstream)
        done = [0]
        with self._lock:
            self.accepted += 1
            self._pairs.add(pair)
            pumps = [
                threading.Thread(target=self._pump, args=(a, b, pair, done, gate), daemon=True)
                for a, b, gate in ((client, upstream, self._upward), (upstream, client, None))
            ]
            self._pumps.extend(pumps)
        for pump in pumps:
            pump.start()

    def _pump(self, source, target, pair, done, gate) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                if gate is not None:
                    gate.wait()
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in pair:  # one direction ended: end the other one too
                shutdown_socket(sock)
            with self._lock:
                done[0] += 1
                last = done[0] == 2
                if last:
                    self._pairs.discard(pair)
            if last:  # close only when neither pump can touch the sockets any more
                for sock in pair:
                    sock.close()

    def cut(self) -> None:
        """Drop every connection, and refuse new ones (the port is closed) until restore()."""
        with self._lock:
            self.cuts += 1
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            for sock in pair:
                shutdown_socket(sock)

    def stall(self) -> None:
        """Stop passing bytes on, keeping every connection open (a link that hangs)."""
        self._flowing.clear()

    def stall_to_upstream(self) -> None:
        """Hold back what clients send upstream, and only that: the upstream's answers
        still reach them (a client's acknowledgements that never arrive)."""
        self._upward.clear()

    def resume(self) -> None:
        """Pass bytes on again after stall() or stall_to_upstream(), those held back first."""
        self._upward.set()
        self._flowing.set()

    def restore(self) -> None:
        if self._listener is None:
            self._listener = Listener(self.port, self._handle)

    def stop(self) -> None:
        self.cut()
        self._flowing.set()  # a stalled pump sees its sockets shut and ends
        self._upward.set()
        with self._lock:
            pumps = list(self._pumps)
        for pump in pumps:
            pump.join(5)
