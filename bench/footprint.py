"""Footprint: memory and CPU of the idle agent, and its start-up time to READY.

The real agent (``edge-agent run``, a child process) runs with a ``file``
source (a watched folder), a ``tail`` source (a log file), a ``udev`` source
(netlink) and an MQTT sink connected to a Mosquitto of its own. Start-up time
runs from spawning the process to its sd_notify READY=1 (``$NOTIFY_SOCKET``
points at a socket of this script). Once the sink is connected and a moment
has passed, nothing happens for ``--seconds``: RSS (VmRSS) is sampled every
second and the CPU time (utime + stime) taken at both ends.

Targets: RSS under 40 MiB and CPU under 0.5 % of one core (no busy polling).

``--host-interval 10s`` adds a ``host`` source (every collector) at that interval;
``--journald`` adds a ``journald`` source following the system journal (its
``journalctl`` child is measured on its own line: RSS and CPU beside the agent's).
Both together measure the agent as a gateway that reports on itself.

    .venv/bin/python bench/footprint.py [--seconds 60] [--repeat 3] [--host-interval 10]
        [--journald]
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
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from bench.common import (  # noqa: E402
    AgentProcess,
    Arrivals,
    Row,
    add_output_arguments,
    agent_toml,
    cpu_seconds,
    cpu_seconds_exact,
    machine,
    median,
    peak_rss_mib,
    plugin_table,
    print_machine,
    rss_mib,
    runs_text,
    sink_toml,
    start_broker,
    status_topic,
    threads,
    verdict,
    wakeups,
    workdir,
    write_results,
    written_bytes,
)

RSS_TARGET_MIB = 40.0
CPU_TARGET_PERCENT = 0.5


@dataclass
class Run:
    """What one idle agent showed."""

    startup: float  # spawn → READY=1, seconds
    connected: float  # spawn → the sink's "online" status, seconds
    rss_max: float  # MiB, during the idle window
    rss_median: float
    rss_peak: float  # VmHWM at the end: the most it ever had, start-up included
    cpu_percent: float  # of one core, during the idle window
    cpu_percent_ticks: float  # the same from utime + stime
    wakeups_per_s: float
    written_per_s: float | None  # bytes written to storage per second
    threads: int
    broker_cpu_percent: float
    udev: str  # how the udev source listens, from the agent's log
    children_rss: float = 0.0  # MiB, the agent's child processes (journalctl) at the end
    children_cpu_percent: float = 0.0  # of one core, the same children over the window


def footprint_config(
    folder: str,
    port: int,
    agent_id: str,
    host_interval: float | None = None,
    journald: bool = False,
) -> str:
    """file, tail and udev sources and a connected MQTT sink, all with their defaults;
    a host source every ``host_interval`` seconds, a journald source on the system journal."""
    inbox = os.path.join(folder, "inbox")
    os.makedirs(inbox)
    log_file = os.path.join(folder, "app.log")
    open(log_file, "w").close()
    tables = (
        plugin_table("sources.file", name="inbox", paths=[inbox])
        + plugin_table("sources.tail", name="app", paths=[log_file])
        + plugin_table("sources.udev", name="devices")
        + (
            plugin_table("sources.host", name="host", interval=host_interval)
            if host_interval
            else ""
        )
        + (plugin_table("sources.journald", name="journal") if journald else "")
        + sink_toml(port, agent_id)
    )
    return agent_toml(agent_id, os.path.join(folder, "state"), tables)


def udev_mode(log: str) -> str:
    """ "kernel" or "udev" events, or why the udev source could not listen."""
    found = re.search(r"listening to (\w+) device events", log)
    if found:
        return f"netlink, {found.group(1)} events"
    if "cannot listen to device events" in log:
        return "netlink refused (retrying)"
    return "not reported"


def process_cpu(pid: int) -> float:
    """CPU seconds so far: the scheduler's exact count where the kernel keeps it."""
    exact = cpu_seconds_exact(pid)
    return cpu_seconds(pid) if exact is None else exact


def children(pid: int) -> list[int]:
    """The agent's child processes (journalctl for a journald source)."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            found += [int(child) for child in handle.read().split()]
    return found


def sample_idle(pid: int, broker_pid: int, seconds: float) -> dict[str, float | None]:
    """Sample RSS every second for ``seconds``; CPU, wake-ups and writes over the window.

    CPU is taken twice: from the scheduler's exact count, and from utime + stime
    (clock ticks: a sample, which may miss short wake-ups altogether).
    """
    cpu0, ticks0, broker0 = process_cpu(pid), cpu_seconds(pid), process_cpu(broker_pid)
    kids = children(pid)
    kids0 = sum(process_cpu(child) for child in kids)
    wakeups0, written0 = wakeups(pid), written_bytes(pid)
    started = time.monotonic()
    samples = [rss_mib(pid)]
    while (elapsed := time.monotonic() - started) < seconds:
        time.sleep(min(1.0, seconds - elapsed))  # the sampling interval
        samples.append(rss_mib(pid))
    window = time.monotonic() - started
    written1 = written_bytes(pid)
    return {
        "rss_max": max(samples),
        "rss_median": median(samples),
        "cpu_percent": 100 * (process_cpu(pid) - cpu0) / window,
        "cpu_percent_ticks": 100 * (cpu_seconds(pid) - ticks0) / window,
        "wakeups_per_s": (wakeups(pid) - wakeups0) / window,
        "written_per_s": None if written0 is None else (written1 - written0) / window,
        "broker_cpu_percent": 100 * (process_cpu(broker_pid) - broker0) / window,
        "children_rss": sum(rss_mib(child) for child in kids),
        "children_cpu_percent": 100 * (sum(process_cpu(c) for c in kids) - kids0) / window,
    }


def measure(folder: str, port: int, broker_pid: int, run: int, args: argparse.Namespace) -> Run:
    """Start one agent, time its start-up, let it settle, and watch it idle."""
    agent_id = f"footprint-{run}"
    agent_dir = os.path.join(folder, agent_id)
    os.makedirs(agent_dir)
    agent = AgentProcess(
        agent_dir,
        footprint_config(agent_dir, port, agent_id, args.host_interval, args.journald),
    )
    with Arrivals(port, f"edge/{agent_id}/#", status=status_topic(agent_id)) as arrivals:
        try:
            agent.start()
            startup = agent.wait_ready()
            arrivals.wait_online(agent)
            connected = time.perf_counter() - agent.spawned_at
            time.sleep(args.settle)  # let start-up work (first status, first flushes) pass
            idle = sample_idle(agent.pid, broker_pid, args.seconds)
            agent.check_running()
            peak = peak_rss_mib(agent.pid)
            thread_count = threads(agent.pid)
            log = agent.log()
        finally:
            agent.stop()
    if arrivals.events:
        print(f"  note: {arrivals.events} events were sent while idle (host metrics, device,")
        print("        file or journal events)")
    return Run(
        startup=startup,
        connected=connected,
        rss_peak=peak,
        threads=thread_count,
        udev=udev_mode(log),
        **idle,  # type: ignore[arg-type]
    )


def python_alone_rss() -> float:
    """RSS of this Python interpreter doing nothing: what the agent is built on."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(1.0)  # long enough for the interpreter to start
        return rss_mib(child.pid)
    finally:
        child.kill()
        child.wait()


def print_run(number: int, repeat: int, run: Run) -> None:
    written = "" if run.written_per_s is None else f", writes {run.written_per_s / 1024:.1f} KiB/s"
    print(
        f"  run {number}/{repeat}  start-up to READY {run.startup:.2f}s (connected"
        f" {run.connected:.2f}s); idle: RSS max {run.rss_max:.1f} MiB (peak ever"
        f" {run.rss_peak:.1f}), CPU {run.cpu_percent:.3f} % of one core"
        f" (utime+stime: {run.cpu_percent_ticks:.2f} %),"
        f" {run.wakeups_per_s:.0f} wake-ups/s{written}, {run.threads} threads;"
        f" Mosquitto CPU {run.broker_cpu_percent:.2f} %"
        + (
            f"; child processes (journalctl): RSS {run.children_rss:.1f} MiB,"
            f" CPU {run.children_cpu_percent:.3f} %"
            if run.children_rss
            else ""
        ),
        flush=True,
    )


def report(runs: list[Run], baseline: float, seconds: float, sources: str) -> list[Row]:
    """Print the medians and the targets; return the rows for the table."""

    def per_run(name: str) -> list[float]:
        return [getattr(r, name) for r in runs]

    def med(name: str) -> float:
        return median(per_run(name))

    rss, cpu, startup = med("rss_max"), med("cpu_percent"), med("startup")
    written = [r.written_per_s for r in runs if r.written_per_s is not None]
    written_text = f", {median(written) / 1024:.1f} KiB/s written to disk" if written else ""
    print(f"\nudev source:       {runs[-1].udev}")
    print(f"start-up to READY: {startup:.2f}s (runs: {runs_text(per_run('startup'), '{:.2f}')})")
    print(f"idle RSS, max:     {rss:.1f} MiB (runs: {runs_text(per_run('rss_max'), '{:.1f}')})")
    print(
        f"idle CPU:          {cpu:.3f} % of one core"
        f" (runs: {runs_text(per_run('cpu_percent'), '{:.3f}')}),"
        f" {med('wakeups_per_s'):.0f} wake-ups/s{written_text}"
    )
    rss_met, cpu_met = rss < RSS_TARGET_MIB, cpu < CPU_TARGET_PERCENT
    print(f"\ntarget: idle RSS < {RSS_TARGET_MIB:g} MiB: {rss:.1f} MiB -> {verdict(rss_met)}")
    print(
        f"target: idle CPU < {CPU_TARGET_PERCENT:g} % of one core: {cpu:.3f} %"
        f" -> {verdict(cpu_met)}"
    )
    return [
        Row(
            what=f"Idle RSS, {sources} sources, MQTT sink connected, max over"
            f" {seconds:g} s (`bench/footprint.py`)",
            agent=f"{rss:.1f} MiB",
            beside=f"the Python interpreter alone: {baseline:.1f} MiB",
            target=f"< {RSS_TARGET_MIB:g} MiB: {verdict(rss_met)}",
            met=rss_met,
            values={"rss_max_mib": rss, "python_alone_mib": baseline},
        ),
        Row(
            what=f"Idle CPU, same agent, over {seconds:g} s",
            agent=f"{cpu:.2f} % of one core",
            beside=f"{med('wakeups_per_s'):.0f} wake-ups/s{written_text};"
            f" Mosquitto {med('broker_cpu_percent'):.2f} %",
            target=f"< {CPU_TARGET_PERCENT:g} %: {verdict(cpu_met)}",
            met=cpu_met,
            values={"cpu_percent": cpu, "wakeups_per_s": med("wakeups_per_s")},
        ),
        Row(
            what="Start-up, process spawned → READY=1",
            agent=f"{startup:.2f} s",
            beside=f"sink connected after {med('connected'):.2f} s",
            values={"startup_s": startup, "connected_s": med("connected")},
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="idle window (default 60)")
    parser.add_argument("--repeat", type=int, default=3, help="runs; median")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds after connecting before the window"
    )
    parser.add_argument(
        "--host-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="add a host source (every collector) with this interval",
    )
    parser.add_argument(
        "--journald", action="store_true", help="add a journald source (the system journal)"
    )
    add_output_arguments(parser)
    args = parser.parse_args()
    if args.seconds <= 0 or args.repeat < 1 or args.settle < 0:
        parser.error("--seconds and --repeat must be positive")
    if args.host_interval is not None and args.host_interval < 1:
        parser.error("--host-interval must be at least 1 (the host source's minimum)")
    sources = "file + tail + udev"
    sources += f" + host (every {args.host_interval:g}s)" if args.host_interval else ""
    sources += " + journald" if args.journald else ""
    extra = "".join(
        [
            f", a host source (every {args.host_interval:g}s)" if args.host_interval else "",
            ", a journald source (the system journal)" if args.journald else "",
        ]
    )

    info = machine()
    print_machine(info, args.dir or os.getcwd())
    print(
        "workload:  an idle agent with a file source (a folder), a tail source (a file), a udev"
        f" source{extra}"
        f" and an MQTT sink connected to a local Mosquitto; {args.seconds:g}s window"
        f" after {args.settle:g}s of settling, RSS sampled every second;"
        f" {args.repeat} runs, median"
    )
    baseline = python_alone_rss()
    print(f"beside:    the Python interpreter alone (python -c 'sleep'): {baseline:.1f} MiB RSS")
    print(flush=True)

    runs: list[Run] = []
    with workdir("footprint", args.dir, args.keep) as folder:
        broker = start_broker(folder)
        try:
            assert broker.process is not None
            for number in range(1, args.repeat + 1):
                runs.append(measure(folder, broker.port, broker.process.pid, number, args))
                print_run(number, args.repeat, runs[-1])
        finally:
            broker.stop()

    rows = report(runs, baseline, args.seconds, sources)
    write_results(args.json, "footprint", rows, info)


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as exc:  # the agent or the broker failed: said without a traceback
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:  # the agents and the broker were stopped on the way out
        sys.exit("interrupted")
