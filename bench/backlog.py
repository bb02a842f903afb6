"""Backlog: RSS with an empty queue and with a large one, then the drain to a real broker.

Fills a queue with N events (default 1 000 000) while no broker answers, runs
the real agent on it, and reports its RSS beside an agent with an empty
queue; then starts Mosquitto and reports the time to drain, the rate, and the
agent's RSS during the drain.

    .venv/bin/python bench/backlog.py [-n 1000000]
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
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sqlite3  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402

from bench.common import Row, mosquitto_version, package_version, write_results  # noqa: E402
from edge_agent.event import Event  # noqa: E402
from edge_agent.queue import QueueStore, QueueWriter, count_events  # noqa: E402
from edge_agent.testing import Mosquitto, free_port  # noqa: E402


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def queued(state_dir: str) -> int:
    return count_events(os.path.join(state_dir, "queue.db"))


def fill(state_dir: str, count: int) -> float:
    store = QueueStore(state_dir)
    store.open()
    writer = QueueWriter(store)
    data = '{"path":"/var/spool/inbox/' + "x" * 150 + '.csv","size":1432}'
    started = time.perf_counter()
    for start in range(0, count, 10_000):
        chunk = min(10_000, count - start)
        writer.append(
            [(Event(type="file.created", source="inbox", data=None), data) for _ in range(chunk)]
        )
    writer.close()
    return time.perf_counter() - started


def start_agent(workdir: str, state_dir: str, port: int) -> subprocess.Popen:
    inbox = os.path.join(workdir, "inbox")
    os.makedirs(inbox, exist_ok=True)
    log_file = os.path.join(workdir, "app.log")
    open(log_file, "a").close()
    config = os.path.join(workdir, f"agent-{os.path.basename(state_dir)}.toml")
    with open(config, "w") as handle:
        handle.write(
            textwrap.dedent(
                f"""
                [agent]
                id = "bench"
                state_dir = "{state_dir}"
                log_level = "warning"
                [queue]
                max_bytes = "4GiB"
                [[sources.file]]
                name = "inbox"
                paths = ["{inbox}"]
                [[sources.tail]]
                name = "app"
                paths = ["{log_file}"]
                [[sinks.mqtt]]
                port = {port}
                reconnect_min = "0.1s"
                reconnect_max = "0.5s"
                """
            )
        )
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "-c", config],
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(workdir, "agent.log"), "a"),
    )


def settle_rss(pid: int, seconds: float) -> float:
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(rss_mib(pid))
        time.sleep(0.25)  # sampling interval
    return statistics.median(samples[len(samples) // 2 :])


def table_rows(
    count: int, rss_empty: float, rss_backlog: float, drained: float, peak: float
) -> list[Row]:
    """The two rows bench/run_all.py shows: RSS with and without a backlog, and the drain."""
    within = rss_backlog - rss_empty <= 10
    return [
        Row(
            what=f"RSS with an empty queue / {count:,} events queued, broker away"
            " (`bench/backlog.py`)",
            agent=f"{rss_empty:.1f} / {rss_backlog:.1f} MiB",
            target=f"within 10 MiB: {'MET' if within else 'MISSED'}",
            met=within,
            values={"rss_empty_mib": rss_empty, "rss_backlog_mib": rss_backlog},
        ),
        Row(
            what=f"Draining {count:,} queued events to Mosquitto when it comes back,"
            " QoS 1, one per message",
            agent=f"{drained:.{0 if drained >= 100 else 1}f} s ({count / drained:,.0f} events/s),"
            f" RSS at most {peak:.1f} MiB",
            values={"seconds": drained, "events_per_s": count / drained, "rss_peak_mib": peak},
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1_000_000, help="events in the backlog")
    parser.add_argument("--dir", default=None, help="where to make the temporary folder")
    parser.add_argument(
        "--json", metavar="FILE", help="also write the result rows here, for bench/run_all.py"
    )
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix=".bench-backlog-", dir=args.dir or os.getcwd())
    agent: subprocess.Popen | None = None
    broker: Mosquitto | None = None
    try:
        print(f"machine:   {os.cpu_count()} cores, {platform.platform()}")
        print(
            f"python:    {platform.python_version()}; sqlite {sqlite3.sqlite_version};"
            f" paho-mqtt {package_version('paho-mqtt')}; mosquitto {mosquitto_version()}"
        )
        print(f"date:      {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
        print(f"backlog:   {args.n:,} events of about 200 bytes of data")

        empty_state = os.path.join(workdir, "empty")
        full_state = os.path.join(workdir, "full")
        fill_seconds = fill(full_state, args.n)
        size = sum(os.path.getsize(os.path.join(full_state, f)) for f in os.listdir(full_state))
        print(f"filled:    {fill_seconds:.1f}s, queue file {size / 2**20:.0f} MiB")

        port = free_port()
        agent = start_agent(workdir, empty_state, port)
        rss_empty = settle_rss(agent.pid, 5)
        agent.terminate()
        agent.wait(30)

        agent = start_agent(workdir, full_state, port)
        rss_backlog = settle_rss(agent.pid, 5)
        print(
            f"RSS, broker away: empty queue {rss_empty:.1f} MiB, {args.n:,} queued"
            f" {rss_backlog:.1f} MiB, difference {rss_backlog - rss_empty:+.1f} MiB"
            " (target: within 10 MiB)"
        )

        broker = Mosquitto(os.path.join(workdir, "mosquitto"), port=port)
        cpu_before = cpu_seconds(agent.pid)
        started = time.perf_counter()
        broker.start()
        peak = rss_backlog
        samples = []
        while True:
            left = queued(full_state)
            rss = rss_mib(agent.pid)
            samples.append(rss)
            peak = max(peak, rss)
            if left == 0:
                break
            if time.perf_counter() - started > 3600:
                raise SystemExit(f"still {left} events queued after an hour")
            time.sleep(0.5)  # sampling interval
        drained = time.perf_counter() - started
        cpu = cpu_seconds(agent.pid) - cpu_before
        print(
            f"drain:     {drained:.1f}s for {args.n:,} events = {args.n / drained:,.0f} events/s"
            f" (QoS 1, MQTT 5, one event per message), agent CPU {cpu:.1f}s"
        )
        print(
            f"RSS during the drain: median {statistics.median(samples):.1f} MiB,"
            f" peak {peak:.1f} MiB"
        )
        agent.terminate()
        agent.wait(30)
        broker.stop()
        rows = table_rows(args.n, rss_empty, rss_backlog, drained, peak)
        write_results(args.json, "backlog", rows)
    finally:
        if agent is not None and agent.poll() is None:  # stopped early: by an error or Ctrl-C
            agent.kill()
            agent.wait()
        if broker is not None:
            broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
