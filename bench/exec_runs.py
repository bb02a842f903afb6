"""The exec source's cost per run: with a cgroup per run, and without one.

Runs ``true`` back to back (interval mode, ``interval`` far below a run's
length) through the source in this process, collecting events in memory, and
prints runs per second and the median and p99 run ``duration``. Without a
cgroup, the run's end looks for processes holding its pipes in /proc only when
the pipes are still open; the cost of one such scan is printed too, with the
number of processes it looked at.

    .venv/bin/python bench/exec_runs.py [--runs 300]
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import edge_agent.plugins.exec  # noqa: E402
from edge_agent.plugins.exec import ExecSource, _own_cgroup, _pipe_holders  # noqa: E402
from edge_agent.testing import SourceHarness  # noqa: E402


def runs(count: int) -> tuple[float, list[float]]:
    """Runs per second and each run's duration (s) for ``count`` runs of ``true``."""
    config = {"command": ["true"], "interval": "0.0001s"}
    with SourceHarness(ExecSource, config) as harness:
        started = time.monotonic()
        harness.wait_for_events(count, timeout=600)
        elapsed = time.monotonic() - started
        events = list(harness.events[:count])
    return count / elapsed, [e.data["duration"] for e in events]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    own = _own_cgroup
    print(f"{'':28} {'runs/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for label, cgroup in (("cgroup per run", own), ("no cgroup", lambda: None)):
        if label == "cgroup per run" and own() is None:
            print(f"{label:28} (no cgroup v2 here)")
            continue
        edge_agent.plugins.exec._own_cgroup = cgroup
        rate, durations = runs(args.runs)
        p99 = statistics.quantiles(durations, n=100)[98]
        print(
            f"{label:28} {rate:8.1f} {statistics.median(durations) * 1000:8.1f} {p99 * 1000:8.1f}"
        )
    edge_agent.plugins.exec._own_cgroup = own
    processes = sum(name.isdigit() for name in os.listdir("/proc"))
    started = time.perf_counter()
    for _ in range(20):
        _pipe_holders({0})
    scan = (time.perf_counter() - started) / 20
    print(f"/proc scan for pipe holders: {scan * 1000:.1f} ms over {processes} processes")


if __name__ == "__main__":
    main()
