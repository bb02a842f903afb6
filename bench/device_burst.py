"""A burst of devices while the agent is stalled: how many are reported, and how.

The real agent (``edge-agent run``, a child process) runs a ``udev`` source on
subsystem "net" and a ``stdout`` sink (into a file), with the shipped unit's
privileges: ``setpriv`` takes CAP_NET_ADMIN out of its bounding set, so its
netlink receive buffer is capped by net.core.rmem_max (``--privileged`` keeps
it). The agent is stopped with SIGSTOP (a slow fsync stands in), ``--pairs``
veth pairs are created, and it is continued: the script waits until every
link is reported as added, live or enumerated after the overflow, and prints
how many came which way, the gap events, the overflows counted, the time from
SIGCONT to the last one, and the agent's memory before and after.

Needs root (it creates network links; they are deleted at the end).

    .venv/bin/python bench/device_burst.py [--pairs 3000] [--receive-buffer 128MiB]
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
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from bench.common import (  # noqa: E402
    Row,
    add_output_arguments,
    agent_command,
    agent_toml,
    machine,
    peak_rss_mib,
    plugin_table,
    print_machine,
    rss_mib,
    workdir,
    write_results,
)
from edge_agent.testing import wait_for  # noqa: E402


def ip_batch(commands: list[str]) -> None:
    subprocess.run(
        ["ip", "-force", "-batch", "-"],
        input="".join(f"{command}\n" for command in commands),
        text=True,
        capture_output=True,
        check=False,
    )


def events(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.startswith("{")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3000, help="veth pairs (two links each)")
    parser.add_argument("--receive-buffer", default="128MiB", help="the source's receive_buffer")
    parser.add_argument(
        "--privileged", action="store_true", help="keep CAP_NET_ADMIN (SO_RCVBUFFORCE)"
    )
    parser.add_argument(
        "--running", action="store_true", help="create the links while the agent runs (no SIGSTOP)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait, at most")
    add_output_arguments(parser)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root: it creates network links", file=sys.stderr)
        return 2
    info = machine()
    print_machine(info)
    with open("/proc/sys/net/core/rmem_max") as handle:
        rmem_max = int(handle.read())
    print(f"net.core.rmem_max: {rmem_max:,}")
    tag = f"ebu{os.getpid() % 10000}"
    names = [(f"{tag}x{i}a", f"{tag}x{i}b") for i in range(args.pairs)]
    links = {name for pair in names for name in pair}
    total = len(links)
    rows: list[Row] = []
    with workdir("device-burst", args.dir, args.keep) as folder:
        out = os.path.join(folder, "events.jsonl")
        udev = plugin_table(
            "sources.udev",
            name="devices",
            subsystems=["net"],
            receive_buffer=args.receive_buffer,
        )
        udev += f'match = {{ INTERFACE = "{tag}*" }}\n\n'  # an inline table: not JSON
        tables = udev + plugin_table("sinks.stdout", name="out")
        config = os.path.join(folder, "agent.toml")
        with open(config, "w") as handle:
            handle.write(agent_toml("bench-burst", os.path.join(folder, "state"), tables))
        log_path = os.path.join(folder, "agent.log")
        drop = [] if args.privileged else ["setpriv", "--bounding-set=-net_admin", "--"]
        with open(out, "w") as stdout, open(log_path, "w") as stderr:
            # setpriv execs the agent: process.pid is the agent's.
            process = subprocess.Popen(
                [*drop, *agent_command(), "run", "-c", config], stdout=stdout, stderr=stderr
            )
        try:

            def log() -> str:
                with open(log_path) as handle:
                    text = handle.read()
                if process.poll() is not None:
                    raise RuntimeError(f"the agent exited with {process.returncode}:\n{text}")
                return text

            wait_for(lambda: "every source listens" in log(), 60, "the agent's ready line")
            buffer = re.search(r"netlink receive buffer: ([0-9]+) bytes", log())
            rss_before = rss_mib(process.pid)
            if not args.running:
                os.kill(process.pid, signal.SIGSTOP)
            started = time.perf_counter()
            try:
                ip_batch([f"link add {a} type veth peer name {b}" for a, b in names])
                created = time.perf_counter() - started
            finally:
                if not args.running:
                    os.kill(process.pid, signal.SIGCONT)
            continued = time.perf_counter()

            def added() -> dict[str, dict]:
                return {
                    e["data"]["sys_name"]: e["data"]
                    for e in events(out)
                    if e["type"] == "device.added"
                }

            wait_for(lambda: links <= set(added()), args.timeout, "every link reported")
            took = time.perf_counter() - continued
            rss_after, peak = rss_mib(process.pid), peak_rss_mib(process.pid)
            status_file = os.path.join(folder, "state", "status.json")

            def source_status() -> dict:
                with open(status_file) as handle:
                    return json.load(handle)["sources"]["devices"]

            # A snapshot written after every event was committed (one every 5 s).
            wait_for(lambda: source_status()["events"] >= total, 30, "a fresh status.json")
            overflows = source_status()["counters"].get("overflows", 0)
            reported = added()
            enumerated = sum(1 for d in reported.values() if d.get("enumerated"))
            gaps = [e for e in events(out) if e["type"] == "device.gap"]
            restarts = log().count("restarting it in")
        finally:
            ip_batch([f"link del {a}" for a, _ in names])
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    print(f"privileges:        {'CAP_NET_ADMIN' if args.privileged else 'without CAP_NET_ADMIN'}")
    print(f"receive buffer:    {buffer.group(1) if buffer else '?'} bytes")
    state = "running" if args.running else "stopped"
    print(f"links created:     {total:,} ({args.pairs:,} pairs, in {created:.1f}s, agent {state})")
    print(f"reported added:    {len(reported):,} of {total:,}")
    print(f"  live:            {total - enumerated:,}")
    print(f"  enumerated:      {enumerated:,}")
    print(f"device.gap events: {len(gaps)}; overflows counted: {overflows}; restarts: {restarts}")
    print(f"all reported:      {took:.1f}s after the links were created")
    print(f"agent RSS:         {rss_before:.1f} MiB before, {rss_after:.1f} after, peak {peak:.1f}")
    rows.append(
        Row(
            what=f"{total:,} links created while the agent is stalled: reported",
            agent=f"{len(reported):,} ({enumerated:,} enumerated), {len(gaps)} device.gap",
            target=f"{total:,}, and a device.gap if events were lost",
            met=len(reported) == total and len(gaps) >= (overflows > 0),
            values={"reported": len(reported), "enumerated": enumerated, "seconds": took},
        )
    )
    write_results(args.json, "device_burst", rows, info)
    return 0 if rows[0].met else 1


if __name__ == "__main__":
    sys.exit(main())
