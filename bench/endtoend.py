"""End-to-end throughput: lines appended to a tailed file, through the real agent, to a subscriber.

The real agent (``edge-agent run``, a child process) follows a file with the
``tail`` source and forwards to a Mosquitto of its own at QoS 1 (MQTT 5). N
lines are appended as fast as one Python loop writes them; the time runs from
the first write until a QoS 1 subscriber has the last event. Once with one event
per message and once with batches; in the same run, raw paho-mqtt (a process of
its own) publishes N messages of the agent's mean message size at QoS 1 to the
same broker and subscriber: the ceiling.

    .venv/bin/python bench/endtoend.py [-n 50000] [--repeat 3] [--batch 100]
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
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from bench.common import (  # noqa: E402
    Arrivals,
    Row,
    add_output_arguments,
    cpu_seconds,
    machine,
    median,
    one_per_message,
    print_machine,
    raw_paho_in_child,
    runs_text,
    start_broker,
    status_topic,
    tailing_agent,
    workdir,
    write_results,
)

#: Until the raw publisher has seen an agent's message: about a CloudEvents envelope.
DEFAULT_PAYLOAD = 450


@dataclass
class Run:
    """One measurement: events delivered per second, and what else it showed."""

    rate: float
    seconds: float
    payload_bytes: float = 0.0
    agent_cpu: float | None = None
    note: str = ""


def make_lines(count: int, line_bytes: int) -> list[bytes]:
    """``count`` distinct log lines of ``line_bytes`` bytes, newline included."""
    lines = []
    for number in range(count):
        head = f"2026-11-27T12:00:00.000000 bench[42]: line {number:08d} "
        lines.append((head + "x" * max(0, line_bytes - len(head) - 1) + "\n").encode())
    return lines


def append_all(path: str, lines: list[bytes]) -> float:
    """Append the lines as fast as a buffered file takes them; return when writing began."""
    with open(path, "ab") as handle:
        started = time.time()
        for line in lines:
            handle.write(line)
    return started


def agent_run(
    folder: str, port: int, agent_id: str, lines: list[bytes], batch: int, timeout: float
) -> Run:
    """Start an agent that tails a new file, append the lines, time them to the subscriber."""
    agent, log_file = tailing_agent(folder, port, agent_id, batch)
    with Arrivals(port, f"edge/{agent_id}/#", status=status_topic(agent_id)) as arrivals:
        try:
            agent.start()
            agent.wait_ready()
            arrivals.wait_online(agent)
            arrivals.expect(len(lines))
            cpu_before = cpu_seconds(agent.pid)
            started = append_all(log_file, lines)
            if not arrivals.wait(timeout, agent):
                raise RuntimeError(
                    f"only {arrivals.events:,} of {len(lines):,} events arrived within"
                    f" {timeout:.0f}s; the agent's log ends:\n{agent.log_tail()}"
                )
            assert arrivals.last_at is not None
            seconds = arrivals.last_at - started
            agent_cpu = cpu_seconds(agent.pid) - cpu_before
        finally:
            agent.stop()
    note = f"{arrivals.messages:,} messages"
    if arrivals.events > len(lines):
        note += f", {arrivals.events - len(lines):,} events twice"
    return Run(len(lines) / seconds, seconds, arrivals.mean_payload_bytes(), agent_cpu, note)


def raw_run(port: int, topic: str, count: int, payload_size: int, timeout: float) -> Run:
    """Raw paho-mqtt, in a process of its own: ``count`` messages to the same subscriber."""
    with Arrivals(port, topic, count=one_per_message) as arrivals:
        arrivals.expect(count)
        started, _acked = raw_paho_in_child(port, count, payload_size=payload_size, topic=topic)
        if not arrivals.wait(timeout):
            raise RuntimeError(f"only {arrivals.events:,} of {count:,} raw messages arrived")
        assert arrivals.last_at is not None
        seconds = arrivals.last_at - started
    return Run(count / seconds, seconds, payload_size, note=f"{payload_size} B payloads")


def print_run(label: str, run_number: int, repeat: int, run: Run) -> None:
    cpu = f", agent CPU {run.agent_cpu:.1f}s" if run.agent_cpu is not None else ""
    print(
        f"  run {run_number}/{repeat}  {label:<38} {run.rate:>9,.0f} events/s"
        f"  ({run.seconds:.2f}s, {run.payload_bytes:.0f} B/message, {run.note}{cpu})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=50_000, help="lines per run (default 50,000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case; median")
    parser.add_argument("--batch", type=int, default=100, help="batch_max_events when batching")
    parser.add_argument("--line-bytes", type=int, default=120, help="bytes per log line")
    add_output_arguments(parser)
    args = parser.parse_args()
    if args.n < 1 or args.repeat < 1 or args.batch < 2:
        parser.error("-n and --repeat must be at least 1, --batch at least 2")

    info = machine()
    print_machine(info, args.dir or os.getcwd())
    print(
        f"workload:  {args.n:,} lines of {args.line_bytes} B appended to a tailed file, QoS 1,"
        f" MQTT 5, a local Mosquitto (in-flight 100), one QoS 1 subscriber on loopback;"
        f" {args.repeat} runs of each case, median"
    )
    print(flush=True)

    lines = make_lines(args.n, args.line_bytes)
    timeout = max(120.0, args.n / 200)
    cases = {
        "single": "edge-agent, one event per message",
        "batch": f"edge-agent, batches of {args.batch}",
        "raw": "raw paho-mqtt, same count and size",
    }
    results: dict[str, list[Run]] = {key: [] for key in cases}
    with workdir("endtoend", args.dir, args.keep) as folder:
        broker = start_broker(folder)
        try:
            for run in range(1, args.repeat + 1):
                for key, batch in (("single", 1), ("batch", args.batch)):
                    agent_id = f"e2e-{key}-{run}"
                    results[key].append(
                        agent_run(folder, broker.port, agent_id, lines, batch, timeout)
                    )
                    print_run(cases[key], run, args.repeat, results[key][-1])
                size = round(results["single"][-1].payload_bytes) or DEFAULT_PAYLOAD
                results["raw"].append(
                    raw_run(broker.port, f"bench/raw-{run}", args.n, size, timeout)
                )
                print_run(cases["raw"], run, args.repeat, results["raw"][-1])
        finally:
            broker.stop()

    rates = {key: median([r.rate for r in runs]) for key, runs in results.items()}
    print(f"\n{'case':<40} | {'events/s':>9} | {'of raw':>6} | runs")
    print("-" * 86)
    for key, label in cases.items():
        share = "" if key == "raw" else f"{rates[key] / rates['raw']:.0%}"
        shown = runs_text([r.rate for r in results[key]])
        print(f"{label:<40} | {rates[key]:>9,.0f} | {share:>6} | {shown}")

    raw_text = f"raw paho-mqtt to the same subscriber, same count and size: {rates['raw']:,.0f}/s"
    rows = [
        Row(
            what="End to end, tail → queue → Mosquitto → subscriber, QoS 1, one event per"
            f" message, {args.n:,} lines (`bench/endtoend.py`)",
            agent=f"{rates['single']:,.0f} events/s",
            beside=f"{raw_text} (edge-agent: {rates['single'] / rates['raw']:.0%} of it)",
            values={"events_per_s": rates["single"], "raw_per_s": rates["raw"]},
        ),
        Row(
            what=f"End to end, batches of {args.batch}",
            agent=f"{rates['batch']:,.0f} events/s",
            beside=f"{rates['batch'] / rates['raw']:.1f} times raw paho-mqtt"
            " (one message per event)",
            values={"events_per_s": rates["batch"], "raw_per_s": rates["raw"]},
        ),
    ]
    write_results(args.json, "endtoend", rows, info)


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as exc:  # the agent or the broker failed: said without a traceback
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:  # the agents and the broker were stopped on the way out
        sys.exit("interrupted")
