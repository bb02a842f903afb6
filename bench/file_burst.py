"""A burst of new files → queue: how fast the ``file`` source commits them.

The real agent (a child process) watches an empty folder with the ``file`` source (its
default events and catch-up index), its MQTT sink's broker away. Once it is READY, N
empty files are created there as fast as one Python loop can; the rate is counted from
the first to the last ``file.created`` event's commit (see bench/source_rate.py), with
the agent's CPU seconds per file beside it.

    .venv/bin/python bench/file_burst.py                       # 10,000 files, 3 runs
    .venv/bin/python bench/file_burst.py -n 2000 --repeat 1    # a quick look
    .venv/bin/python bench/file_burst.py --base HEAD~3         # A/B against another commit
    .venv/bin/python bench/file_burst.py --profile files.txt   # py-spy samples of the agent
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
import sqlite3  # noqa: E402
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

TARGET_RATE = 20_000
CREATED = "SELECT count(*) FROM events WHERE type = 'file.created'"


def file_run(
    folder: str, code: str | None, count: int, profile: str | None = None
) -> tuple[Burst, dict[str, int]]:
    """One fresh agent on an empty folder; ``count`` files made once it is READY. Also
    the events in the queue by type at the end."""
    agent_dir = tempfile.mkdtemp(prefix="files-", dir=folder)
    inbox = os.path.join(agent_dir, "inbox")
    os.makedirs(inbox)
    tables = plugin_table("sources.file", name="inbox", paths=[inbox]) + away_sink("bench-file")
    state = os.path.join(agent_dir, "state")
    agent = CodeAgent(agent_dir, agent_toml("bench-file", state, tables), code)
    agent.start()
    try:
        agent.wait_ready()

        def burst() -> None:
            for n in range(count):
                os.close(os.open(os.path.join(inbox, f"f{n:07d}.csv"), os.O_CREAT | os.O_WRONLY))

        queue = os.path.join(state, "queue.db")
        result = measure_burst(
            agent, queue, burst, count, count, profile=profile, count_sql=CREATED
        )
        conn = sqlite3.connect(f"file:{queue}?mode=ro", uri=True)
        try:
            types = dict(conn.execute("SELECT type, count(*) FROM events GROUP BY type"))
        finally:
            conn.close()
        return result, types
    finally:
        agent.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000, help="files per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case; median")
    parser.add_argument("--base", metavar="REF", help="also run the code of this commit (A/B)")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="record the agent with py-spy (raw samples, this checkout only, one run)",
    )
    add_output_arguments(parser)
    args = parser.parse_args()
    info = machine()
    print_machine(info)
    with workdir("files", args.dir, args.keep) as folder:
        cases: dict[str, str | None] = {"this checkout": None}
        if args.base:
            cases[f"base {args.base}"] = unpack(args.base, folder)
        if args.profile:
            cases, args.repeat = {"this checkout": None}, 1
        runs: dict[str, list[Burst]] = {label: [] for label in cases}
        print(f"\n{args.n:,} empty files created in a burst")
        for number in range(1, args.repeat + 1):
            for label, code in cases.items():
                burst, types = file_run(folder, code, args.n, args.profile)
                runs[label].append(burst)
                print(
                    f"  run {number}/{args.repeat} {label:<22} {burst.rate:>10,.0f} files/s"
                    f"  ({burst.seconds:.2f}s, agent CPU {burst.cpu:.2f}s,"
                    f" {burst.cpu_us:.0f} µs/file; {types})",
                    flush=True,
                )
    print(f"\n{'case':<24} | {'files/s':>10} | {'µs CPU/file':>11} | runs")
    for label, bursts in runs.items():
        rate = median([b.rate for b in bursts])
        cpu = median([b.cpu_us for b in bursts])
        every = runs_text([b.rate for b in bursts])
        print(f"{label:<24} | {rate:>10,.0f} | {cpu:>11.0f} | {every}")
    mine = median([b.rate for b in runs["this checkout"]])
    row = Row(
        "file burst → queue, files/s",
        f"{mine:,.0f}",
        target=f"≥ {TARGET_RATE:,}",
        met=mine >= TARGET_RATE,
        values={"rate": mine, "cpu_us": median([b.cpu_us for b in runs["this checkout"]])},
    )
    print(
        f"\nfile burst → queue: {mine:,.0f} files/s (target ≥ {TARGET_RATE:,}): {verdict(row.met)}"
    )
    write_results(args.json, "file_burst", [row], info)


if __name__ == "__main__":
    main()
