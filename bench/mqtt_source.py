"""MQTT source throughput: a local broker → the agent's queue → the MQTT sink, at QoS 1.

N messages of about 100 bytes are published at QoS 1 by ``--publishers``
mosquitto_pub processes (C) to a local Mosquitto with its default
``max_inflight_messages`` (20; an MQTT 5 client's Receive Maximum overrides it
for what the broker sends that client); the agent's ``mqtt`` source (MQTT 5,
asking a Receive Maximum of 65535) commits them and acknowledges them, and its
``mqtt`` sink (``--sink-batch`` events per message) publishes them back under
``edge/...``, where a subscriber counts them. Two runs:

- live: the agent is running and subscribed; time from the first publish to
  the last event at the subscriber (end to end) and to the last one committed;
- backlog: the messages wait in the broker's session while the agent is
  stopped; time from its start to the last event at the subscriber.

    .venv/bin/python bench/mqtt_source.py [-n 20000] [--repeat 3] [--sink-batch 100]
        [--publishers 4] [--base REF] [--profile]
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
import contextlib  # noqa: E402
import shutil  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from bench.common import (  # noqa: E402
    Arrivals,
    Row,
    add_output_arguments,
    agent_toml,
    cpu_seconds,
    machine,
    median,
    plugin_table,
    print_machine,
    runs_text,
    verdict,
    workdir,
    write_results,
)
from bench.profiling import Profile, profile_path, summary  # noqa: E402
from bench.source_rate import CodeAgent, unpack  # noqa: E402
from edge_agent.testing import Mosquitto  # noqa: E402

TARGET = 18_000  # events/s end to end
#: The broker as installed, but for its queue limits: max_inflight_messages stays 20.
BROKER_CONFIG = "max_queued_messages 0"
PAYLOAD = b'{"sensor":"t-0001","value":21.5,"unit":"C","at":"2026-11-26T23:59:01Z","ok":true}'


def publish(port: int, count: int, publishers: int = 1) -> float:
    """Publish ``count`` QoS 1 messages with ``publishers`` mosquitto_pub processes at once
    (C: a Python publisher managed a third of the target on this machine), each on a
    device topic of its own (devices/dN/reading); the seconds until the last one ended."""
    command = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
    line = PAYLOAD + b"\n"
    shares = [count // publishers + (k < count % publishers) for k in range(publishers)]
    started = time.perf_counter()
    topics = [f"devices/d{k + 1}/reading" for k in range(publishers)]
    children = [
        subprocess.Popen(
            [command, "-p", str(port), "-q", "1", "-l", "-V", "5", "-t", topic],
            stdin=subprocess.PIPE,
        )
        for topic in topics
    ]

    def feed(child: subprocess.Popen, share: int) -> None:
        assert child.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it failed: its status says why
            child.stdin.write(line * share)
            child.stdin.close()

    # A thread per publisher: a pipe holds only 64 KiB, so they are fed side by side.
    feeders = [
        threading.Thread(target=feed, args=(child, share), daemon=True)
        for child, share in zip(children, shares, strict=True)
    ]
    try:
        for feeder in feeders:
            feeder.start()
        for feeder in feeders:
            feeder.join(300)
        for child in children:
            if child.wait(300) != 0:
                raise RuntimeError(f"mosquitto_pub exited with status {child.returncode}")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return time.perf_counter() - started


def agent_config(folder: str, port: int, sink_batch: int) -> str:
    tables = plugin_table(
        "sources.mqtt",
        name="local",
        port=port,
        topics=["devices/#"],
        reconnect_min="0.1s",
        reconnect_max="1s",
    ) + plugin_table(
        "sinks.mqtt",
        name="up",
        port=port,
        qos=1,
        batch_max_events=sink_batch,
        reconnect_min="0.1s",
        reconnect_max="1s",
    )
    return agent_toml("bench-gw", os.path.join(folder, "state"), tables)


def run_once(
    folder: str,
    count: int,
    backlog: bool,
    *,
    publishers: int,
    sink_batch: int,
    profile: str | None = None,
    code: str | None = None,
) -> tuple[float, float, float]:
    """(events/s into the queue, events/s end to end, agent CPU µs per event); with
    ``profile``, py-spy samples the agent meanwhile and writes its stacks there; ``code``:
    the agent's code from another commit (None: this checkout)."""
    broker = Mosquitto(os.path.join(folder, "mosquitto"), extra_config=BROKER_CONFIG).start()
    agent = CodeAgent(folder, agent_config(folder, broker.port, sink_batch), code)
    arrivals = Arrivals(broker.port, "edge/#").start()
    arrivals.expect(count)
    queue_file = os.path.join(folder, "state", "queue.db")
    committed_at: list[float] = []
    profiler: Profile | None = None

    def watch_queue(started: float) -> None:
        # The sink deletes what it confirmed: watch the source's sequence instead.
        while True:
            try:
                with sqlite3.connect(queue_file, timeout=1) as conn:
                    row = conn.execute(
                        "SELECT last FROM source_sequences WHERE source = 'local'"
                    ).fetchone()
                if row and row[0] >= count:
                    committed_at.append(time.time())
                    return
            except sqlite3.Error:
                pass
            time.sleep(0.01)  # ok: a poll interval
            if time.time() - started > 300:
                return

    try:
        if backlog:
            # Subscribe once so the broker keeps a session, then stop and fill it.
            agent.start()
            agent.wait_ready()
            agent.stop()
            publish(broker.port, count, publishers)
            started = time.time()
            watcher = threading.Thread(target=watch_queue, args=(started,), daemon=True)
            watcher.start()
            agent.start()
            cpu_before = 0.0
            if profile:
                profiler = Profile(agent.pid, profile)
        else:
            agent.start()
            agent.wait_ready()
            if profile:
                profiler = Profile(agent.pid, profile)
            cpu_before = cpu_seconds(agent.pid)
            started = time.time()
            watcher = threading.Thread(target=watch_queue, args=(started,), daemon=True)
            watcher.start()
            publish(broker.port, count, publishers)
        agent.wait(lambda: arrivals.events >= count, 300, f"{count} events at the subscriber")
        cpu = cpu_seconds(agent.pid) - cpu_before
        if profiler is not None:
            profiler.stop()
        watcher.join(10)
        end_to_end = count / (arrivals.last_at - started)
        into_queue = count / (committed_at[0] - started) if committed_at else float("nan")
        return into_queue, end_to_end, cpu / count * 1e6
    finally:
        if profiler is not None:
            profiler.stop()
        agent.stop()
        arrivals.stop()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="messages per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; median")
    parser.add_argument(
        "--publishers",
        type=int,
        default=4,
        help="mosquitto_pub processes publishing at once, one device topic each (default 4)",
    )
    parser.add_argument(
        "--sink-batch",
        type=int,
        default=1,
        help="the sink's batch_max_events (default 1: one event per message;"
        " bench/peers/mqtt_bridge.py runs edge-agent with 100)",
    )
    parser.add_argument(
        "--base", metavar="REF", help="also run the code of this commit, alternated (A/B)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the agent with py-spy during each run; print where its time went",
    )
    add_output_arguments(parser)
    args = parser.parse_args()
    info = machine()
    rows = []
    with workdir("mqtt-source", args.dir, args.keep) as folder:
        print_machine(info, folder)
        print(
            f"workload:  {args.n:,} QoS 1 messages of {len(PAYLOAD)} bytes from"
            f" {args.publishers} mosquitto_pub processes, local Mosquitto"
            " (max_inflight_messages 20), source MQTT 5 -> queue -> sink"
            f" (batch_max_events {args.sink_batch}) -> subscriber;"
            " CPU: the agent's, per event"
        )
        print(
            f"\n{'run':<10} | {'into the queue/s':>16} | {'end to end/s':>12} |"
            f" {'CPU/event':>9} | runs (into the queue; end to end)"
        )
        print("-" * 96)
        profiles = []
        cases: dict[str, str | None] = {"": None}
        if args.base:
            cases[f" ({args.base})"] = unpack(args.base, folder)
        for label, backlog in (("live", False), ("backlog", True)):
            results = {case: ([], [], []) for case in cases}
            for run in range(args.repeat):
                for case, code in cases.items():  # alternated, so load hits both alike
                    sub = os.path.join(folder, f"{label}-{run}{case.strip(' ()')}")
                    os.makedirs(sub)
                    profile = None
                    if args.profile:
                        profile = profile_path(f"mqtt_source-{label}-{run + 1}")
                        profiles.append(profile)
                    into, end, cpu = run_once(
                        sub,
                        args.n,
                        backlog,
                        publishers=args.publishers,
                        sink_batch=args.sink_batch,
                        profile=profile,
                        code=code,
                    )
                    for values, value in zip(results[case], (into, end, cpu), strict=True):
                        values.append(value)
            for case, (queue_rates, end_rates, cpus) in results.items():
                into, end, cpu = median(queue_rates), median(end_rates), median(cpus)
                name = f"{label}{case}"
                print(
                    f"{name:<10} | {into:>16,.0f} | {end:>12,.0f} | {cpu:>6.1f} µs |"
                    f" {runs_text(queue_rates)}; {runs_text(end_rates)}"
                )
                if case:
                    continue  # the base is for comparison; the results are this checkout's
                rows.append(
                    Row(
                        what=f"mqtt source, {label}: {args.n:,} QoS 1 messages end to end",
                        agent=f"{end:,.0f} events/s",
                        target=f">= {TARGET:,} events/s",
                        met=end >= TARGET,
                        values={
                            "into_queue": queue_rates,
                            "end_to_end": end_rates,
                            "cpu_us_per_event": cpus,
                        },
                    )
                )
        live = rows[0]
        print(
            f"\ntarget: live end to end >= {TARGET:,} events/s: {live.agent} -> {verdict(live.met)}"
        )
        for profile in profiles:
            print(f"\nprofile of the agent, {os.path.basename(profile)}:")
            print(summary(profile))
    write_results(args.json, "mqtt_source.py", rows, info)


if __name__ == "__main__":
    main()
