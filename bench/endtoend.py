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
import resource  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from bench.common import (  # noqa: E402
    Arrivals,
    Row,
    add_output_arguments,
    cpu_seconds,
    cpu_seconds_exact,
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
from bench.profiling import Profile, profile_path, summary  # noqa: E402

#: Until the raw publisher has seen an agent's message: about a CloudEvents envelope.
DEFAULT_PAYLOAD = 450


@dataclass
class Run:
    """One measurement: events delivered per second, and what else it showed."""

    rate: float
    seconds: float
    payload_bytes: float = 0.0
    #: CPU seconds of the agent (or of the raw publisher's process) during the run.
    cpu: float | None = None
    note: str = ""
    count: int = 0

    @property
    def cpu_per_event(self) -> float:
        """CPU µs per event, or NaN when the CPU was not measured."""
        return self.cpu / self.count * 1e6 if self.cpu is not None and self.count else float("nan")


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


def agent_cpu_seconds(pid: int) -> float:
    """CPU seconds of the agent so far: the scheduler's exact count where the kernel keeps
    it (utime and stime are counted in 10 ms ticks: coarse for a run of a second)."""
    exact = cpu_seconds_exact(pid)
    return exact if exact is not None else cpu_seconds(pid)


def agent_run(
    folder: str,
    port: int,
    agent_id: str,
    lines: list[bytes],
    batch: int,
    timeout: float,
    profile: str | None = None,
) -> Run:
    """Start an agent that tails a new file, append the lines, time them to the subscriber
    (with ``profile``, py-spy samples the agent meanwhile and writes its stacks there)."""
    agent, log_file = tailing_agent(folder, port, agent_id, batch)
    with Arrivals(port, f"edge/{agent_id}/#", status=status_topic(agent_id)) as arrivals:
        try:
            agent.start()
            agent.wait_ready()
            arrivals.wait_online(agent)
            arrivals.expect(len(lines))
            profiler = Profile(agent.pid, profile) if profile else None
            cpu_before = agent_cpu_seconds(agent.pid)
            started = append_all(log_file, lines)
            if not arrivals.wait(timeout, agent):
                raise RuntimeError(
                    f"only {arrivals.events:,} of {len(lines):,} events arrived within"
                    f" {timeout:.0f}s; the agent's log ends:\n{agent.log_tail()}"
                )
            assert arrivals.last_at is not None
            seconds = arrivals.last_at - started
            agent_cpu = agent_cpu_seconds(agent.pid) - cpu_before
            if profiler is not None:
                profiler.stop()
        finally:
            agent.stop()
    note = f"{arrivals.messages:,} messages"
    if arrivals.events > len(lines):
        note += f", {arrivals.events - len(lines):,} events twice"
    return Run(
        len(lines) / seconds, seconds, arrivals.mean_payload_bytes(), agent_cpu, note, len(lines)
    )


def raw_run(port: int, topic: str, count: int, payload_size: int, timeout: float) -> Run:
    """Raw paho-mqtt, in a process of its own: ``count`` messages to the same subscriber."""
    with Arrivals(port, topic, count=one_per_message) as arrivals:
        arrivals.expect(count)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started, _acked = raw_paho_in_child(port, count, payload_size=payload_size, topic=topic)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        if not arrivals.wait(timeout):
            raise RuntimeError(f"only {arrivals.events:,} of {count:,} raw messages arrived")
        assert arrivals.last_at is not None
        seconds = arrivals.last_at - started
    # The child's CPU includes starting Python and importing paho (about 0.1 s).
    return Run(count / seconds, seconds, payload_size, cpu, f"{payload_size} B payloads", count)


def print_run(label: str, run_number: int, repeat: int, run: Run) -> None:
    cpu = ""
    if run.cpu is not None:
        cpu = f", CPU {run.cpu:.2f}s: {run.cpu_per_event:.1f} µs/event"
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
    parser.add_argument(
        "--cases",
        default="single,batch,raw",
        help="which cases to run, comma-separated (default single,batch,raw)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the agent with py-spy in the first run of each case; print where its"
        " time went",
    )
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
    chosen = {c.strip() for c in args.cases.split(",") if c.strip()}
    if not chosen or chosen - set(cases):
        parser.error(f"--cases takes some of {', '.join(cases)}")
    results: dict[str, list[Run]] = {key: [] for key in cases}
    profiles: list[tuple[str, str]] = []
    with workdir("endtoend", args.dir, args.keep) as folder:
        broker = start_broker(folder)
        try:
            for run in range(1, args.repeat + 1):
                for key, batch in (("single", 1), ("batch", args.batch)):
                    if key not in chosen:
                        continue
                    agent_id = f"e2e-{key}-{run}"
                    profile = None
                    if args.profile and run == 1:
                        profile = profile_path(f"endtoend-{key}")
                        profiles.append((cases[key], profile))
                    results[key].append(
                        agent_run(folder, broker.port, agent_id, lines, batch, timeout, profile)
                    )
                    print_run(cases[key], run, args.repeat, results[key][-1])
                if "raw" not in chosen:
                    continue
                size = DEFAULT_PAYLOAD
                if results["single"]:
                    size = round(results["single"][-1].payload_bytes) or DEFAULT_PAYLOAD
                results["raw"].append(
                    raw_run(broker.port, f"bench/raw-{run}", args.n, size, timeout)
                )
                print_run(cases["raw"], run, args.repeat, results["raw"][-1])
        finally:
            broker.stop()

    rates = {key: median([r.rate for r in runs]) for key, runs in results.items() if runs}
    cpus = {key: median([r.cpu_per_event for r in runs]) for key, runs in results.items() if runs}
    print(f"\n{'case':<40} | {'events/s':>9} | {'of raw':>6} | {'CPU/event':>9} | runs")
    print("-" * 98)
    for key, label in cases.items():
        if key not in rates:
            continue
        share = f"{rates[key] / rates['raw']:.0%}" if key != "raw" and "raw" in rates else ""
        shown = runs_text([r.rate for r in results[key]])
        print(f"{label:<40} | {rates[key]:>9,.0f} | {share:>6} | {cpus[key]:>6.1f} µs | {shown}")
    print(
        "CPU/event: the agent's CPU time during the run (all its threads) per event;"
        " raw: the publisher process's, start-up included"
    )
    for label, profile in profiles:
        print(f"\nprofile, {label}:")
        print(summary(profile))
    if len(rates) < len(cases):
        return  # the table's rows need every case

    raw_text = f"raw paho-mqtt to the same subscriber, same count and size: {rates['raw']:,.0f}/s"
    rows = [
        Row(
            what="End to end, tail → queue → Mosquitto → subscriber, QoS 1, one event per"
            f" message, {args.n:,} lines (`bench/endtoend.py`)",
            agent=f"{rates['single']:,.0f} events/s",
            beside=f"{raw_text} (edge-agent: {rates['single'] / rates['raw']:.0%} of it)",
            values={
                "events_per_s": rates["single"],
                "raw_per_s": rates["raw"],
                "cpu_us_per_event": cpus["single"],
                "raw_cpu_us_per_event": cpus["raw"],
            },
        ),
        Row(
            what=f"End to end, batches of {args.batch}",
            agent=f"{rates['batch']:,.0f} events/s",
            beside=f"{rates['batch'] / rates['raw']:.1f} times raw paho-mqtt"
            " (one message per event)",
            values={
                "events_per_s": rates["batch"],
                "raw_per_s": rates["raw"],
                "cpu_us_per_event": cpus["batch"],
            },
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
