"""Forwarding throughput: queue → a local Mosquitto at QoS 1, beside raw paho-mqtt.

Fills the queue with N events (about 200 bytes of data each), then times the
agent's forwarder with the MQTT sink until the broker has acknowledged every
event: one event per message (MQTT 5 and 3.1.1) and batched. In the same run,
raw paho-mqtt publishes N messages of the same size at QoS 1 from one
process: the ceiling for one Python process.

    .venv/bin/python bench/forward.py [-n 20000] [--repeat 3]
"""

from __future__ import annotations

import os
import sys

# This folder holds queue.py, which would shadow the standard library's queue:
# take the folder off sys.path, and put the checkout's root on it for bench.common.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sqlite3  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from importlib.metadata import version  # noqa: E402

from bench.common import Row, mosquitto_version, raw_paho, verdict, write_results  # noqa: E402
from bench.profiling import Profile, profile_path, summary  # noqa: E402
from edge_agent.event import Event  # noqa: E402
from edge_agent.forwarder import Forwarder  # noqa: E402
from edge_agent.plugins.mqtt import MqttSink  # noqa: E402
from edge_agent.queue import QueueStore, QueueWriter  # noqa: E402
from edge_agent.schema import build  # noqa: E402
from edge_agent.testing import Mosquitto  # noqa: E402

DATA = '{"path":"/var/spool/inbox/' + "x" * 150 + '.csv","size":1432}'
BROKER_CONFIG = "max_inflight_messages 100\nmax_queued_messages 0"


def agent_forward(
    folder: str, port: int, count: int, options: dict, profile: str | None = None
) -> tuple[float, float]:
    """(events/s, CPU µs per event of this process) forwarding ``count`` queued events."""
    store = QueueStore(folder)
    store.open()
    writer = QueueWriter(store)
    for start in range(0, count, 1000):
        writer.append(
            [
                (Event(type="file.created", source="inbox"), DATA)
                for _ in range(min(1000, count - start))
            ]
        )
    writer.close()
    problems: list = []
    config = build(MqttSink.Config, {"port": port, **options}, "bench", problems)
    if problems:
        raise SystemExit(problems)
    sink = MqttSink(name="bench", config=config, agent_id="bench")
    done = threading.Event()

    def on_confirmed() -> None:  # in the forwarder's thread, after each round
        if forwarder.confirmed >= count:
            done.set()

    # Waiting on an event, as raw paho's run does: a polling thread here would
    # take the interpreter lock from the forwarder hundreds of times a second.
    forwarder = Forwarder(sink, store, on_confirmed=on_confirmed)
    profiler = Profile(os.getpid(), profile) if profile else None
    cpu = time.process_time()
    started = time.perf_counter()
    forwarder.start()
    if not done.wait(600):
        raise SystemExit("forwarding took more than 10 minutes")
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    if profiler is not None:
        profiler.stop()
    forwarder.abort()
    forwarder.join(10)
    return count / elapsed, cpu / count * 1e6


def raw_forward(port: int, count: int, protocol: str) -> tuple[float, float]:
    """(events/s, CPU µs per event of this process) of raw paho-mqtt."""
    cpu = time.process_time()
    rate = raw_paho(port, count, protocol, 100)
    return rate, (time.process_time() - cpu) / count * 1e6


def table_rows(one: float, raw: float, batched: float) -> list[Row]:
    """The two rows bench/run_all.py shows: one event per message, and batched."""
    return [
        Row(
            what="Forward the queue to Mosquitto, QoS 1, MQTT 5, one event per message"
            " (`bench/forward.py`)",
            agent=f"{one:,.0f} events/s",
            beside=f"raw paho-mqtt, same payload size: {raw:,.0f}/s",
            target=f">= 90% of raw: {one / raw:.0%}, {verdict(one >= 0.9 * raw)}",
            met=one >= 0.9 * raw,
            values={"events_per_s": one, "raw_per_s": raw},
        ),
        Row(
            what="Forward, QoS 1, MQTT 5, batches of 100",
            agent=f"{batched:,.0f} events/s",
            target=f">= 30,000/s: {verdict(batched >= 30_000)}",
            met=batched >= 30_000,
            values={"events_per_s": batched},
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="events per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; median")
    parser.add_argument(
        "--json", metavar="FILE", help="also write the result rows here, for bench/run_all.py"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample this process with py-spy during the first run of each edge-agent case;"
        " print where the time went",
    )
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix=".bench-forward-", dir=os.getcwd())
    broker = Mosquitto(os.path.join(workdir, "mosquitto"), extra_config=BROKER_CONFIG).start()
    try:
        print(f"machine:   {os.cpu_count()} cores, {platform.platform()}")
        print(
            f"python:    {platform.python_version()}; paho-mqtt {version('paho-mqtt')};"
            f" sqlite {sqlite3.sqlite_version}; mosquitto {mosquitto_version()};"
            f" date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        )
        print(f"workload:  {args.n:,} events, QoS 1, local Mosquitto (max_inflight_messages 100)")
        rows = []
        cases = [
            ("raw paho-mqtt, MQTT 5, in-flight 100", None, "5"),
            ("raw paho-mqtt, MQTT 3.1.1, in-flight 100", None, "3.1.1"),
            ("edge-agent, MQTT 5, one event per message", {"protocol": "5"}, "5"),
            ("edge-agent, MQTT 3.1.1, one event per message", {"protocol": "3.1.1"}, "3.1.1"),
            (
                "edge-agent, MQTT 5, batches of 100",
                {"protocol": "5", "batch_max_events": 100},
                "5",
            ),
        ]
        # Cases alternate within each round (raw, agent, raw, ...), so a machine that
        # gets busier or calmer meanwhile shifts every case alike.
        profiles = []
        rates: list[list[float]] = [[] for _ in cases]
        cpus: list[list[float]] = [[] for _ in cases]
        for run in range(args.repeat):
            for index, (label, options, protocol) in enumerate(cases):
                if options is None:
                    rate, cpu = raw_forward(broker.port, args.n, protocol)
                else:
                    folder = os.path.join(workdir, f"q-{index}-{run}")
                    profile = None
                    if args.profile and run == 0:
                        profile = profile_path(f"forward-{index}")
                        profiles.append((label, profile))
                    rate, cpu = agent_forward(folder, broker.port, args.n, options, profile)
                rates[index].append(rate)
                cpus[index].append(cpu)
        for index, (label, _options, protocol) in enumerate(cases):
            rate, cpu = statistics.median(rates[index]), statistics.median(cpus[index])
            rows.append((label, protocol, rate, rates[index], cpu))
        raw = {row[1]: row[2] for row in rows if row[0].startswith("raw")}
        print(f"\n{'method':<48} | {'events/s':>9} | {'of raw':>6} | {'CPU/event':>9} | runs")
        print("-" * 102)
        for label, protocol, rate, runs, cpu in rows:
            share = "" if label.startswith("raw") else f"{rate / raw[protocol]:.0%}"
            shown = ", ".join(f"{r:,.0f}" for r in runs)
            print(f"{label:<48} | {rate:>9,.0f} | {share:>6} | {cpu:>6.1f} µs | {shown}")
        for label, profile in profiles:
            print(f"\nprofile, {label}:")
            print(summary(profile))
        one = rows[2][2] / raw["5"]
        batched = rows[4][2]
        print(
            f"\ntarget: one event per message >= 90% of raw (MQTT 5): {one:.0%}"
            f" -> {'MET' if one >= 0.9 else 'MISSED'}"
        )
        print(
            f"target: batched >= 30,000 events/s: {batched:,.0f}"
            f" -> {'MET' if batched >= 30_000 else 'MISSED'}"
        )
        write_results(args.json, "forward", table_rows(rows[2][2], raw["5"], batched))
    finally:
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
