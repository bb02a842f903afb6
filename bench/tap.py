"""The cost of ``edge-agent tap``: events/s into the queue and the agent's CPU, without
a tapper and with one attached.

One real agent (``edge-agent run``, a child process) follows a file with the
``tail`` source and writes to the ``stdout`` sink (its stdout is /dev/null, so
no broker's cost hides the tap's). Lines are written at a steady rate
(default 10,000/s) for ``--seconds``; a phase ends once the source's last
``sequence`` in the queue says every line is committed. Phases alternate in
the same agent, "no tapper" and "one tapper" (``edge-agent tap --json`` with
its output to /dev/null), each first in every other run, ``--repeat`` times; the
table shows medians. CPU
seconds are the agent's (all threads, from the scheduler's count) during a
phase, and the tapper's own beside them.

    .venv/bin/python bench/tap.py [--seconds 10] [--repeat 3] [--rate 10000]
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
import math  # noqa: E402
import re  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from bench.common import (  # noqa: E402
    AgentProcess,
    Row,
    add_output_arguments,
    agent_command,
    agent_toml,
    cpu_seconds,
    cpu_seconds_exact,
    machine,
    median,
    plugin_table,
    print_machine,
    workdir,
    write_results,
)

MODES = ("no tapper", "one tapper")


@dataclass
class Phase:
    """One phase: the rates reached and the CPU seconds used."""

    written_per_s: float
    committed_per_s: float
    agent_cpu: float
    tapper_cpu: float = math.nan
    not_shown: int = 0


def write_paced(path: str, rate: float, count: int, line_bytes: int, first: int) -> float:
    """Append ``count`` lines at ``rate`` per second on a fixed schedule (lines due
    together go in one write); return when the last was written (perf_counter)."""
    filler = "x" * max(0, line_bytes - 20)
    with open(path, "ab", buffering=0) as handle:
        started = time.perf_counter()
        sent = 0
        while sent < count:
            due = min(count, int((time.perf_counter() - started) * rate) + 1)
            if due > sent:
                handle.write(
                    "".join(f"n={first + n:010d} {filler}\n" for n in range(sent, due)).encode()
                )
                sent = due
            delay = started + sent / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    return started


def committed(db_path: str) -> int:
    """The tail source's last sequence in the queue: how many lines it committed."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT last FROM source_sequences WHERE source = 'app'").fetchone()
    finally:
        conn.close()
    return int(row[0]) if row else 0


def agent_cpu(pid: int) -> float:
    exact = cpu_seconds_exact(pid)
    return exact if exact is not None else cpu_seconds(pid)


def phase(agent: AgentProcess, log_file: str, db: str, mode: str, args, first: int) -> Phase:
    """Write ``args.rate`` lines/s for ``args.seconds``, with or without a tapper."""
    tapper = None
    err_path = os.path.join(agent.folder, "tapper.err")
    if mode == "one tapper":
        with open(err_path, "w") as err:
            tapper = subprocess.Popen(
                [*agent_command(), "tap", "--json", "-c", agent.config_path, *args.tap_args],
                stdout=subprocess.DEVNULL,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )

        def tapping() -> bool:
            with open(err_path) as handle:
                return "tap: showing events" in handle.read()

        agent.wait(tapping, 30, "the tapper to connect")
    count = round(args.rate * args.seconds)
    cpu_before = agent_cpu(agent.pid)
    tapper_before = agent_cpu(tapper.pid) if tapper else 0.0
    started = write_paced(log_file, args.rate, count, args.line_bytes, first)
    written_per_s = count / (time.perf_counter() - started)
    agent.wait(lambda: committed(db) >= first - 1 + count, 120, f"{count:,} lines committed")
    done = time.perf_counter()
    result = Phase(written_per_s, count / (done - started), agent_cpu(agent.pid) - cpu_before)
    if tapper is not None:
        time.sleep(0.5)  # let the tapper print the last events before it is measured
        result.tapper_cpu = agent_cpu(tapper.pid) - tapper_before
        tapper.terminate()
        tapper.wait(10)
        with open(err_path) as handle:
            result.not_shown = sum(
                int(n) for n in re.findall(r"tap: (\d+) events not shown", handle.read())
            )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds a phase writes")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each phase; median")
    parser.add_argument("--rate", type=int, default=10000, help="lines offered per second")
    parser.add_argument("--line-bytes", type=int, default=120, help="bytes per log line")
    parser.add_argument(
        "--tap-args",
        nargs="*",
        default=[],
        metavar="ARG",
        help="more arguments for the tapper, e.g. --tap-args=--type=none (selects nothing)",
    )
    add_output_arguments(parser)
    args = parser.parse_args()
    if args.rate < 1 or args.seconds <= 0 or args.repeat < 1:
        parser.error("--rate, --seconds and --repeat must be positive")

    info = machine()
    print_machine(info, args.dir or os.getcwd())
    print(
        f"workload:  lines of {args.line_bytes} B written to a tailed file at {args.rate:,}/s"
        f" for {args.seconds:g}s, stdout sink to /dev/null; phases alternate in one agent"
        " (ABBA),"
        f" {args.repeat} runs of each, median"
    )
    print(flush=True)
    results: dict[str, list[Phase]] = {mode: [] for mode in MODES}
    with workdir("tap", args.dir, args.keep) as folder:
        log_file = os.path.join(folder, "app.log")
        open(log_file, "w").close()
        state = os.path.join(folder, "state")
        tables = plugin_table(
            "sources.tail", name="app", paths=[log_file], start_at="beginning"
        ) + plugin_table("sinks.stdout", name="null")
        agent = AgentProcess(folder, agent_toml("tap-bench", state, tables))
        written = 0
        try:
            agent.start()
            agent.wait_ready()
            for run in range(1, args.repeat + 1):
                # ABBA: each mode goes first in every other run, so that whatever drifts
                # during a run (the WAL, the machine's load) does not favour one of them.
                for mode in MODES if run % 2 else MODES[::-1]:
                    result = phase(
                        agent, log_file, os.path.join(state, "queue.db"), mode, args, written + 1
                    )
                    written += round(args.rate * args.seconds)
                    results[mode].append(result)
                    print(
                        f"  run {run}/{args.repeat}  {mode:<11}"
                        f" written {result.written_per_s:>9,.0f}/s"
                        f"  committed {result.committed_per_s:>9,.0f}/s"
                        f"  agent CPU {result.agent_cpu:6.2f} s"
                        + (
                            f"  tapper CPU {result.tapper_cpu:5.2f} s,"
                            f" not shown {result.not_shown:,}"
                            if mode == "one tapper"
                            else ""
                        ),
                        flush=True,
                    )
        finally:
            agent.stop()

    print(
        f"\n{'phase':<11} | {'committed/s':>11} | {'agent CPU s':>11} | {'CPU µs/event':>12}"
        f" | {'tapper CPU s':>12} | not shown"
    )
    print("-" * 80)
    count = round(args.rate * args.seconds)
    figures = {}
    for mode in MODES:
        runs = results[mode]
        figures[mode] = {
            "committed_per_s": median([r.committed_per_s for r in runs]),
            "agent_cpu": median([r.agent_cpu for r in runs]),
            "tapper_cpu": median([r.tapper_cpu for r in runs]),
            "not_shown": median([r.not_shown for r in runs]),
        }
        f = figures[mode]
        tapper = "" if mode == "no tapper" else f"{f['tapper_cpu']:.2f}"
        not_shown = "" if mode == "no tapper" else f"{f['not_shown']:,.0f}"
        print(
            f"{mode:<11} | {f['committed_per_s']:>11,.0f} | {f['agent_cpu']:>11.2f}"
            f" | {f['agent_cpu'] / count * 1e6:>12.1f} | {tapper:>12}"
            f" | {not_shown}"
        )
    base, tapped = figures["no tapper"], figures["one tapper"]
    extra = (tapped["agent_cpu"] - base["agent_cpu"]) / count * 1e6
    print(f"\nthe tapper costs the agent {extra:+.1f} µs of CPU per event (median of each)")
    rows = [
        Row(
            what=f"`edge-agent tap`, {args.rate:,} lines/s offered to a tail source"
            " (`bench/tap.py`): events/s committed, agent CPU s, no tapper / one tapper",
            agent=f"{base['committed_per_s']:,.0f} / {tapped['committed_per_s']:,.0f} events/s;"
            f" {base['agent_cpu']:.2f} / {tapped['agent_cpu']:.2f} CPU s",
            beside=f"{extra:+.1f} µs of agent CPU per event with a tapper;"
            f" the tapper itself {tapped['tapper_cpu']:.2f} CPU s",
            values=figures,
        )
    ]
    write_results(args.json, "tap", rows, info)


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as exc:  # the agent failed: said without a traceback
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:  # the agent was stopped on the way out
        sys.exit("interrupted")
