"""A fleet started at once spreads its first connects: 50 real agents, one real broker.

Each agent has its own state dir and ``first_connect_delay = "5s"``. The
broker's own log is read as it is written (``log_dest topic``: every line is
published on ``$SYS/broker/log/...``), so each "New client connected ... as
CLIENT_ID" is timed to the millisecond and tied to its agent.

What load cannot break: on this shared 2-core machine the 50 agents start
over several seconds, and a busy moment can delay any of them further. So
the test measures each connect from the moment its own agent drew its delay
(the agent logs it): load can only make that later, never earlier. It
asserts that no agent connected before its delay was over, that the delays
(and so the connects, each counted from its own agent's start) are spread
over the window (no 0.5 s bucket holds more than 15 of the 50, where a fleet
without the delay would put them all in the first), and only loosely, at the
broker's clock, that the connects did not come in one wave.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.testing import Mosquitto, wait_for

AGENTS = 50
WINDOW = 5.0
_DREW = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*first connection in ([0-9.]+)s", re.M
)
_CONNECTED = re.compile(r"New client connected from \S+ as (edge-agent-fleet\d+-cloud)")


class BrokerLog:
    """The broker's log lines as it publishes them, each with the time it arrived."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.connects: dict[str, float] = {}
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fleet-log-reader")
        self.client.on_connect = lambda c, *a: c.subscribe("$SYS/broker/log/#", qos=0)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_for(subscribed.is_set, 10, "the broker log subscription")

    def _on_message(self, client, userdata, message) -> None:
        found = _CONNECTED.search(message.payload.decode("utf-8", "replace"))
        if found:
            with self.lock:
                self.connects.setdefault(found.group(1), time.time())

    def count(self) -> int:
        with self.lock:
            return len(self.connects)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def logging_broker(tmp_path):
    broker = Mosquitto(
        str(tmp_path / "broker"),
        extra_config="log_dest topic\nlog_type notice\nmax_connections -1\n",
    )
    broker.start()
    yield broker
    broker.stop()


@pytest.mark.timeout(150)  # 50 Python processes starting on a shared machine
def test_fifty_agents_spread_their_first_connects_over_the_window(tmp_path, logging_broker):
    began = time.monotonic()
    log = BrokerLog(logging_broker.port)
    processes: list[subprocess.Popen] = []
    logs = []
    try:
        for i in range(AGENTS):
            folder = tmp_path / f"agent{i:02d}"
            folder.mkdir()
            (folder / "agent.toml").write_text(
                f"""
[agent]
id = "fleet{i:02d}"
state_dir = "{folder / "state"}"
shutdown_grace = "1s"

[[sinks.mqtt]]
name = "cloud"
port = {logging_broker.port}
first_connect_delay = "{WINDOW:g}s"
"""
            )
            handle = open(folder / "agent.log", "w")  # noqa: SIM115 (closed below)
            logs.append(handle)
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "edge_agent", "run", "-c", str(folder / "agent.toml")],
                    stdout=subprocess.DEVNULL,
                    stderr=handle,
                    env={**os.environ, "EDGE_AGENT_LOAD_PLUGINS": "mqtt"},  # starts faster
                )
            )
        started = time.monotonic() - began
        # About 15 s on a quiet machine; the deadline leaves room for a loaded one.
        wait_for(lambda: log.count() >= AGENTS, 100, f"{AGENTS} agents to connect")
        print(
            f"started {AGENTS} agents in {started:.1f}s;"
            f" all connected {time.monotonic() - began:.1f}s after the first start"
        )

        drew: dict[str, tuple[float, float]] = {}  # client id → (when drawn, delay)
        for i in range(AGENTS):
            text = (tmp_path / f"agent{i:02d}" / "agent.log").read_text()
            found = _DREW.search(text)
            assert found, f"agent {i} did not say when it connects first:\n{text}"
            stamp = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            drew[f"edge-agent-fleet{i:02d}-cloud"] = (stamp, float(found.group(2)))
        with log.lock:
            connects = dict(log.connects)

        delays = [delay for _, delay in drew.values()]
        # Seen at the broker, from the moment each agent drew its delay.
        offsets = {cid: connects[cid] - when for cid, (when, _) in drew.items()}
        early = {
            cid: (offsets[cid], drew[cid][1]) for cid in drew if offsets[cid] < drew[cid][1] - 0.05
        }
        by_offset = Counter(min(int(o / 0.5), 2 * int(WINDOW) + 1) for o in offsets.values())
        by_delay = Counter(int(d / 0.5) for d in delays)
        start = min(connects.values())
        by_broker_clock = Counter(int((t - start) / 0.5) for t in connects.values())
        lag = sorted(offsets[cid] - drew[cid][1] for cid in drew)
        print(
            f"{AGENTS} agents, first_connect_delay {WINDOW:g}s: connects per 0.5 s from each"
            f" agent's draw {[by_offset.get(k, 0) for k in range(2 * int(WINDOW) + 2)]};"
            f" at the broker's clock over {max(connects.values()) - start:.1f}s"
            f" {[by_broker_clock.get(k, 0) for k in range(max(by_broker_clock) + 1)]};"
            f" connect after the delay: median {lag[len(lag) // 2] * 1000:.0f} ms,"
            f" max {lag[-1] * 1000:.0f} ms"
        )
        assert not early, f"connected before their delay was over: {early}"
        assert all(0 <= d <= WINDOW for d in delays)
        assert min(delays) < 1.0 and max(delays) > WINDOW - 1.0, sorted(delays)
        assert max(by_delay.values()) <= 15, by_delay
        assert max(by_offset.values()) <= 15, by_offset
        assert max(by_broker_clock.values()) <= 20, by_broker_clock
    finally:
        for process in processes:  # ours only; what they hold is of no use any more
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
        for process in processes:
            process.wait(15)
        for handle in logs:
            handle.close()
        log.stop()
