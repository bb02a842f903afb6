"""What the benchmark scripts share: the machine and versions, the real agent as a child
process, a broker, a subscriber that notes when events arrive, process figures from
/proc, and the result file that bench/run_all.py builds its table from.

The scripts import it as ``bench.common``, with the checkout's root on ``sys.path`` and
never this folder (``bench/queue.py`` would shadow the standard library's ``queue``)::

    HERE = os.path.dirname(os.path.abspath(__file__))
    ROOT = os.path.dirname(HERE)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from bench.common import ...  # noqa: E402
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_agent.testing import Mosquitto, mosquitto_binary, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: Broker settings of every benchmark: 100 messages in flight per client (the sink's
#: default max_inflight, and the Receive Maximum it is told), no queue limit.
BROKER_CONFIG = "max_inflight_messages 100\nmax_queued_messages 0"


# -- the machine and the versions ---------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or what platform knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def package_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def mosquitto_version() -> str:
    """``2.0.11`` from the first line of ``mosquitto -h``."""
    try:
        output = subprocess.run(
            [mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        return "not installed"
    words = output.split()
    return words[words.index("version") + 1] if "version" in words[:-1] else "unknown"


def disk_of(path: str) -> str:
    """Device, filesystem type and mount point of ``path`` (Linux), and the free space."""
    real = os.path.realpath(path)
    stat = os.statvfs(real)
    free = f"{stat.f_bavail * stat.f_frsize / 1024**3:.0f} GiB free"
    best: tuple[str, str, str] | None = None
    with contextlib.suppress(OSError, IndexError), open("/proc/self/mountinfo") as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            mount = left.split()[4].replace("\\040", " ")
            fstype, device = right.split()[:2]
            inside = real == mount or real.startswith(mount.rstrip("/") + "/")
            if inside and (best is None or len(mount) >= len(best[0])):
                best = (mount, fstype, device)
    if best is None:
        return f"{real} ({free})"
    mount, fstype, device = best
    return f"{device} {fstype} on {mount} ({free})"


def machine() -> dict[str, Any]:
    """What the figures depend on: CPUs, kernel, versions, the date."""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "arch": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "paho_mqtt": package_version("paho-mqtt"),
        "mosquitto": mosquitto_version(),
        "edge_agent": package_version("edge-event-agent"),
    }


def print_machine(info: dict[str, Any], disk: str | None = None) -> None:
    """The header every script starts with."""
    print(f"date:      {info['date']}")
    print(
        f"machine:   {info['cpus']} CPUs ({info['cpu_model']}), {info['arch']},"
        f" Linux {info['kernel']}"
    )
    print(
        f"versions:  edge-agent {info['edge_agent']}, Python {info['python']},"
        f" SQLite {info['sqlite']}, paho-mqtt {info['paho_mqtt']},"
        f" Mosquitto {info['mosquitto']}"
    )
    if disk:
        print(f"disk:      {disk}: {disk_of(disk)}")


# -- figures ---------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(ordered: list[float], fraction: float) -> float:
    """The nearest-rank percentile of an already sorted list: 0.99 for p99."""
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def runs_text(values: list[float], fmt: str = "{:,.0f}") -> str:
    """Every run's figure, for the line under a median."""
    return ", ".join(fmt.format(v) for v in values)


def verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


# -- a process, seen from /proc -------------------------------------------------------


def _status_fields(pid: int | str) -> dict[str, str]:
    """/proc/PID/status (or /proc/PID/task/TID/status) as a dict."""
    fields = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def rss_mib(pid: int) -> float:
    """Resident memory now (VmRSS), MiB."""
    return int(_status_fields(pid).get("VmRSS", "0 kB").split()[0]) / 1024


def peak_rss_mib(pid: int) -> float:
    """The most resident memory the process ever had (VmHWM), MiB."""
    return int(_status_fields(pid).get("VmHWM", "0 kB").split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds_exact(pid: int) -> float | None:
    """Time on a CPU of the process's current threads, from the scheduler's own count
    (``/proc/PID/task/*/schedstat``, nanoseconds): exact for a process that is mostly
    asleep, where utime and stime, counted in clock ticks, are a sample. None if the
    kernel does not keep it."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as handle:
                total += int(handle.read().split()[0])
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        except (OSError, ValueError, IndexError):
            return None
    return total / 1e9


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def wakeups(pid: int) -> int:
    """Context switches of all the process's threads so far: how often it woke up."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            fields = _status_fields(f"{pid}/task/{task}")
            total += int(fields.get("voluntary_ctxt_switches", 0))
            total += int(fields.get("nonvoluntary_ctxt_switches", 0))
    return total


def written_bytes(pid: int) -> int | None:
    """Bytes the process caused to be written to storage so far, or None if not readable."""
    try:
        with open(f"/proc/{pid}/io") as handle:
            for line in handle:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# -- a temporary folder on the disk being measured ---------------------------------


@contextlib.contextmanager
def workdir(prefix: str, parent: str | None = None, keep: bool = False) -> Iterator[str]:
    """A fresh folder in ``parent`` (default: the current directory, not a tmpfs /tmp:
    fsync cost matters), removed at the end unless ``keep``."""
    folder = tempfile.mkdtemp(prefix=f".bench-{prefix}-", dir=parent or os.getcwd())
    try:
        yield folder
    finally:
        if keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def start_broker(folder: str) -> Mosquitto:
    """A Mosquitto of the benchmark's own, on a free loopback port."""
    return Mosquitto(os.path.join(folder, "mosquitto"), extra_config=BROKER_CONFIG).start()


# -- the agent as a real process ------------------------------------------------------


def agent_command() -> list[str]:
    """``edge-agent`` next to this interpreter (the venv's), else ``python -m edge_agent``."""
    script = os.path.join(os.path.dirname(sys.executable), "edge-agent")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "edge_agent"]


def plugin_table(section: str, **values: Any) -> str:
    """One ``[[sources.tail]]``-style table: ``plugin_table("sources.tail", name="app", ...)``.

    Values are written as JSON, which TOML reads the same for strings, numbers and lists.
    """
    lines = [f"[[{section}]]"] + [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n\n"


def sink_toml(port: int, agent_id: str, **options: Any) -> str:
    """An ``[[sinks.mqtt]]`` table for the benchmark's broker, with a status topic
    (``bench/<agent>/status``) whose retained "online" says the sink is connected."""
    values = {
        "name": "local",
        "host": "127.0.0.1",
        "port": port,
        "qos": 1,
        "protocol": "5",
        "status_topic": status_topic(agent_id),
        "reconnect_min": "0.1s",
        "reconnect_max": "1s",
        **options,
    }
    return plugin_table("sinks.mqtt", **values)


def status_topic(agent_id: str) -> str:
    return f"bench/{agent_id}/status"


def agent_toml(agent_id: str, state_dir: str, tables: str) -> str:
    """A whole config: the ``[agent]`` table, then ``tables`` (sources, sinks)."""
    head = textwrap.dedent(
        f"""\
        [agent]
        id = "{agent_id}"
        state_dir = "{state_dir}"
        log_level = "info"
        shutdown_grace = "2s"
        """
    )
    return head + "\n" + tables


class NotifySocket:
    """A Unix datagram socket standing in for systemd's ``$NOTIFY_SOCKET``.

    A thread reads every datagram as it comes (the kernel queues only a few, and
    the agent's sd_notify blocks when the queue is full) and notes when READY=1 came.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.5)
        self.ready_at: float | None = None
        self.ready = threading.Event()
        self.messages: list[str] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closing.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.perf_counter()
            text = data.decode("utf-8", "replace")
            self.messages.append(text)
            if "READY=1" in text.split("\n") and self.ready_at is None:
                self.ready_at = now
                self.ready.set()

    def close(self) -> None:
        self._closing.set()
        self._thread.join(2)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class AgentProcess:
    """``edge-agent run -c FILE`` as a child process, on a config written into ``folder``."""

    def __init__(self, folder: str, config_text: str) -> None:
        self.folder = folder
        self.config_path = os.path.join(folder, "agent.toml")
        self.log_path = os.path.join(folder, "agent.log")
        with open(self.config_path, "w") as handle:
            handle.write(config_text)
        self.process: subprocess.Popen | None = None
        self.notify: NotifySocket | None = None
        self.spawned_at = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> AgentProcess:
        """Spawn it, with ``$NOTIFY_SOCKET`` pointing at a socket of our own."""
        self.notify = NotifySocket(os.path.join(self.folder, "notify.sock"))
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "EDGE_AGENT_CONFIG")
        }
        env["NOTIFY_SOCKET"] = self.notify.path
        with open(self.log_path, "a") as log:
            self.spawned_at = time.perf_counter()
            self.process = subprocess.Popen(
                [*agent_command(), "run", "-c", self.config_path],
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait for READY=1; return the seconds from spawn to READY."""
        assert self.notify is not None

        def ready() -> bool:
            self.check_running()
            return self.notify.ready.is_set()

        self.wait(ready, timeout, "the agent's READY=1")
        assert self.notify.ready_at is not None
        return self.notify.ready_at - self.spawned_at

    def wait(self, condition: Callable[[], Any], timeout: float, what: str) -> None:
        """Wait for ``condition``; at the deadline, raise with the end of the agent's log."""
        try:
            wait_for(condition, timeout, what)
        except AssertionError as exc:
            raise RuntimeError(f"{exc}; the agent's log ends:\n{self.log_tail()}") from None

    def check_running(self) -> None:
        """Raise, with the end of its log, if the agent has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"the agent exited with status {self.process.returncode}:\n{self.log_tail()}"
            )

    def log(self) -> str:
        with contextlib.suppress(OSError), open(self.log_path) as handle:
            return handle.read()
        return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait; SIGKILL if it does not end in time. Only our own child."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    print(f"  (the agent did not stop within {timeout:g}s; killing it)")
                    self.process.kill()
                    self.process.wait()
            self.process = None
        if self.notify is not None:
            self.notify.close()
            self.notify = None


def tailing_agent(folder: str, port: int, agent_id: str, batch: int) -> tuple[AgentProcess, str]:
    """An agent (not started) in ``folder/agent_id`` that follows a new, empty ``app.log``
    there from its beginning (so no line is missed however soon it is written) and sends to
    the broker on ``port`` with ``batch_max_events = batch``; and the file's path."""
    agent_dir = os.path.join(folder, agent_id)
    os.makedirs(agent_dir)
    log_file = os.path.join(agent_dir, "app.log")
    open(log_file, "w").close()
    tables = plugin_table(
        "sources.tail", name="app", paths=[log_file], start_at="beginning"
    ) + sink_toml(port, agent_id, batch_max_events=batch)
    config = agent_toml(agent_id, os.path.join(agent_dir, "state"), tables)
    return AgentProcess(agent_dir, config), log_file


# -- the subscriber ------------------------------------------------------------------


def cloudevents_in(payload: bytes) -> int:
    """Events in an agent's message: 1, or the length of a batch (a JSON array)."""
    return payload.count(b'"specversion"')


def one_per_message(payload: bytes) -> int:
    return 1


class Arrivals:
    """A real MQTT subscriber (QoS 1, its own paho network thread) that counts the events
    arriving under a topic filter, notes when the last expected one came (``time.time()``),
    and can keep each payload with its arrival time for a look afterwards.

    Messages on ``status`` are not counted: a retained "online" there says the agent's
    sink is connected.
    """

    def __init__(
        self,
        port: int,
        topic: str,
        *,
        count: Callable[[bytes], int] = cloudevents_in,
        status: str | None = None,
        keep_payloads: bool = False,
    ) -> None:
        self.port = port
        self.topic = topic
        self.status = status
        self.count = count
        self.keep_payloads = keep_payloads
        self.expected = 0
        self.events = 0
        self.messages = 0
        self.payload_bytes = 0
        self.last_at: float | None = None
        self.received: list[tuple[float, bytes]] = []
        self.online = threading.Event()
        self.done = threading.Event()
        self._subscribed = threading.Event()
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-subscriber-{os.getpid()}-{id(self)}",
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        topics = [(self.topic, 1)] + ([(self.status, 1)] if self.status else [])
        client.subscribe(topics)

    def _on_message(self, client, userdata, message) -> None:
        now = time.time()
        payload = message.payload
        if message.topic == self.status:
            if payload == b"online":
                self.online.set()
            return
        with self._lock:
            self.events += self.count(payload)
            self.messages += 1
            self.payload_bytes += len(payload)
            if self.keep_payloads:
                self.received.append((now, payload))
            if self.expected and self.events >= self.expected and not self.done.is_set():
                self.last_at = now
                self.done.set()

    def start(self) -> Arrivals:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the subscription was not acknowledged within 10 s")
        return self

    def expect(self, count: int) -> None:
        """Set ``done`` once ``count`` events have arrived (counting from the start)."""
        with self._lock:
            self.expected = count
            if self.events >= count:
                self.last_at = time.time()
                self.done.set()
            else:
                self.last_at = None
                self.done.clear()

    def wait(self, timeout: float, agent: AgentProcess | None = None) -> bool:
        """Wait for ``done``; False at the deadline. Raises if ``agent`` exits meanwhile."""
        deadline = time.monotonic() + timeout
        while not self.done.wait(0.5):
            if agent is not None:
                agent.check_running()
            if time.monotonic() >= deadline:
                return False
        return True

    def wait_online(self, agent: AgentProcess, timeout: float = 30.0) -> None:
        """Wait for the agent's retained "online" status: its sink is connected."""

        def online() -> bool:
            agent.check_running()
            return self.online.is_set()

        agent.wait(online, timeout, "the agent's sink to connect (its status topic)")

    def mean_payload_bytes(self) -> float:
        return self.payload_bytes / self.messages if self.messages else 0.0

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Arrivals:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- raw paho-mqtt: the ceiling -----------------------------------------------------


def raw_paho_publish(
    port: int,
    count: int,
    *,
    protocol: str = "5",
    window: int = 100,
    payload_size: int = 400,
    topic: str = "bench/raw",
) -> tuple[float, float]:
    """Publish ``count`` messages of ``payload_size`` bytes at QoS 1 with ``window`` in
    flight, from one connected paho client; return (first publish, last PUBACK) as
    ``time.time()``."""
    done = threading.Event()
    acked = [0]
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        protocol=MQTTProtocolVersion.MQTTv5 if protocol == "5" else MQTTProtocolVersion.MQTTv311,
    )
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)

    def on_publish(*_args) -> None:
        acked[0] += 1
        if acked[0] == count:
            done.set()

    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    payload = b"x" * payload_size
    try:
        started = time.time()
        for _ in range(count):
            client.publish(topic, payload, qos=1)
        if not done.wait(600):
            raise RuntimeError("raw paho: not every message was acknowledged within 10 min")
        return started, time.time()
    finally:
        client.disconnect()
        client.loop_stop()


def raw_paho(port: int, count: int, protocol: str, window: int, payload_size: int = 400) -> float:
    """Events/s of :func:`raw_paho_publish`, timed to the last PUBACK."""
    started, acked = raw_paho_publish(
        port, count, protocol=protocol, window=window, payload_size=payload_size
    )
    return count / (acked - started)


def raw_paho_in_child(port: int, count: int, **options: Any) -> tuple[float, float]:
    """:func:`raw_paho_publish` in a Python process of its own, as the agent runs in one
    (so it does not share this process's interpreter lock with the subscriber)."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from bench.common import raw_paho_publish\n"
        f"print(json.dumps(raw_paho_publish({port}, {count}, **{options!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    if result.returncode != 0:
        raise RuntimeError(f"raw paho publisher failed:\n{result.stderr}")
    started, acked = json.loads(result.stdout.strip().splitlines()[-1])
    return started, acked


# -- results for bench/run_all.py ----------------------------------------------------


@dataclass
class Row:
    """One line of the table: what was measured, edge-agent's figure, what it is shown
    beside (measured in the same run), and the target, if there is one."""

    what: str
    agent: str
    beside: str = ""
    target: str = ""
    met: bool | None = None
    values: dict[str, Any] = field(default_factory=dict)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json FILE``, and ``--dir``/``--keep`` for the temporary folder."""
    parser.add_argument(
        "--json", metavar="FILE", help="also write the result rows here, for bench/run_all.py"
    )
    parser.add_argument(
        "--dir", default=None, help="where to make the temporary folder (default: here)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")


def write_results(path: str | None, script: str, rows: list[Row], info: dict | None = None) -> None:
    """Write ``rows`` as JSON to ``path`` (nothing without a path)."""
    if not path:
        return
    document = {"script": script, "machine": info or machine(), "rows": [asdict(r) for r in rows]}
    with open(path, "w") as handle:
        json.dump(document, handle, indent=1)
