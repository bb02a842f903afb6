"""tail → queue: how fast the ``tail`` source commits a burst of log lines.

The real agent (a child process) follows an empty file with the ``tail`` source, its
MQTT sink's broker away. Once it is READY, N lines are appended in one write; the rate
is counted from the first to the last event's commit (see bench/source_rate.py), and
the agent's CPU seconds per line over the same window are shown beside it. In the same
run, ``agent.writer.Writer`` alone is fed N ready-made events of the same size by
source threads (bench/queue.py's "enqueue" row): the ratio to it says how much of
what the queue takes the source delivers.

    .venv/bin/python bench/tail.py                       # 300,000 lines of 110 bytes, 3 runs
    .venv/bin/python bench/tail.py -n 50000 --repeat 1   # a quick look
    .venv/bin/python bench/tail.py --base HEAD~3         # A/B against another commit
    .venv/bin/python bench/tail.py --profile tail.txt    # py-spy samples of the agent
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
import shutil  # noqa: E402
import tempfile  # noqa: E402

from bench.common import (  # noqa: E402
    Row,
    add_output_arguments,
    agent_toml,
    machine,
    median,
    plugin_table,
    print_machine,
    runs_text,
    verdict,
    workdir,
    write_results,
)
from bench.source_rate import Burst, CodeAgent, away_sink, measure_burst, unpack  # noqa: E402

TARGET_RATE = 150_000
TARGET_SHARE = 0.60


def make_lines(count: int, line_bytes: int) -> bytes:
    """``count`` lines of ``line_bytes`` bytes each, newline included, numbered."""
    body = line_bytes - 1
    return b"".join((f"{i:09d} " + "x" * body)[:body].encode() + b"\n" for i in range(count))


def tail_run(
    folder: str, code: str | None, content: bytes, count: int, profile: str | None = None
) -> Burst:
    """One fresh agent on an empty file; ``content`` appended once it is READY."""
    agent_dir = tempfile.mkdtemp(prefix="tail-", dir=folder)
    log_file = os.path.join(agent_dir, "app.log")
    open(log_file, "w").close()
    tables = plugin_table(
        "sources.tail", name="app", paths=[log_file], start_at="beginning"
    ) + away_sink("bench-tail")
    state = os.path.join(agent_dir, "state")
    agent = CodeAgent(agent_dir, agent_toml("bench-tail", state, tables), code)
    agent.start()
    try:
        agent.wait_ready()

        def burst() -> None:
            with open(log_file, "ab") as handle:
                handle.write(content)

        queue = os.path.join(state, "queue.db")
        return measure_burst(agent, queue, burst, count, count, profile=profile)
    finally:
        agent.stop()


def enqueue_rate(folder: str, count: int, data_bytes: int) -> float:
    """bench/queue.py's "enqueue" row: the Writer alone, sync FULL, same count and size."""
    import importlib

    bench_queue = importlib.import_module("bench.queue")
    workload = bench_queue.make_workload(count, 4, data_bytes)
    where = tempfile.mkdtemp(prefix="enqueue-", dir=folder)
    try:
        args = argparse.Namespace(chunk=100)
        return bench_queue.bench_enqueue(where, "full", workload, args).rate
    finally:
        shutil.rmtree(where, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=300_000, help="lines per run")
    parser.add_argument("--line-bytes", type=int, default=110, help="bytes per line")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case; median")
    parser.add_argument("--base", metavar="REF", help="also run the code of this commit (A/B)")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="record the agent with py-spy (raw samples, this checkout only, one run)",
    )
    parser.add_argument("--no-enqueue", action="store_true", help="skip the Writer-alone row")
    add_output_arguments(parser)
    args = parser.parse_args()
    info = machine()
    print_machine(info)
    content = make_lines(args.n, args.line_bytes)
    with workdir("tail", args.dir, args.keep) as folder:
        cases: dict[str, str | None] = {"this checkout": None}
        if args.base:
            cases[f"base {args.base}"] = unpack(args.base, folder)
        if args.profile:
            cases, args.repeat = {"this checkout": None}, 1
        runs: dict[str, list[Burst]] = {label: [] for label in cases}
        enqueue: list[float] = []
        print(f"\n{args.n:,} lines of {args.line_bytes} bytes, appended in one write")
        for number in range(1, args.repeat + 1):
            for label, code in cases.items():
                burst = tail_run(folder, code, content, args.n, args.profile)
                runs[label].append(burst)
                print(
                    f"  run {number}/{args.repeat} {label:<22} {burst.rate:>10,.0f} lines/s"
                    f"  ({burst.seconds:.2f}s, agent CPU {burst.cpu:.2f}s,"
                    f" {burst.cpu_us:.1f} µs/line)",
                    flush=True,
                )
            if not args.no_enqueue and not args.profile:
                enqueue.append(enqueue_rate(folder, args.n, 170))
                print(
                    f"  run {number}/{args.repeat} {'Writer alone':<22} {enqueue[-1]:>10,.0f}"
                    " events/s",
                    flush=True,
                )
    rows = []
    print(f"\n{'case':<24} | {'lines/s':>10} | {'µs CPU/line':>11} | runs")
    for label, bursts in runs.items():
        rate = median([b.rate for b in bursts])
        cpu = median([b.cpu_us for b in bursts])
        every = runs_text([b.rate for b in bursts])
        print(f"{label:<24} | {rate:>10,.0f} | {cpu:>11.1f} | {every}")
    mine = median([b.rate for b in runs["this checkout"]])
    row = Row(
        "tail → queue, lines/s",
        f"{mine:,.0f}",
        target=f"≥ {TARGET_RATE:,}",
        met=mine >= TARGET_RATE,
        values={"rate": mine, "cpu_us": median([b.cpu_us for b in runs["this checkout"]])},
    )
    rows.append(row)
    print(f"\ntail → queue: {mine:,.0f} lines/s (target ≥ {TARGET_RATE:,}): {verdict(row.met)}")
    if enqueue:
        base = median(enqueue)
        share = mine / base
        print(
            f"Writer alone, same run: {base:,.0f} events/s ({runs_text(enqueue)});"
            f" tail is {share:.0%} of it (target ≥ {TARGET_SHARE:.0%}):"
            f" {verdict(share >= TARGET_SHARE)}"
        )
        row.beside = f"{share:.0%} of the Writer alone ({base:,.0f}/s)"
        row.met = bool(row.met and share >= TARGET_SHARE)
    write_results(args.json, "tail", rows, info)


if __name__ == "__main__":
    main()
