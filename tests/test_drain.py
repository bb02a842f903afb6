"""Drain limits: max_rate, max_bytes_rate and priority "live", on a real broker."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import run_cli
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import load_config
from edge_agent.drain import BURST_SECONDS, Limiter, TokenBucket, parse_limits
from edge_agent.errors import ConfigError
from edge_agent.event import Event
from edge_agent.plugin_host import load_plugins
from edge_agent.queue import QueueStore, QueueWriter
from edge_agent.testing import CuttableProxy, queued_events, wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Arrivals:
    """A subscriber that notes when each message arrived (monotonic) and its size."""

    def __init__(self, port: int, topic: str) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, float, bytes]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"arrivals-{port}")
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_for(self.subscribed.is_set, 10, "the subscription")

    def _on_message(self, client, userdata, message) -> None:
        with self.lock:
            self.seen.append((message.topic, time.monotonic(), message.payload))

    def on(self, topic: str) -> list[tuple[float, bytes]]:
        with self.lock:
            return [(t, p) for top, t, p in self.seen if top == topic]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def prefill(state_dir: Path, count: int, size: int, source: str = "old") -> None:
    """Commit ``count`` events with data of ``size`` bytes (a JSON string) to the queue."""
    store = QueueStore(str(state_dir))
    store.open()
    writer = QueueWriter(store)
    data = '"' + "x" * (size - 2) + '"'
    for start in range(0, count, 5000):
        chunk = min(5000, count - start)
        writer.append([(Event(type="test.old", source=source), data) for _ in range(chunk)])
    writer.close()


# -- the bucket, without waiting -------------------------------------------


def test_a_bucket_keeps_its_rate_and_lets_a_large_cost_go_then_waits():
    clock = Clock()
    bucket = TokenBucket(100, clock)
    assert bucket.capacity == 100 * BURST_SECONDS
    sent = 0
    for _ in range(10_000):  # 10 s in steps of 1 ms
        while bucket.ready():
            bucket.take(1)
            sent += 1
        clock.now += 0.001
    assert 999 <= sent <= 1001  # it starts empty: no burst
    clock.now += 5  # idle: it fills up to one second's worth, no more
    burst = 0
    while bucket.ready():
        bucket.take(1)
        burst += 1
    assert 100 * BURST_SECONDS <= burst <= 100 * BURST_SECONDS + 1
    # One cost larger than a second's budget goes at once, then the bucket waits it off.
    bytes_bucket = TokenBucket(1000, clock)
    clock.now += 0.01
    assert bytes_bucket.ready()
    bytes_bucket.take(5000)
    assert not bytes_bucket.ready()
    wait = bytes_bucket.wait()
    assert wait == pytest.approx(4.99, abs=0.01)
    clock.now += wait
    assert bytes_bucket.ready()


def test_affordable_keeps_paid_events_and_queue_order():
    clock = Clock()
    limiter = Limiter(parse_limits({"max_rate": 20}, "sinks.x", []), clock)
    events = queued_events([Event(type="t.x", source="s", data=i) for i in range(10)])
    assert limiter.choose(events) == []  # the bucket starts empty
    clock.now += 0.125  # 2.5 events' worth
    first = limiter.choose(events)
    assert [e.position for e in first] == [1, 2, 3]  # the third one into debt
    again = limiter.choose(events)  # no time passed: only the paid ones
    assert [e.position for e in again] == [1, 2, 3]
    limiter.paid.difference_update({1, 2, 3})
    clock.now += 0.1  # 2 more: 1.5 after the debt
    assert [e.position for e in limiter.choose(events[3:])] == [4, 5]
    assert limiter.waited == pytest.approx(0.125 + 0.1)


def test_limits_are_checked_at_their_key_paths(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
        [agent]
        state_dir = "{tmp_path}"
        [[sinks.stdout]]
        max_rate = -1
        max_bytes_rate = "lots"
        priority = "newest"
        """
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(path), load_plugins())
    keys = {problem.key for problem in info.value.problems}
    assert {
        "sinks.stdout.max_rate",
        "sinks.stdout.max_bytes_rate",
        "sinks.stdout.priority",
    } <= keys, info.value
    path.write_text(f'[agent]\nstate_dir = "{tmp_path}"\n[[sinks.stdout]]\nmax_rate = inf\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), load_plugins())
    assert [p.key for p in info.value.problems] == ["sinks.stdout.max_rate"], info.value
    path.write_text(
        f"""
        [agent]
        state_dir = "{tmp_path}"
        [[sinks.stdout]]
        max_rate = 2.5
        max_bytes_rate = "64KiB"
        priority = "live"
        """
    )
    limits = load_config(str(path), load_plugins()).sinks[0].limits
    assert (limits.max_rate, limits.max_bytes_rate, limits.priority) == (2.5, 65536, "live")


# -- the real thing ----------------------------------------------------------


def window_rate(arrivals: list[tuple[float, bytes]], start: float, seconds: float):
    inside = [(t, p) for t, p in arrivals if start <= t < start + seconds]
    return len(inside) / seconds, sum(len(p) for _, p in inside) / seconds


def test_rate_limits_hold_within_ten_percent_over_ten_seconds(
    tmp_path, running_broker, agent_process
):
    """Two sinks drain the same backlog, one by events/s, one by bytes/s; counted at
    a subscriber over 10 s (after the first second)."""
    state = tmp_path / "state"
    prefill(state, 3000, size=200)
    arrivals = Arrivals(running_broker.port, "drain/#")
    try:
        agent = agent_process(
            f"""
            [agent]
            id = "gw"
            state_dir = "{state}"
            shutdown_grace = "1s"

            [[sinks.mqtt]]
            name = "by-events"
            port = {running_broker.port}
            topic = "drain/events"
            payload = "data"
            max_rate = 100

            [[sinks.mqtt]]
            name = "by-bytes"
            port = {running_broker.port}
            topic = "drain/bytes"
            payload = "data"
            max_bytes_rate = "30KiB"
            """
        )
        agent.start()
        agent.wait_log("sink by-bytes: connected to", 20)
        agent.wait_log("sink by-events: connected to", 20)
        wait_for(lambda: arrivals.on("drain/events") and arrivals.on("drain/bytes"), 20, "both")
        first = {topic: arrivals.on(topic)[0][0] for topic in ("drain/events", "drain/bytes")}
        wait_for(lambda: time.monotonic() > max(first.values()) + 11.5, 20, "11 s of draining")
        events_rate, _ = window_rate(arrivals.on("drain/events"), first["drain/events"] + 1, 10)
        _, bytes_rate = window_rate(arrivals.on("drain/bytes"), first["drain/bytes"] + 1, 10)
        status = json.loads(run_cli("status", "--json", "-c", str(agent.config_path)).stdout)
        drain = status["status"]["sinks"]["by-events"]["drain"]
        print(
            f"max_rate 100: {events_rate:.1f} events/s; max_bytes_rate 30720:"
            f" {bytes_rate:.0f} bytes/s; status drain {drain}"
        )
        assert 90 <= events_rate <= 110
        assert 0.9 * 30720 <= bytes_rate <= 1.1 * 30720
        assert drain["max_rate"] == 100 and drain["rate_waited"] > 0
        assert agent.terminate() == 0
    finally:
        arrivals.stop()


def test_live_events_go_before_a_backlog_and_nothing_is_lost(
    tmp_path, running_broker, agent_process
):
    """20,000 events wait; one written after the sink connected arrives long before
    the backlog is through; every event arrives, and the queue empties."""
    state = tmp_path / "state"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    backlog = 20_000
    prefill(state, backlog, size=50)
    arrivals = Arrivals(running_broker.port, "live/#")
    try:
        agent = agent_process(
            f"""
            [agent]
            id = "gw"
            state_dir = "{state}"
            shutdown_grace = "1s"

            [[sources.file]]
            name = "inbox"
            paths = ["{inbox}"]

            [[sinks.mqtt]]
            name = "cloud"
            port = {running_broker.port}
            topic = "live/{{type}}"
            max_rate = 2500
            priority = "live"
            """
        )
        agent.start()
        agent.wait_ready(20)
        agent.wait_log("go before the 20000 waiting", 20)
        wait_for(lambda: arrivals.on("live/test.old"), 20, "the backlog to start")
        written = time.monotonic()
        (inbox / "now.csv").write_text("live\n")
        live = wait_for(lambda: arrivals.on("live/file.created"), 20, "the live event")
        latency = live[0][0] - written
        before = sum(t < live[0][0] for t, _ in arrivals.on("live/test.old"))
        wait_for(lambda: len(arrivals.on("live/test.old")) >= backlog, 60, "the backlog")
        drained = arrivals.on("live/test.old")[-1][0] - written
        print(
            f"live event after {latency * 1000:.0f} ms, {before} of {backlog} backlog events"
            f" before it; backlog through {drained:.1f}s after it was written"
        )
        assert before < backlog / 2
        assert latency < drained / 2
        sequences = [json.loads(p)["sequence"] for _, p in arrivals.on("live/test.old")]
        assert len(set(sequences)) == backlog  # every one, none lost
        wait_for(lambda: agent.queued() <= 1, 30, "the queue to empty")
        assert "sink cloud: the backlog is sent; events go in queue order" in agent.log()
        assert agent.terminate() == 0
    finally:
        arrivals.stop()


def test_a_cut_in_the_middle_of_a_live_drain_loses_nothing(tmp_path, running_broker, agent_process):
    """Live events keep coming while the backlog drains; the line is cut and restored
    twice. Every event arrives (by id), live ones keep going first after each
    reconnect, and the queue empties."""
    state = tmp_path / "state"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    backlog = 4000
    prefill(state, backlog, size=50)
    proxy = CuttableProxy(running_broker.port).start()
    arrivals = Arrivals(running_broker.port, "cut/#")
    try:
        agent = agent_process(
            f"""
            [agent]
            id = "gw"
            state_dir = "{state}"
            shutdown_grace = "1s"

            [[sources.file]]
            name = "inbox"
            paths = ["{inbox}"]

            [[sinks.mqtt]]
            name = "cloud"
            port = {proxy.port}
            topic = "cut/{{type}}"
            max_rate = 500
            priority = "live"
            reconnect_min = "0.1s"
            reconnect_max = "0.5s"
            """
        )
        agent.start()
        agent.wait_ready(20)
        agent.wait_log("go before the 4000 waiting", 20)
        written = 0
        for cut in range(2):
            wait_for(
                lambda cut=cut: len(arrivals.on("cut/test.old")) > (cut + 1) * 600,
                30,
                "the backlog to flow",
            )
            for _ in range(5):
                (inbox / f"f{written:03d}.csv").write_text("x\n")
                written += 1
            wait_for(
                lambda n=written: len(arrivals.on("cut/file.created")) >= n, 20, "the live events"
            )
            proxy.cut()
            for _ in range(5):  # written while the line is down: live all the same
                (inbox / f"f{written:03d}.csv").write_text("x\n")
                written += 1
            proxy.restore()
            wait_for(
                lambda n=written: len(arrivals.on("cut/file.created")) >= n,
                20,
                "the live events written during the cut",
            )
            old_now = len(arrivals.on("cut/test.old"))
            assert old_now < backlog, "the backlog was through already: the test proves nothing"
        wait_for(lambda: agent.queued() <= 1, 60, "the queue to empty")
        olds = {json.loads(p)["id"] for _, p in arrivals.on("cut/test.old")}
        lives = {json.loads(p)["data"]["path"] for _, p in arrivals.on("cut/file.created")}
        print(f"{len(olds)} backlog and {len(lives)} live events after {proxy.cuts} cuts")
        assert len(olds) == backlog and len(lives) == written
        assert agent.log().count("go before the 4000 waiting") == 1  # the cut-off stayed
        assert agent.terminate() == 0
    finally:
        arrivals.stop()
        proxy.stop()
