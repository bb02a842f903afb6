"""MQTT to MQTT forwarding, side by side: edge-agent, the ThingsBoard IoT Gateway and a
Mosquitto bridge, on the same load and the same faults.

A publisher sends N QoS 1 messages of about 100 bytes to a local broker, spread over 4
device topics (``devices/dev-0/telemetry`` ...), each carrying a unique serial. Each peer
forwards them at QoS 1 to an upstream broker, where a persistent QoS 1 subscriber counts
the unique serials in what arrives (each peer's own output form, parsed). Every broker is
started here on a free loopback port, with its own config and persistence folder.

Scenarios (each ``--runs`` times, on fresh brokers and a fresh peer):

- ``online``: throughput, from the first message published to the last one counted upstream
  (published by four mosquitto_pub processes, so that the publisher is not the limit);
- ``down``: the upstream broker is stopped during the burst and started again once the
  publisher is done: time to drain after it is back, messages lost, duplicates;
- ``kill``: the forwarder is killed with SIGKILL halfway through the burst and started
  again at once: messages lost, duplicates;
- ``idle``: nothing is published for ``--idle`` seconds: CPU % of one core (utime +
  stime from /proc/PID/stat over the window) and RSS of the forwarder's processes.

    .venv/bin/python bench/peers/mqtt_bridge.py                      # 3 runs: ~30-40 min
    .venv/bin/python bench/peers/mqtt_bridge.py --runs 1 --quick     # a smoke check
    .venv/bin/python bench/peers/mqtt_bridge.py --only tb-gateway --scenarios online

The ThingsBoard IoT Gateway is installed from PyPI into ``bench/peers/.venv-tb`` on first
use; see bench/peers/README.md for how each peer is configured and why.
"""

from __future__ import annotations

import os
import sys

# The bench folder holds queue.py, which would shadow the standard library's queue: keep
# bench/ and this folder off sys.path, and put the checkout's root on it for bench.common.
HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) not in (HERE, BENCH)]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import argparse  # noqa: E402
import atexit  # noqa: E402
import base64  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402

from bench.common import (  # noqa: E402
    agent_command,
    cpu_seconds,
    machine,
    package_version,
    rss_mib,
)
from edge_agent.testing import Mosquitto, wait_for  # noqa: E402

TB_VERSION = "3.8.5"
TB_VENV = os.path.join(HERE, ".venv-tb")
TB_PYTHON = os.path.join(TB_VENV, "bin", "python")
TB_COMMAND = os.path.join(TB_VENV, "bin", "thingsboard-gateway")

DEVICES = 4
PAYLOAD_BYTES = 100
#: Serials from here on are readiness probes, never counted.
PROBE_BASE = 1_000_000_000
#: What every broker here is told besides its listener and persistence: no limit on
#: the messages it queues for a client (Mosquitto's default, 1,000, drops the rest
#: silently: a user who cares about loss raises it) and 100 in flight per client.
BROKER_LIMITS = ["max_queued_messages 0", "max_queued_bytes 0", "max_inflight_messages 100"]
#: The Mosquitto bridge saves its persistence file this often (seconds); the default,
#: 1800, would keep nothing of a burst.
BRIDGE_AUTOSAVE = 30
#: Answer to the gateway's getSessionLimits RPC, as ThingsBoard itself would give.
SESSION_LIMITS = {
    "maxPayloadSize": 65536,
    "maxInflightMessages": 100,
    "rateLimits": {},
    "gatewayRateLimits": {},
}

PEERS = ["edge-agent", "tb-gateway", "bridge"]
SCENARIOS = ["online", "down", "kill", "idle"]


# -- everything this script starts is stopped at exit ---------------------------------


class Children:
    """The processes this script started (each in a process group of its own), so that
    whatever happens they are stopped at exit: SIGTERM to the group, then SIGKILL."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._processes: list[subprocess.Popen] = []

    def spawn(self, command: list[str], **options: Any) -> subprocess.Popen:
        with self._lock:
            process = subprocess.Popen(command, start_new_session=True, **options)
            self._processes.append(process)
            return process

    def stop(self, process: subprocess.Popen, timeout: float = 15.0) -> None:
        """SIGTERM to its group and wait; SIGKILL if it does not end in time."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(process)
        self._kill_group(process)
        self._forget(process)

    def kill(self, process: subprocess.Popen) -> None:
        """SIGKILL to its group, and reap it."""
        self._kill_group(process)
        process.wait()
        self._forget(process)

    def _kill_group(self, process: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def _forget(self, process: subprocess.Popen) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._processes.remove(process)

    def stop_all(self) -> None:
        with self._lock:
            left = list(self._processes)
        for process in left:
            self.stop(process, timeout=5)


CHILDREN = Children()


def _on_signal(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_cleanup() -> None:
    atexit.register(CHILDREN.stop_all)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)


# -- brokers -----------------------------------------------------------------------


class Broker(Mosquitto):
    """A Mosquitto of this script's own: its config (listener, persistence folder, limits,
    ``lines``) in ``directory``, started by :data:`CHILDREN`; it can be killed and
    restarted on the same port."""

    def __init__(self, directory: str, lines: list[str] | None = None) -> None:
        super().__init__(directory)
        self.lines = lines or []

    def write_config(self) -> None:
        config = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.directory}/",
            f"log_dest file {self.log_path}",
            *BROKER_LIMITS,
        ]
        if os.geteuid() == 0:
            config.append("user root")  # else it drops to 'mosquitto', who cannot write here
        with open(self.config_path, "w") as handle:
            handle.write("\n".join(config + self.lines) + "\n")

    def start(self, timeout: float = 15.0) -> Broker:
        self.write_config()
        binary = "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else "mosquitto"
        self.process = CHILDREN.spawn(
            [binary, "-c", self.config_path],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def listening() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"mosquitto ({self.config_path}) exited with {self.process.returncode}"
                )
            with contextlib.suppress(OSError), _connect(self.port):
                return True
            return False

        wait_for(listening, timeout, f"mosquitto to listen on port {self.port}")
        return self

    def stop(self) -> None:
        """SIGTERM (it saves its persistence file) and wait."""
        if self.process is not None:
            CHILDREN.stop(self.process)
            self.process = None

    def kill(self) -> None:
        if self.process is not None:
            CHILDREN.kill(self.process)
            self.process = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def _connect(port: int) -> Any:
    import socket

    return socket.create_connection(("127.0.0.1", port), timeout=0.2)


# -- what arrives upstream -------------------------------------------------------------


def serials_in(payload: bytes) -> list[int]:
    """The serials a forwarded message carries, whatever the peer made of the device's
    JSON: the message itself (bridge), ``{"dev-0": [{"ts": .., "values": {"serial": ..}}]}``
    (ThingsBoard), a CloudEvent or a batch of them, the device's message in ``data`` as
    JSON, as a JSON string or as ``data_base64`` (edge-agent)."""
    return [serial for serial, _event_id in serials_with_ids(payload)]


def serials_with_ids(payload: bytes) -> list[tuple[int, str | None]]:
    """(serial, id of the CloudEvent that carries it, or None) for each serial in
    ``payload`` (see :func:`serials_in`)."""
    try:
        document = json.loads(payload)
    except ValueError:
        return []
    found: list[tuple[int, str | None]] = []
    _walk(document, found, None)
    return found


def _walk(value: Any, found: list[tuple[int, str | None]], event_id: str | None) -> None:
    if isinstance(value, dict):
        if "specversion" in value and isinstance(value.get("id"), str):
            event_id = value["id"]
        serial = value.get("serial")
        if isinstance(serial, int) and not isinstance(serial, bool):
            found.append((serial, event_id))
        for key, item in value.items():
            if key == "data_base64" and isinstance(item, str):
                with contextlib.suppress(ValueError):
                    _walk_text(base64.b64decode(item), found, event_id)
            elif key != "serial":
                _walk(item, found, event_id)
    elif isinstance(value, list):
        for item in value:
            _walk(item, found, event_id)
    elif isinstance(value, str) and value[:1] in ("{", "["):
        _walk_text(value, found, event_id)


def _walk_text(
    text: str | bytes, found: list[tuple[int, str | None]], event_id: str | None
) -> None:
    with contextlib.suppress(ValueError):
        _walk(json.loads(text), found, event_id)


class Counter:
    """The upstream consumer: a persistent QoS 1 subscriber (clean session off, so what
    is forwarded while it reconnects is kept for it) that counts unique serials, the
    duplicates, and when the last new serial came. It also answers the ThingsBoard
    gateway's RPC requests, as ThingsBoard would.

    A message the broker delivers again to this subscriber (DUP set, after its own
    reconnect) is not counted as the peer's duplicate. For a peer that sends CloudEvents
    (edge-agent), each duplicate is also compared with the first copy of its serial: the
    same event id (a consumer can drop it) or a new one (it cannot)."""

    def __init__(self, port: int, topic: str) -> None:
        self.port = port
        self.topic = topic
        self.seen: set[int] = set()
        #: serial -> the event id of its first copy (CloudEvents only).
        self.first_id: dict[int, str] = {}
        self.duplicates = 0
        self.duplicates_same_id = 0
        self.duplicates_new_id = 0
        self.redelivered = 0
        self.messages = 0
        self.probes = 0
        self.last_new: float | None = None
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-counter-{uuid.uuid4().hex[:12]}",
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=False,
        )
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe([(self.topic, 1), ("v1/devices/me/rpc/request/+", 1)])

    def _on_message(self, client, userdata, message) -> None:
        try:
            if message.topic.startswith("v1/devices/me/rpc/request/"):
                request_id = message.topic.rsplit("/", 1)[1]
                client.publish(
                    f"v1/devices/me/rpc/response/{request_id}", json.dumps(SESSION_LIMITS), qos=1
                )
                return
            now = time.time()
            serials = serials_with_ids(message.payload)
            with self._lock:
                self.messages += 1
                for serial, event_id in serials:
                    if serial >= PROBE_BASE:
                        self.probes += 1
                    elif serial not in self.seen:
                        self.seen.add(serial)
                        self.last_new = now
                        if event_id is not None:
                            self.first_id[serial] = event_id
                    elif message.dup:
                        self.redelivered += 1
                    else:
                        self.duplicates += 1
                        first = self.first_id.get(serial)
                        if first is not None and event_id == first:
                            self.duplicates_same_id += 1
                        elif first is not None:
                            self.duplicates_new_id += 1
        except Exception as exc:  # a callback that raises ends paho's loop thread
            print(f"  counter: could not read a message on {message.topic}: {exc!r}")

    def start(self) -> Counter:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        if not self._subscribed.wait(15):
            raise RuntimeError(f"the counter's subscription on port {self.port} was not acked")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        # paho's thread may end on its own meanwhile; loop_stop() then trips over it.
        with contextlib.suppress(AttributeError):
            self.client.loop_stop()

    def missing(self, count: int, limit: int = 8) -> str:
        """The first ``limit`` ranges of serials below ``count`` that never came."""
        with self._lock:
            absent = [serial for serial in range(count) if serial not in self.seen]
        ranges: list[list[int]] = []
        for serial in absent:
            if ranges and ranges[-1][1] == serial - 1:
                ranges[-1][1] = serial
            else:
                ranges.append([serial, serial])
        shown = [f"{a}-{b}" if a != b else f"{a}" for a, b in ranges[:limit]]
        return ", ".join(shown) + (", ..." if len(ranges) > limit else "")

    @property
    def unique(self) -> int:
        with self._lock:
            return len(self.seen)

    def settle(self, expected: int, since: float, quiet: float, timeout: float) -> bool:
        """Wait until ``expected`` serials have come, or nothing new for ``quiet`` seconds
        (counting from ``since`` at the earliest), or ``timeout``. True if all came."""
        deadline = time.time() + timeout
        while True:
            with self._lock:
                count, last = len(self.seen), self.last_new
            if count >= expected:
                return True
            now = time.time()
            if now - max(last or since, since) > quiet or now > deadline:
                return False
            time.sleep(0.2)  # ok: poll interval, bounded by the checks above


# -- the publisher, a process of its own -------------------------------------------------


def publish(port: int, count: int, client_id: str) -> None:
    """Publish ``count`` device messages at QoS 1 (serials 0 .. count-1) from a persistent
    session, reconnecting as needed, and print progress lines for the parent:
    ``start T``, ``acked N`` every 250, ``done T``."""
    acked = [0]
    done = threading.Event()
    lock = threading.Lock()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv311,
        clean_session=False,
    )
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(0.1, 1)

    def on_publish(*_args: Any) -> None:
        with lock:
            acked[0] += 1
            if acked[0] % 250 == 0:
                print(f"acked {acked[0]}", flush=True)
            if acked[0] >= count:
                done.set()

    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    base_ms = int(time.time() * 1000)
    print(f"start {time.time()}", flush=True)
    for serial in range(count):
        client.publish(
            f"devices/dev-{serial % DEVICES}/telemetry", device_message(serial, base_ms), 1
        )
    if not done.wait(900):
        print(f"error only {acked[0]} of {count} acknowledged within 15 min", flush=True)
        sys.exit(1)
    print(f"done {time.time()}", flush=True)
    client.disconnect()
    client.loop_stop()


def device_message(serial: int, base_ms: int) -> bytes:
    """About 100 bytes of JSON, as a sensor would send: serial, timestamp, a reading."""
    head = f'{{"serial":{serial},"ts":{base_ms + serial},"temp":{20 + serial % 50 / 10:.1f},"pad":"'
    return (head + "x" * max(0, PAYLOAD_BYTES - len(head) - 2) + '"}').encode()


class Publisher:
    """:func:`publish` in a child process (its own interpreter, as a device would be)."""

    def __init__(self, port: int, count: int) -> None:
        self.count = count
        self.started: float | None = None
        self.finished: float | None = None
        self.acked = 0
        self.error: str | None = None
        self.process = CHILDREN.spawn(
            [sys.executable, __file__, "--publisher", str(port), str(count)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            word, _, rest = line.strip().partition(" ")
            if word == "start":
                self.started = float(rest)
            elif word == "acked":
                self.acked = int(rest)
            elif word == "done":
                self.acked = self.count
                self.finished = float(rest)
            elif word == "error":
                self.error = rest

    def wait_acked(self, count: int, timeout: float) -> None:
        def reached() -> bool:
            if self.process.poll() is not None:
                self._reader.join(5)  # the lines it printed before it exited
                if self.acked >= count:
                    return True
                raise RuntimeError(f"the publisher exited: {self.error or self.process.returncode}")
            return self.acked >= count

        wait_for(reached, timeout, f"the publisher to have {count:,} messages acknowledged")

    def wait_started(self, timeout: float = 30) -> float:
        wait_for(lambda: self.started is not None, timeout, "the publisher to start")
        assert self.started is not None
        return self.started

    def stop(self) -> None:
        CHILDREN.stop(self.process, timeout=5)


class CPublishers:
    """The ``online`` load: one mosquitto_pub process (C) per device topic at QoS 1, fed
    the same messages as :func:`publish`. A Python publisher tops out near 19,000
    messages/s on a 2-core machine, below what the fastest peers take, so it would
    measure itself; the fault scenarios keep :class:`Publisher` for its acknowledged
    count (when to kill) and its persistent session."""

    def __init__(self, port: int, count: int) -> None:
        command = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
        base_ms = int(time.time() * 1000)
        tag = uuid.uuid4().hex[:8]
        shares = [
            b"".join(device_message(serial, base_ms) + b"\n" for serial in range(k, count, DEVICES))
            for k in range(DEVICES)
        ]
        base = [command, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-l"]
        self.started = time.time()
        self.children = [
            CHILDREN.spawn(
                [*base, "-i", f"bench-pub-{tag}-{k}", "-t", f"devices/dev-{k}/telemetry"],
                stdin=subprocess.PIPE,
            )
            for k in range(DEVICES)
        ]
        # A thread per child: a pipe holds 64 KiB, so they are fed side by side.
        self._feeders = [
            threading.Thread(target=self._feed, args=(child, data), daemon=True)
            for child, data in zip(self.children, shares, strict=True)
        ]
        for feeder in self._feeders:
            feeder.start()

    @staticmethod
    def _feed(child: subprocess.Popen, data: bytes) -> None:
        assert child.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it failed: its status says why
            child.stdin.write(data)
            child.stdin.close()

    def wait_started(self, timeout: float = 30) -> float:
        return self.started

    def stop(self) -> None:
        for feeder in self._feeders:
            feeder.join(5)
        for child in self.children:
            CHILDREN.stop(child, timeout=30)


class Prober:
    """Sends a probe message every half second until the counter has seen one: the
    whole path (local broker, forwarder, upstream) is working."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-probe-{uuid.uuid4().hex[:12]}",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.serial = PROBE_BASE

    def wait_through(self, counter: Counter, timeout: float, check: Callable[[], None]) -> float:
        began = time.time()
        deadline = began + timeout
        while counter.probes == 0:
            check()
            if time.time() > deadline:
                raise RuntimeError(f"no probe message came through within {timeout:g}s")
            self.serial += 1
            topic = f"devices/dev-{self.serial % DEVICES}/telemetry"
            self.client.publish(topic, device_message(self.serial, int(time.time() * 1000)), 1)
            time.sleep(0.5)  # ok: the probe interval, bounded by the deadline above
        self.client.disconnect()
        self.client.loop_stop()
        return time.time() - began


# -- the peers ---------------------------------------------------------------------------


class Peer:
    """One forwarder under test: started in ``folder`` between the local broker it reads
    (``local_port``) and the upstream broker (``upstream_port``)."""

    name = ""
    topic = ""  # what the counter subscribes to upstream

    def __init__(self, folder: str, upstream_port: int) -> None:
        self.folder = folder
        self.upstream_port = upstream_port
        self.local: Broker | None = None

    @property
    def local_port(self) -> int:
        assert self.local is not None
        return self.local.port

    def start(self) -> None:
        """The local broker and the forwarder."""
        raise NotImplementedError

    def kill(self) -> None:
        """SIGKILL the forwarder."""
        raise NotImplementedError

    def restart(self) -> None:
        """Start the forwarder again, on the state it left."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        """The forwarder's processes (for CPU and RSS)."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise if the forwarder has exited."""

    def stop(self) -> None:
        raise NotImplementedError

    def log_tail(self) -> str:
        return ""


class BridgePeer(Peer):
    """Mosquitto as a bridge: the local broker itself forwards ``devices/#`` at QoS 1
    (``cleansession false``, persistence on, autosave every BRIDGE_AUTOSAVE s)."""

    name = "bridge"
    topic = "devices/#"

    def start(self) -> None:
        self.local = Broker(
            os.path.join(self.folder, "bridge"),
            [
                f"autosave_interval {BRIDGE_AUTOSAVE}",
                "",
                "connection upstream",
                f"address 127.0.0.1:{self.upstream_port}",
                "topic devices/# out 1",
                "cleansession false",
                "clientid bench-bridge",
            ],
        ).start()

    def kill(self) -> None:
        assert self.local is not None
        self.local.kill()

    def restart(self) -> None:
        assert self.local is not None
        self.local.start()

    def pids(self) -> list[int]:
        assert self.local is not None
        return [self.local.pid]

    def check(self) -> None:
        process = self.local.process if self.local is not None else None
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the bridge exited with {process.returncode}")

    def stop(self) -> None:
        if self.local is not None:
            self.local.stop()

    def log_tail(self) -> str:
        return _tail(self.local.log_path) if self.local else ""


class ProcessPeer(Peer):
    """A forwarder that is a process of its own, beside a plain local broker."""

    def __init__(self, folder: str, upstream_port: int) -> None:
        super().__init__(folder, upstream_port)
        self.process: subprocess.Popen | None = None
        self.log_path = os.path.join(folder, f"{self.name}.log")

    def start(self) -> None:
        self.local = Broker(os.path.join(self.folder, "local")).start()
        self.prepare()
        self.spawn()

    def prepare(self) -> None:
        """Write the forwarder's config."""

    def spawn(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        if self.process is not None:
            CHILDREN.kill(self.process)
            self.process = None

    def restart(self) -> None:
        self.spawn()

    def pids(self) -> list[int]:
        assert self.process is not None
        return process_tree(self.process.pid)

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.process.returncode}; its log ends:\n"
                + self.log_tail()
            )

    def stop(self) -> None:
        if self.process is not None:
            CHILDREN.stop(self.process, timeout=20)
            self.process = None
        if self.local is not None:
            self.local.stop()

    def log_tail(self) -> str:
        return _tail(self.log_path)


class TbGatewayPeer(ProcessPeer):
    """The ThingsBoard IoT Gateway with its MQTT connector: JSON config in a folder of
    its own (``TB_GW_CONFIG_DIR``), sqlite storage, remote configuration and statistics
    off, a persistent session on the local broker."""

    name = "tb-gateway"
    topic = "v1/gateway/telemetry"

    def prepare(self) -> None:
        package = tb_package_dir()
        self.config_dir = os.path.join(self.folder, "tb-config")
        os.makedirs(self.config_dir)
        os.makedirs(os.path.join(self.folder, "logs"))
        os.makedirs(os.path.join(self.folder, "data"))
        with open(os.path.join(package, "config", "tb_gateway.json")) as handle:
            main = json.load(handle)
        board = main["thingsboard"]
        board.update(host="127.0.0.1", port=self.upstream_port, remoteConfiguration=False)
        board["remoteShell"] = False
        board["statistics"]["enable"] = False
        board["security"] = {"type": "accessToken", "accessToken": "bench-gateway"}
        main["storage"] = {
            "type": "sqlite",
            "data_file_path": "./data/",
            "messages_ttl_check_in_hours": 1,
            "messages_ttl_in_days": 7,
        }
        main["connectors"] = [
            {"type": "mqtt", "name": "MQTT Broker Connector", "configuration": "mqtt.json"}
        ]
        self._write("tb_gateway.json", main)
        shutil.copy(os.path.join(package, "config", "logs.json"), self.config_dir)
        self._write("mqtt.json", tb_mqtt_connector(self.local_port))

    def _write(self, name: str, document: dict) -> None:
        with open(os.path.join(self.config_dir, name), "w") as handle:
            json.dump(document, handle, indent=2)

    def spawn(self) -> None:
        env = dict(os.environ)
        env["TB_GW_CONFIG_DIR"] = self.config_dir + os.sep
        # Its update check posts to updates.thingsboard.io: keep it on loopback (it fails
        # at once, as it does on a device without internet access).
        env["HTTPS_PROXY"] = env["HTTP_PROXY"] = "http://127.0.0.1:9"
        env["NO_PROXY"] = "127.0.0.1,localhost"
        with open(self.log_path, "a") as log:
            self.process = CHILDREN.spawn(
                [TB_COMMAND],
                cwd=self.folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )


def tb_mqtt_connector(port: int) -> dict:
    """The gateway's MQTT connector: the 4 device topics, JSON, device name from the
    topic, serial and temperature as time series, timestamps from the messages; a
    persistent session (clean start off, 1 h expiry) so the broker keeps what comes
    while the gateway is down."""
    return {
        "broker": {
            "host": "127.0.0.1",
            "port": port,
            "clientId": "bench-tb-gateway",
            "version": 5,
            "maxMessageNumberPerWorker": 10,
            "maxNumberOfWorkers": 100,
            "cleanSession": False,
            "cleanStart": False,
            "sessionExpiryInterval": 3600,
            "security": {"type": "anonymous"},
        },
        "mapping": [
            {
                "topicFilter": "devices/+/telemetry",
                "subscriptionQos": 1,
                "converter": {
                    "type": "json",
                    "deviceInfo": {
                        "deviceNameExpressionSource": "topic",
                        "deviceNameExpression": "(?<=devices/)(.*?)(?=/telemetry)",
                        "deviceProfileExpressionSource": "constant",
                        "deviceProfileExpression": "default",
                    },
                    "sendDataOnlyOnChange": False,
                    "timeout": 60000,
                    "attributes": [],
                    "timeseries": [
                        {"type": "integer", "key": "serial", "value": "${serial}"},
                        {"type": "double", "key": "temp", "value": "${temp}"},
                    ],
                },
            }
        ],
        "requestsMapping": {
            "connectRequests": [],
            "disconnectRequests": [],
            "attributeRequests": [],
            "attributeUpdates": [],
            "serverSideRpc": [],
        },
    }


class EdgeAgentPeer(ProcessPeer):
    """edge-agent with its ``mqtt`` source and ``mqtt`` sink, on their defaults apart from
    the addresses, a persistent upstream session and ``batch_max_events`` (the README's
    setting above about 5,000 events/s: ``--edge-agent-batch``, default 100)."""

    name = "edge-agent"
    topic = "up/#"
    #: The sink's batch_max_events (1: one event per message).
    batch = 100

    def prepare(self) -> None:
        self.config_path = os.path.join(self.folder, "agent.toml")
        with open(self.config_path, "w") as handle:
            handle.write(
                f"""[agent]
id = "bench"
state_dir = "{os.path.join(self.folder, "state")}"

[[sources.mqtt]]
name = "devices"
host = "127.0.0.1"
port = {self.local_port}
topics = ["devices/#"]
qos = 1

[[sinks.mqtt]]
name = "upstream"
host = "127.0.0.1"
port = {self.upstream_port}
qos = 1
topic = "up/{{source}}/{{type}}"
clean_start = false
session_expiry = "1h"
batch_max_events = {self.batch}
"""
            )

    def spawn(self) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "EDGE_AGENT_CONFIG")
        }
        with open(self.log_path, "a") as log:
            self.process = CHILDREN.spawn(
                [*agent_command(), "run", "-c", self.config_path],
                cwd=self.folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )


PEER_CLASSES: dict[str, type[Peer]] = {
    "edge-agent": EdgeAgentPeer,
    "tb-gateway": TbGatewayPeer,
    "bridge": BridgePeer,
}


def _tail(path: str, lines: int = 15) -> str:
    with contextlib.suppress(OSError), open(path, errors="replace") as handle:
        return "\n".join(handle.read().splitlines()[-lines:])
    return ""


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


# -- availability and versions ----------------------------------------------------------


def tb_package_dir() -> str:
    code = "import os, thingsboard_gateway as t; print(os.path.dirname(t.__file__))"
    result = subprocess.run([TB_PYTHON, "-c", code], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def ensure_tb_gateway() -> str | None:
    """Install the gateway into its venv if it is not there; None, or why it is missing."""
    marker = os.path.join(TB_VENV, f".installed-{TB_VERSION}")
    if os.path.exists(marker):
        return None
    print(f"installing thingsboard-gateway=={TB_VERSION} into {os.path.relpath(TB_VENV)} ...")
    try:
        if not os.path.exists(TB_PYTHON):
            subprocess.run([sys.executable, "-m", "venv", TB_VENV], check=True)
        subprocess.run(
            [
                TB_PYTHON,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                f"thingsboard-gateway=={TB_VERSION}",
            ],
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"could not install thingsboard-gateway=={TB_VERSION}: {exc}"
    open(marker, "w").close()
    return None


def edge_agent_source_missing() -> str | None:
    """None if this checkout's edge-agent has an ``mqtt`` source; else why not."""
    code = (
        "from edge_agent.plugin_host import load_plugins\n"
        "import sys\n"
        "print('ok' if 'mqtt' in load_plugins().sources else 'missing')\n"
    )
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
        )
        if result.stdout.strip().endswith("ok"):
            return None
    return "source not available: this edge-agent has no `mqtt` source plugin"


def versions() -> dict[str, str]:
    info = machine()
    tb = "not installed"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        code = "from importlib.metadata import version; print(version('thingsboard-gateway'))"
        tb = (
            subprocess.run(
                [TB_PYTHON, "-c", code], capture_output=True, text=True, timeout=30
            ).stdout.strip()
            or "not installed"
        )
    return {
        "edge_agent": package_version("edge-event-agent"),
        "tb_gateway": tb,
        "mosquitto": info["mosquitto"],
        "python": info["python"],
        "kernel": info["kernel"],
        "cpu_model": info["cpu_model"],
        "cpus": info["cpus"],
        "date": info["date"],
    }


# -- one run of one scenario --------------------------------------------------------------


class Settings:
    def __init__(self, args: argparse.Namespace) -> None:
        self.count = args.count or (2_000 if args.quick else 20_000)
        self.idle = args.idle or (10.0 if args.quick else 60.0)
        self.quiet = 15.0 if args.quick else 30.0  # no new serial this long: it is over
        self.timeout = 300.0 if args.quick else 900.0


def run_once(peer_name: str, scenario: str, settings: Settings, parent: str) -> dict[str, Any]:
    """Fresh brokers, a fresh peer; one scenario; its figures."""
    folder = tempfile.mkdtemp(prefix=f"{peer_name}-{scenario}-", dir=parent)
    upstream = Broker(os.path.join(folder, "upstream")).start()
    counter = Counter(upstream.port, PEER_CLASSES[peer_name].topic).start()
    peer = PEER_CLASSES[peer_name](folder, upstream.port)
    publisher: Publisher | CPublishers | None = None
    n = settings.count
    try:
        peer.start()
        ready = Prober(peer.local_port).wait_through(counter, 120, peer.check)
        result: dict[str, Any] = {"ready_s": ready}
        if scenario == "idle":
            time.sleep(2)  # ok: let the probes' work end before the window
            pids = peer.pids()
            before = sum(cpu_seconds(pid) for pid in pids)
            time.sleep(settings.idle)  # ok: the idle window being measured
            peer.check()
            used = sum(cpu_seconds(pid) for pid in pids) - before
            result["cpu_pct"] = 100 * used / settings.idle
            result["rss_mib"] = sum(rss_mib(pid) for pid in peer.pids())
            return result
        if scenario == "down":
            upstream.stop()
        if scenario == "online":
            publisher = CPublishers(peer.local_port, n)
        else:
            publisher = Publisher(peer.local_port, n)
        began = publisher.wait_started()
        if scenario == "online":
            counter.settle(n, began, settings.quiet, settings.timeout)
            end = counter.last_new or time.time()
            result["seconds"] = end - began
            result["rate"] = counter.unique / (end - began)
        elif scenario == "down":
            publisher.wait_acked(n, settings.timeout)
            time.sleep(1)  # ok: upstream stays down a moment after the burst
            peer.check()
            upstream.start()
            back = time.time()
            counter.settle(n, back, settings.quiet, settings.timeout)
            result["drain_s"] = (counter.last_new or back) - back
        elif scenario == "kill":
            publisher.wait_acked(n // 2, settings.timeout)
            peer.kill()
            result["killed_at"] = publisher.acked
            peer.restart()
            publisher.wait_acked(n, settings.timeout)
            counter.settle(n, time.time(), settings.quiet, settings.timeout)
        peer.check()
        result.update(
            received=counter.unique,
            lost=n - counter.unique,
            duplicates=counter.duplicates,
            redelivered_to_counter=counter.redelivered,
        )
        if peer_name == "edge-agent":
            result.update(
                duplicates_same_id=counter.duplicates_same_id,
                duplicates_new_id=counter.duplicates_new_id,
            )
        if result["lost"]:
            result["missing"] = counter.missing(n)
        return result
    except Exception as exc:
        tail = peer.log_tail()
        raise RuntimeError(f"{exc}\n  {peer.name}'s log ends:\n{tail}") from exc
    finally:
        if publisher is not None:
            publisher.stop()
        peer.stop()
        counter.stop()
        upstream.stop()


# -- the table ---------------------------------------------------------------------------

#: (scenario, key, column heading, format)
COLUMNS = [
    ("online", "rate", "online msg/s", "{:,.0f}"),
    ("down", "drain_s", "down: drain s", "{:.1f}"),
    ("down", "lost", "down: lost", "{:,.0f}"),
    ("down", "duplicates", "down: dup", "{:,.0f}"),
    ("down", "duplicates_new_id", "down: dup, new id", "{:,.0f}"),
    ("kill", "lost", "kill -9: lost", "{:,.0f}"),
    ("kill", "duplicates", "kill -9: dup", "{:,.0f}"),
    ("kill", "duplicates_new_id", "kill -9: dup, new id", "{:,.0f}"),
    ("idle", "cpu_pct", "idle CPU %", "{:.2f}"),
    ("idle", "rss_mib", "idle RSS MiB", "{:.1f}"),
]


def summary(values: list[float], fmt: str) -> str:
    """The median, and the spread (min-max) when there is more than one run."""
    if not values:
        return "-"
    text = fmt.format(statistics.median(values))
    if len(values) > 1:
        text += f" ({fmt.format(min(values))}-{fmt.format(max(values))})"
    return text


def print_table(results: dict[str, Any], scenarios: list[str]) -> None:
    columns = [c for c in COLUMNS if c[0] in scenarios]
    print("| peer | " + " | ".join(c[2] for c in columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for peer, entry in results.items():
        if entry.get("unavailable"):
            print(f"| {peer} | {entry['unavailable']} |" + " |" * (len(columns) - 1))
            continue
        cells = []
        for scenario, key, _, fmt in columns:
            runs = entry["runs"].get(scenario, [])
            failed = [r for r in runs if "error" in r]
            values = [r[key] for r in runs if key in r]
            cell = summary(values, fmt)
            if failed:
                cell += f" ({len(failed)} FAILED)"
            cells.append(cell)
        print(f"| {peer} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per peer and scenario")
    parser.add_argument("--quick", action="store_true", help="2,000 messages, 10 s idle")
    parser.add_argument("--only", default=",".join(PEERS), help=f"among {','.join(PEERS)}")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"among {','.join(SCENARIOS)}"
    )
    parser.add_argument("-n", "--count", type=int, help="messages per burst (default 20,000)")
    parser.add_argument("--idle", type=float, help="idle window, seconds (default 60)")
    parser.add_argument(
        "--edge-agent-batch",
        type=int,
        default=EdgeAgentPeer.batch,
        metavar="N",
        help="edge-agent's sink batch_max_events (default %(default)s, the README's setting"
        " for high rates; 1: one event per message)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure here")
    parser.add_argument("--dir", help="where to make the temporary folder (default: here)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    peers = [p for p in args.only.split(",") if p]
    scenarios = [s for s in args.scenarios.split(",") if s]
    if not peers or set(peers) - set(PEERS):
        parser.error(f"--only takes names among {', '.join(PEERS)}")
    if not scenarios or set(scenarios) - set(SCENARIOS):
        parser.error(f"--scenarios takes names among {', '.join(SCENARIOS)}")
    settings = Settings(args)
    if args.edge_agent_batch < 1:
        parser.error("--edge-agent-batch takes 1 or more")
    EdgeAgentPeer.batch = args.edge_agent_batch
    install_cleanup()

    results: dict[str, Any] = {}
    for peer in peers:
        missing = None
        if peer == "tb-gateway":
            missing = ensure_tb_gateway()
        elif peer == "edge-agent":
            missing = edge_agent_source_missing()
        results[peer] = {"unavailable": missing} if missing else {"runs": {}}
        if missing:
            print(f"{peer}: {missing}")
    info = versions()
    parent = tempfile.mkdtemp(prefix=".bench-peers-", dir=args.dir or os.getcwd())
    began = time.monotonic()
    try:
        for run in range(args.runs):
            for scenario in scenarios:
                for peer in peers:
                    if results[peer].get("unavailable"):
                        continue
                    print(f"run {run + 1}/{args.runs}: {peer}, {scenario} ...", flush=True)
                    try:
                        figures = run_once(peer, scenario, settings, parent)
                    except RuntimeError as exc:
                        print(f"  FAILED: {exc}")
                        figures = {"error": str(exc)}
                    print("  " + json.dumps({k: _round(v) for k, v in figures.items()}))
                    results[peer]["runs"].setdefault(scenario, []).append(figures)
    except KeyboardInterrupt:
        print("interrupted: stopping what this script started")
        return 130
    finally:
        CHILDREN.stop_all()
        if args.keep:
            print(f"kept {parent}")
        else:
            shutil.rmtree(parent, ignore_errors=True)

    print(
        "\n===== MQTT forwarding side by side"
        + (" (QUICK: small counts, a smoke check)" if args.quick else "")
    )
    print(f"date:      {info['date']}, took {time.monotonic() - began:.0f}s")
    print(f"machine:   {info['cpus']} CPUs ({info['cpu_model']}), Linux {info['kernel']}")
    print(
        f"versions:  edge-agent {info['edge_agent']}, thingsboard-gateway {info['tb_gateway']},"
        f" Mosquitto {info['mosquitto']}, Python {info['python']}"
    )
    print(
        f"load:      {settings.count:,} QoS 1 messages of {PAYLOAD_BYTES} bytes on {DEVICES}"
        f" topics; idle window {settings.idle:g}s; median of {args.runs} (min-max)"
    )
    print(f"edge-agent: sink batch_max_events = {EdgeAgentPeer.batch}\n")
    print_table(results, scenarios)
    if args.json:
        document = {
            "versions": info,
            "count": settings.count,
            "idle_s": settings.idle,
            "edge_agent_batch_max_events": EdgeAgentPeer.batch,
        }
        document["results"] = results
        with open(args.json, "w") as handle:
            json.dump(document, handle, indent=1)
    failed = any(
        "error" in r for e in results.values() for rs in e.get("runs", {}).values() for r in rs
    )
    return 1 if failed else 0


def _round(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


if __name__ == "__main__":
    if sys.argv[1:2] == ["--publisher"]:
        publish(int(sys.argv[2]), int(sys.argv[3]), f"bench-publisher-{uuid.uuid4().hex[:12]}")
        sys.exit(0)
    sys.exit(main())
