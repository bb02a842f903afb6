"""Remote commands: what they cost an idle agent, and how long an answer takes.

Two real agents on one Mosquitto, each with one MQTT sink and nothing else: one
without a ``commands`` table (the default), one with it. Idle cost: CPU time
(the scheduler's count, exact for a sleeping process), threads and resident
memory of both, measured in alternating windows. Round trip: sequential
requests from an MQTT 5 client (response topic, correlation data) to the
second agent until its answer arrives: ``ping`` and ``status``.

    .venv/bin/python bench/commands.py [--windows 3] [--seconds 10] [--requests 200]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from bench.common import (  # noqa: E402
    BROKER_CONFIG,
    AgentProcess,
    agent_toml,
    cpu_seconds_exact,
    machine,
    median,
    percentile,
    print_machine,
    rss_mib,
    sink_toml,
    start_broker,
    threads,
    workdir,
)
from edge_agent.testing import Mosquitto  # noqa: E402


def make_agent(folder: str, port: int, agent_id: str, commands: bool) -> AgentProcess:
    agent_dir = os.path.join(folder, agent_id)
    os.makedirs(agent_dir)
    tables = sink_toml(port, agent_id)
    if commands:
        tables += '[sinks.mqtt.commands]\nallow = ["ping", "status"]\n'
    return AgentProcess(agent_dir, agent_toml(agent_id, os.path.join(agent_dir, "state"), tables))


def round_trips(port: int, agent_id: str, command: str, count: int) -> list[float]:
    """Seconds from publishing each request to its answer, one request at a time."""
    arrived = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.on_connect = lambda c, *a: c.socket().setsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
    )
    reply = f"bench/replies/{uuid.uuid4().hex[:8]}"
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = lambda c, u, m: arrived.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(reply, qos=1)
    subscribed.wait(10)
    times = []
    try:
        for n in range(count):
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = reply
            properties.CorrelationData = n.to_bytes(4, "big")
            arrived.clear()
            started = time.perf_counter()
            client.publish(f"edge/{agent_id}/cmd/{command}", b"", qos=1, properties=properties)
            if not arrived.wait(10):
                raise RuntimeError(f"no answer to {command} #{n} within 10s")
            times.append(time.perf_counter() - started)
    finally:
        client.disconnect()
        client.loop_stop()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=3, help="idle windows per agent")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of a window")
    parser.add_argument("--requests", type=int, default=200, help="ping requests (status: 1/4)")
    parser.add_argument(
        "--broker-nodelay",
        action="store_true",
        help="set_tcp_nodelay true in Mosquitto (off by default: its Nagle delays answers)",
    )
    args = parser.parse_args()
    print_machine(machine())
    with workdir("bench-commands") as folder:
        broker = (
            Mosquitto(
                os.path.join(folder, "mosquitto"),
                extra_config=BROKER_CONFIG + "\nset_tcp_nodelay true",
            ).start()
            if args.broker_nodelay
            else start_broker(folder)
        )
        agents = {
            "off": make_agent(folder, broker.port, "cmd-off", commands=False),
            "on": make_agent(folder, broker.port, "cmd-on", commands=True),
        }
        try:
            for agent in agents.values():
                agent.start()
                agent.wait_ready()
            agents["on"].wait(
                lambda: "commands listen on" in agents["on"].log(), 30, "the subscription"
            )
            time.sleep(2)  # let start-up settle before the idle windows
            cpu: dict[str, list[float]] = {"off": [], "on": []}
            for _ in range(args.windows):
                for key, agent in agents.items():  # alternate: the machine is shared
                    before = cpu_seconds_exact(agent.pid) or 0.0
                    time.sleep(args.seconds)
                    used = (cpu_seconds_exact(agent.pid) or 0.0) - before
                    cpu[key].append(1000 * used / args.seconds)
            print(f"idle, {args.windows} windows of {args.seconds:g}s each, alternating")
            for key, agent in agents.items():
                runs = ", ".join(f"{v:.2f}" for v in cpu[key])
                print(
                    f"  commands {key:>3}: CPU {median(cpu[key]):.2f} ms/s (runs {runs}),"
                    f" {threads(agent.pid)} threads, RSS {rss_mib(agent.pid):.1f} MiB"
                )
            for command, count in (("ping", args.requests), ("status", args.requests // 4)):
                times = sorted(round_trips(broker.port, "cmd-on", command, count))
                print(
                    f"round trip {command}: {count} requests, median"
                    f" {1000 * median(times):.1f} ms, p90 {1000 * percentile(times, 0.9):.1f} ms,"
                    f" p99 {1000 * percentile(times, 0.99):.1f} ms"
                )
        finally:
            for agent in agents.values():
                agent.stop()
            broker.stop()


if __name__ == "__main__":
    main()
