"""Catch-up: how long the file source's scan takes, and the agent's peak memory, for a
watched folder of 100,000 and 1,000,000 files; and its idle CPU with the index on.

The real agent (``edge-agent run``, a child process) watches one folder (files in
sub-folders of ``--per-folder`` files, empty: a scan reads names and inodes, not
contents) with ``catch_up`` on, and sends to a Mosquitto of its own. For each size:

1. first start: the baseline (every file indexed, nothing reported);
2. a restart with nothing changed: the scan finds nothing;
3. a restart after 1 % of the files were appended to while it was stopped: the
   scan reports them (file.closed, "scan": true).

The scan's time is the agent's own log line ("indexed ... in Xs", "scanned ... in
Xs"); peak memory is VmHWM (the most RSS the agent process ever had, start-up
included) read right after the scan. After the last scan the agent idles for
``--idle`` seconds: CPU over that window (target < 0.5 % of one core: catch-up adds
no periodic work). The queue file's size after the baseline gives the index's cost
per file.

    .venv/bin/python bench/catchup.py [--files 100000 1000000] [--idle 30]
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
import re  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from bench.common import (  # noqa: E402
    AgentProcess,
    Row,
    add_output_arguments,
    agent_toml,
    cpu_seconds,
    cpu_seconds_exact,
    machine,
    peak_rss_mib,
    plugin_table,
    print_machine,
    sink_toml,
    start_broker,
    verdict,
    workdir,
    write_results,
)

CPU_TARGET_PERCENT = 0.5
SCAN_LINE = re.compile(r"(indexed|scanned) .*? in ([0-9.]+)s")


@dataclass
class Scan:
    """One start of the agent and its catch-up scan."""

    what: str
    seconds: float
    peak_rss: float  # MiB
    line: str


def make_files(inbox: str, count: int, per_folder: int) -> list[str]:
    """``count`` empty files, ``per_folder`` to a sub-folder; their paths."""
    paths = []
    for start in range(0, count, per_folder):
        folder = os.path.join(inbox, f"d{start // per_folder:05d}")
        os.makedirs(folder)
        for i in range(min(per_folder, count - start)):
            path = os.path.join(folder, f"f{i:05d}.dat")
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            paths.append(path)
    return paths


def run_scan(agent: AgentProcess, what: str, seen: int, timeout: float) -> Scan:
    """Start the agent, wait for its scan's log line, read its peak RSS, stop it."""
    agent.start()
    agent.wait_ready(timeout)
    found: list[re.Match] = []

    def scanned() -> bool:
        agent.check_running()
        found[:] = list(SCAN_LINE.finditer(agent.log()))
        return len(found) > seen

    agent.wait(scanned, timeout, f"the {what} scan's log line")
    peak = peak_rss_mib(agent.pid)
    match = found[seen]
    line = agent.log()[match.start() : agent.log().index("\n", match.start())]
    return Scan(what, float(match.group(2)), peak, line)


def idle_cpu(agent: AgentProcess, seconds: float) -> float:
    """Percent of one core the agent used over ``seconds`` of nothing happening."""
    pid = agent.pid

    def cpu() -> float:
        exact = cpu_seconds_exact(pid)
        return cpu_seconds(pid) if exact is None else exact

    before, started = cpu(), time.monotonic()
    time.sleep(seconds)  # the idle window being measured
    return 100 * (cpu() - before) / (time.monotonic() - started)


def measure(folder: str, port: int, count: int, args: argparse.Namespace) -> tuple[list, float]:
    """The three scans for ``count`` files, then idle CPU; the scans and the CPU figure."""
    inbox = os.path.join(folder, f"inbox-{count}")
    os.makedirs(inbox)
    started = time.monotonic()
    paths = make_files(inbox, count, args.per_folder)
    print(f"  made {count:,} files in {time.monotonic() - started:.0f}s", flush=True)
    agent_id = f"catchup-{count}"
    state = os.path.join(folder, f"state-{count}")
    tables = plugin_table("sources.file", name="inbox", paths=[inbox]) + sink_toml(
        port, agent_id, batch_max_events=500
    )
    agent_dir = os.path.join(folder, agent_id)
    os.makedirs(agent_dir)
    agent = AgentProcess(agent_dir, agent_toml(agent_id, state, tables))
    timeout = max(120.0, count / 1000)
    scans = []
    try:
        scans.append(run_scan(agent, "baseline", 0, timeout))
        agent.stop()
        db_bytes = os.path.getsize(os.path.join(state, "queue.db"))  # WAL folded in at stop
        scans.append(run_scan(agent, "unchanged", 1, timeout))
        agent.stop()
        changed = paths[::100]
        for path in changed:
            with open(path, "ab") as handle:
                handle.write(b"x")
        scans.append(run_scan(agent, f"{len(changed):,} changed", 2, timeout))
        cpu = idle_cpu(agent, args.idle)
    finally:
        agent.stop()
    for scan in scans:
        said = re.search(r"\d+ files(; reported .*)?", scan.line)
        print(
            f"  {scan.what:>16}: scan {scan.seconds:6.1f}s, peak RSS {scan.peak_rss:6.1f} MiB"
            f"  ({said.group(0) if said else scan.line})",
            flush=True,
        )
    print(
        f"  queue file after the baseline (stopped): {db_bytes / 2**20:.0f} MiB"
        f" ({db_bytes / count:.0f} bytes per file); idle CPU after the scan:"
        f" {cpu:.3f} % of one core over {args.idle:g}s",
        flush=True,
    )
    return scans, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--files", type=int, nargs="+", default=[100_000, 1_000_000], help="folder sizes"
    )
    parser.add_argument("--per-folder", type=int, default=1000, help="files per sub-folder")
    parser.add_argument("--idle", type=float, default=30.0, help="idle window, seconds")
    add_output_arguments(parser)
    args = parser.parse_args()
    if min(args.files) < 100 or args.per_folder < 1 or args.idle <= 0:
        parser.error("--files must be at least 100, --per-folder and --idle positive")

    info = machine()
    print_machine(info, args.dir or os.getcwd())
    print(
        f"workload:  a watched folder of {', '.join(f'{n:,}' for n in args.files)} empty files"
        f" ({args.per_folder} per sub-folder), catch_up on; the agent is started three times"
        " (baseline, nothing changed, 1 % appended to while stopped); idle CPU after the"
        f" last scan over {args.idle:g}s"
    )
    print(flush=True)
    rows: list[Row] = []
    with workdir("catchup", args.dir, args.keep) as folder:
        broker = start_broker(folder)
        try:
            for count in args.files:
                print(f"{count:,} files:", flush=True)
                scans, cpu = measure(folder, broker.port, count, args)
                for scan in scans:
                    rows.append(
                        Row(
                            what=f"Catch-up scan, {count:,} files, {scan.what}"
                            " (`bench/catchup.py`)",
                            agent=f"{scan.seconds:.1f} s",
                            beside=f"agent peak RSS {scan.peak_rss:.1f} MiB",
                            values={"seconds": scan.seconds, "peak_rss_mib": scan.peak_rss},
                        )
                    )
                met = cpu < CPU_TARGET_PERCENT
                rows.append(
                    Row(
                        what=f"Idle CPU with a {count:,}-file index",
                        agent=f"{cpu:.3f} % of one core",
                        target=f"< {CPU_TARGET_PERCENT:g} %: {verdict(met)}",
                        met=met,
                        values={"cpu_percent": cpu},
                    )
                )
                print(
                    f"  target: idle CPU < {CPU_TARGET_PERCENT:g} %: {cpu:.3f} % -> {verdict(met)}",
                    flush=True,
                )
        finally:
            broker.stop()
    write_results(args.json, "catchup", rows, info)


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as exc:  # the agent or the broker failed: said without a traceback
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:  # the agents and the broker were stopped on the way out
        sys.exit("interrupted")
