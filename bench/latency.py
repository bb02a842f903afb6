"""Latency: from a line written to a tailed file to its arrival at a subscriber, p50 / p99.

The real agent (``edge-agent run``, a child process) follows a file with the
``tail`` source and forwards to a Mosquitto of its own at QoS 1 (MQTT 5). Lines
are written at a steady rate (100/s, then 5,000/s) for ``--seconds``; each line
carries the time it was written (``time.time()``), and a QoS 1 subscriber in
this process takes its arrival time minus that. One event per message, and
5,000/s once more with batches, in case one event per message cannot keep up.

    .venv/bin/python bench/latency.py [--seconds 10] [--repeat 3] [--rates 100,5000]
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
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from bench.common import (  # noqa: E402
    Arrivals,
    Row,
    add_output_arguments,
    machine,
    median,
    percentile,
    print_machine,
    start_broker,
    status_topic,
    tailing_agent,
    workdir,
    write_results,
)

WARM_UP_LINES = 20


@dataclass
class Case:
    """One rate, with or without batching."""

    rate: int
    batch: int

    @property
    def key(self) -> str:
        return f"{self.rate}-{'batch' if self.batch > 1 else 'single'}"

    @property
    def label(self) -> str:
        how = f"batches of {self.batch}" if self.batch > 1 else "one event per message"
        return f"{self.rate:,} events/s, {how}"


@dataclass
class Run:
    """Latencies of one run, in seconds, sorted; and the rates actually reached."""

    latencies: list[float]
    written_per_s: float
    delivered_per_s: float

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99)

    @property
    def max(self) -> float:
        return self.latencies[-1] if self.latencies else math.nan


def line(stamp: float, tag: str, number: int, line_bytes: int) -> bytes:
    """A log line that carries its write time: ``t=1764244800.123456 run=... n=...``."""
    head = f"t={stamp:.6f} run={tag} n={number:08d} "
    return (head + "x" * max(0, line_bytes - len(head) - 1) + "\n").encode()


def write_paced(path: str, tag: str, rate: float, count: int, line_bytes: int) -> float:
    """Append ``count`` lines at ``rate`` per second on a fixed schedule (lines that are
    due together go in one write); return the rate reached."""
    with open(path, "ab", buffering=0) as handle:
        started = time.perf_counter()
        sent = 0
        while sent < count:
            due = min(count, int((time.perf_counter() - started) * rate) + 1)
            if due > sent:
                stamp = time.time()
                handle.write(b"".join(line(stamp, tag, n, line_bytes) for n in range(sent, due)))
                sent = due
            delay = started + sent / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)  # until the next line is due
        elapsed = time.perf_counter() - started
    return count / elapsed if elapsed > 0 else math.inf


def stamps_of(payload: bytes) -> list[tuple[str, int, float]]:
    """(run tag, line number, write time) of every line in a message: one event or a batch."""
    decoded = json.loads(payload)
    events = decoded if isinstance(decoded, list) else [decoded]
    found = []
    for event in events:
        fields = dict(part.split("=", 1) for part in event["data"]["line"].split()[:3])
        found.append((fields["run"], int(fields["n"]), float(fields["t"])))
    return found


def latencies(arrivals: Arrivals, tag: str) -> tuple[list[float], float]:
    """Sorted arrival-minus-write times of the lines tagged ``tag`` (a line that came twice
    counts once, at its first arrival), and the time the last one arrived."""
    first: dict[int, float] = {}
    last = 0.0
    for arrived, payload in arrivals.received:
        for run_tag, number, written in stamps_of(payload):
            if run_tag == tag and number not in first:
                first[number] = arrived - written
                last = max(last, arrived)
    return sorted(first.values()), last


def measure(folder: str, port: int, case: Case, run: int, args: argparse.Namespace) -> Run:
    """Start an agent tailing a new file, warm it up, write at the case's rate, collect."""
    agent_id = f"latency-{case.key}-{run}"
    agent, log_file = tailing_agent(folder, port, agent_id, case.batch)
    count = max(1, round(case.rate * args.seconds))
    status = status_topic(agent_id)
    with Arrivals(port, f"edge/{agent_id}/#", status=status, keep_payloads=True) as arrivals:
        try:
            agent.start()
            agent.wait_ready()
            arrivals.wait_online(agent)
            arrivals.expect(WARM_UP_LINES)
            write_paced(log_file, "warm-up", 100, WARM_UP_LINES, args.line_bytes)
            if not arrivals.wait(30, agent):
                raise RuntimeError(f"the warm-up lines did not arrive:\n{agent.log_tail()}")
            arrivals.expect(WARM_UP_LINES + count)
            first_write = time.time()
            written_per_s = write_paced(log_file, "measured", case.rate, count, args.line_bytes)
            if not arrivals.wait(max(60.0, args.seconds * 20), agent):
                raise RuntimeError(
                    f"only {arrivals.events - WARM_UP_LINES:,} of {count:,} events arrived;"
                    f" the agent's log ends:\n{agent.log_tail()}"
                )
        finally:
            agent.stop()
    values, last = latencies(arrivals, "measured")
    if len(values) < count:
        raise RuntimeError(f"only {len(values):,} of the {count:,} lines arrived")
    return Run(values, written_per_s, len(values) / max(last - first_write, 1e-9))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def summary(runs: list[Run]) -> dict[str, float]:
    """Medians over the runs of each figure."""
    return {
        "p50": median([r.p50 for r in runs]),
        "p99": median([r.p99 for r in runs]),
        "max": median([r.max for r in runs]),
        "written_per_s": median([r.written_per_s for r in runs]),
        "delivered_per_s": median([r.delivered_per_s for r in runs]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds at each rate")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case; median")
    parser.add_argument(
        "--rates", default="100,5000", help="events/s, comma-separated (default 100,5000)"
    )
    parser.add_argument(
        "--batch", type=int, default=100, help="batch_max_events for the batched run (0: none)"
    )
    parser.add_argument("--line-bytes", type=int, default=120, help="bytes per log line")
    add_output_arguments(parser)
    args = parser.parse_args()
    rates = [int(r) for r in args.rates.split(",") if r]
    if not rates or min(rates) < 1 or args.seconds <= 0 or args.repeat < 1:
        parser.error("rates, --seconds and --repeat must be positive")
    cases = [Case(rate, 1) for rate in rates]
    if args.batch > 1:
        cases.append(Case(max(rates), args.batch))

    info = machine()
    print_machine(info, args.dir or os.getcwd())
    print(
        f"workload:  lines of {args.line_bytes} B written to a tailed file at a steady rate for"
        f" {args.seconds:g}s, QoS 1, MQTT 5, a local Mosquitto, one QoS 1 subscriber;"
        f" {WARM_UP_LINES} warm-up lines first; {args.repeat} runs of each case, median"
    )
    print(flush=True)

    results: dict[str, list[Run]] = {case.key: [] for case in cases}
    with workdir("latency", args.dir, args.keep) as folder:
        broker = start_broker(folder)
        try:
            for run in range(1, args.repeat + 1):
                for case in cases:
                    result = measure(folder, broker.port, case, run, args)
                    results[case.key].append(result)
                    print(
                        f"  run {run}/{args.repeat}  {case.label:<38} p50 {ms(result.p50):>10}"
                        f"  p99 {ms(result.p99):>10}  max {ms(result.max):>10}"
                        f"  (written {result.written_per_s:,.0f}/s,"
                        f" delivered {result.delivered_per_s:,.0f}/s)",
                        flush=True,
                    )
        finally:
            broker.stop()

    print(f"\n{'case':<38} | {'p50':>10} | {'p99':>10} | {'max':>10} | delivered/s")
    print("-" * 90)
    rows = []
    for case in cases:
        figures = summary(results[case.key])
        behind = figures["delivered_per_s"] < 0.95 * case.rate
        print(
            f"{case.label:<38} | {ms(figures['p50']):>10} | {ms(figures['p99']):>10}"
            f" | {ms(figures['max']):>10} | {figures['delivered_per_s']:,.0f}"
            + ("  (fell behind)" if behind else "")
        )
        beside = f"max {ms(figures['max'])}; delivered {figures['delivered_per_s']:,.0f}/s"
        if behind:
            beside += f": cannot keep up with {case.rate:,}/s, latency grows with the backlog"
        rows.append(
            Row(
                what=f"Latency, line written → subscriber, {case.label}"
                + (" (`bench/latency.py`)" if not rows else ""),
                agent=f"p50 {ms(figures['p50'])}, p99 {ms(figures['p99'])}",
                beside=beside,
                values=figures,
            )
        )
    write_results(args.json, "latency", rows, info)


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as exc:  # the agent or the broker failed: said without a traceback
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:  # the agents and the broker were stopped on the way out
        sys.exit("interrupted")
