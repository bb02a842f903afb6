"""Drain limits: a live event behind a backlog (fifo vs live), and how well max_rate holds.

The real agent (``edge-agent run``, a child process) starts with ``--backlog``
events already queued and an MQTT sink with ``max_rate`` (0: none) to a
Mosquitto of its own; a QoS 1 subscriber in this process notes when each event
arrives. Once the backlog is flowing, a file appears in the agent's inbox: its
``file.created`` event is the live one, and its latency is from the file's
creation to its arrival. Runs alternate ``priority = "fifo"`` and ``"live"``
(A/B in one run, medians of ``--repeat``); the drain rate is the backlog's
events over the time from its first to its last arrival, beside ``max_rate``.

    .venv/bin/python bench/drain.py [--backlog 20000] [--max-rate 2000] [--repeat 3]
"""

from __future__ import annotations

import os
import sys

# This folder holds queue.py, which would shadow the standard library's queue:
# take the folder off sys.path, and put the checkout's root on it for bench.common.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from bench.common import (  # noqa: E402
    AgentProcess,
    Arrivals,
    Row,
    add_output_arguments,
    agent_toml,
    machine,
    median,
    plugin_table,
    print_machine,
    runs_text,
    sink_toml,
    start_broker,
    status_topic,
    workdir,
    write_results,
)
from edge_agent.event import Event  # noqa: E402
from edge_agent.queue import QueueStore, QueueWriter  # noqa: E402


def prefill(state_dir: str, count: int, data_bytes: int) -> None:
    """Queue ``count`` events of source "old" before the agent starts."""
    store = QueueStore(state_dir)
    store.open()
    writer = QueueWriter(store)
    data = json.dumps("x" * max(0, data_bytes - 2))
    for start in range(0, count, 5000):
        chunk = min(5000, count - start)
        writer.append([(Event(type="bench.old", source="old"), data) for _ in range(chunk)])
    writer.close()


def one_run(
    folder: str, port: int, priority: str, backlog: int, max_rate: float, data_bytes: int
) -> tuple[float, float, int]:
    """(live event latency s, backlog drain rate events/s, backlog events before the live one)."""
    agent_id = f"drain-{os.path.basename(folder)}"
    state = os.path.join(folder, "state")
    inbox = os.path.join(folder, "inbox")
    os.makedirs(inbox)
    prefill(state, backlog, data_bytes)
    tables = plugin_table("sources.file", name="inbox", paths=[inbox]) + sink_toml(
        port,
        agent_id,
        topic=f"bench/{agent_id}/{{type}}",
        max_rate=max_rate,
        priority=priority,
    )
    arrivals = Arrivals(
        port, f"bench/{agent_id}/#", status=status_topic(agent_id), keep_payloads=True
    ).start()
    agent = AgentProcess(folder, agent_toml(agent_id, state, tables)).start()
    try:
        agent.wait_ready()
        arrivals.wait_online(agent)
        agent.wait(lambda: arrivals.events >= 200, 60, "the backlog to flow")
        created = time.time()
        with open(os.path.join(inbox, "now.csv"), "w") as handle:
            handle.write("live\n")
        arrivals.expect(backlog + 1)
        if not arrivals.wait(600, agent):
            raise RuntimeError(f"only {arrivals.events} of {backlog + 1} events arrived")
    finally:
        agent.stop()
        arrivals.stop()
    live_at = None
    old_times = []
    for at, payload in arrivals.received:
        kind = json.loads(payload)["type"]
        if kind == "file.created" and live_at is None:
            live_at = at
        elif kind == "bench.old":
            old_times.append(at)
    assert live_at is not None
    rate = (len(old_times) - 1) / (old_times[-1] - old_times[0])
    return live_at - created, rate, sum(t < live_at for t in old_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=20_000, help="events queued at start")
    parser.add_argument("--max-rate", type=float, default=2000, help="the sink's max_rate")
    parser.add_argument("--data-bytes", type=int, default=200, help="each event's data size")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each priority")
    parser.add_argument("--quick", action="store_true", help="a backlog of 2,000, one run each")
    add_output_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.backlog, args.repeat = 2000, 1
    info = machine()
    print_machine(info)
    print(
        f"backlog {args.backlog:,} events of {args.data_bytes} bytes, max_rate"
        f" {args.max_rate:g}/s, {args.repeat} runs of each priority, alternating"
    )
    latency: dict[str, list[float]] = {"fifo": [], "live": []}
    rates: list[float] = []
    with workdir("drain", args.dir, args.keep) as base:
        broker = start_broker(os.path.join(base, "broker"))
        try:
            for i in range(args.repeat):
                for priority in ("fifo", "live"):
                    folder = os.path.join(base, f"{priority}{i}")
                    os.makedirs(folder)
                    seconds, rate, before = one_run(
                        folder, broker.port, priority, args.backlog, args.max_rate, args.data_bytes
                    )
                    latency[priority].append(seconds)
                    rates.append(rate)
                    print(
                        f"  {priority}: live event after {seconds * 1000:,.0f} ms ({before:,}"
                        f" backlog events before it); backlog drained at {rate:,.0f} events/s"
                    )
        finally:
            broker.stop()
    fifo, live = median(latency["fifo"]), median(latency["live"])
    rate = median(rates)
    print(
        f"live event latency, median: fifo {fifo * 1000:,.0f} ms, live {live * 1000:,.0f} ms;"
        f" drain rate median {rate:,.0f} events/s (max_rate {args.max_rate:g})"
    )
    limit = f"max_rate {args.max_rate:g}" if args.max_rate else "no max_rate"
    rows = [
        Row(
            what=f"Live event behind {args.backlog:,} queued, {limit}: priority live",
            agent=f"{live * 1000:,.0f} ms",
            beside=f"fifo {fifo * 1000:,.0f} ms",
            values={"fifo": latency["fifo"], "live": latency["live"]},
        ),
        Row(
            what=f"Backlog drain rate with {limit}",
            agent=f"{rate:,.0f} events/s",
            beside=f"runs {runs_text(rates)}",
            target=f"within 10 % of {args.max_rate:g}" if args.max_rate else "",
            met=abs(rate - args.max_rate) <= 0.1 * args.max_rate if args.max_rate else None,
            values={"rates": rates},
        ),
    ]
    write_results(args.json, "drain", rows, info)


if __name__ == "__main__":
    main()
