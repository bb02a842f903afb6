"""A serial port flooded: is every byte either sent or counted as dropped?

The real agent (``edge-agent run``, a child process) reads a pty with a
``serial`` source (``max_line_bytes`` 4096) and writes its events with a
``stdout`` sink into a file. The script writes ``--mb`` MB into the pty as
fast as the agent takes it: lines of 100 bytes, and every ``--long-every``
lines one of 10,000 bytes (cut), then a final line of 1 MB without a newline
(cut) followed by "end". It then checks the books: bytes in serial.line
events + dropped_bytes (status.json) + newlines = bytes written, every short
line arrived, and the serial.gap events add up to dropped_bytes. It prints
the rate and the agent's memory.

    .venv/bin/python bench/serial_flood.py [--mb 20] [--long-every 100]
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
    workdir,
    write_results,
)
from edge_agent.testing import wait_for  # noqa: E402

LIMIT = 4096


def stream(megabytes: float, long_every: int) -> tuple[bytes, int, int]:
    """The bytes to write, the short lines in them, and the bytes that must be dropped."""
    parts, short, dropped, n = [], 0, 0, 0
    size = 0
    while size < megabytes * 1_000_000:
        n += 1
        if n % long_every == 0:
            line = b"L" * 10_000
            dropped += len(line) - LIMIT
        else:
            line = b"%099d" % n
            short += 1
        parts.append(line + b"\n")
        size += len(line) + 1
    parts.append(b"x" * 1_000_000 + b"\nend\n")
    dropped += 1_000_000 - LIMIT
    return b"".join(parts), short, dropped


def events(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.startswith("{")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=20.0, help="megabytes of lines to write")
    parser.add_argument("--long-every", type=int, default=100, help="one long line in N")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait, at most")
    add_output_arguments(parser)
    args = parser.parse_args()
    info = machine()
    print_machine(info)
    data, short, dropped = stream(args.mb, args.long_every)
    with workdir("serial-flood", args.dir, args.keep) as folder:
        master, slave = os.openpty()
        port = os.ttyname(slave)
        tables = plugin_table(
            "sources.serial", name="meter", port=port, baudrate=115200, max_line_bytes=LIMIT
        ) + plugin_table("sinks.stdout", name="out")
        config = os.path.join(folder, "agent.toml")
        with open(config, "w") as handle:
            handle.write(agent_toml("bench-serial", os.path.join(folder, "state"), tables))
        out, log_path = os.path.join(folder, "events.jsonl"), os.path.join(folder, "agent.log")
        with open(out, "w") as stdout, open(log_path, "w") as stderr:
            process = subprocess.Popen(
                [*agent_command(), "run", "-c", config], stdout=stdout, stderr=stderr
            )
        try:

            def log() -> str:
                with open(log_path) as handle:
                    text = handle.read()
                if process.poll() is not None:
                    raise RuntimeError(f"the agent exited with {process.returncode}:\n{text}")
                return text

            wait_for(lambda: "every source listens" in log(), 60, "the agent's ready line")
            started = time.perf_counter()
            view = memoryview(data)
            while view:  # blocks while the pty is full: as fast as the agent reads
                view = view[os.write(master, view) :]

            def lines() -> list[dict]:
                return [e for e in events(out) if e["type"] == "serial.line"]

            wait_for(
                lambda: any(e["data"]["line"] == "end" for e in lines()), args.timeout, '"end"'
            )
            took = time.perf_counter() - started
            peak = peak_rss_mib(process.pid)
            status_file = os.path.join(folder, "state", "status.json")

            def source_status() -> dict:
                with open(status_file) as handle:
                    return json.load(handle)["sources"]["meter"]

            received = lines()
            wait_for(lambda: source_status()["events"] >= len(received), 30, "a fresh status.json")
            counters = source_status()["counters"]
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
            os.close(master)
            os.close(slave)
        gaps = [e["data"] for e in events(out) if e["type"] == "serial.gap"]
    sent = sum(len(e["data"]["line"]) for e in received)
    newlines = data.count(b"\n")
    balance = len(data) - sent - counters.get("dropped_bytes", 0) - newlines
    short_in = sum(1 for e in received if len(e["data"]["line"]) == 99)
    rate = len(data) / took / 1e6
    print(f"written:           {len(data):,} bytes in {took:.1f}s ({rate:.1f} MB/s)")
    print(f"lines received:    {len(received):,} ({short_in:,} of {short:,} short ones)")
    print(f"bytes in lines:    {sent:,}")
    print(f"dropped_bytes:     {counters.get('dropped_bytes', 0):,} (expected {dropped:,})")
    print(f"truncated_lines:   {counters.get('truncated_lines', 0):,}")
    print(f"serial.gap events: {len(gaps)}, adding up to {sum(g['dropped_bytes'] for g in gaps):,}")
    print(f"unaccounted:       {balance:,} bytes")
    print(f"agent peak RSS:    {peak:.1f} MiB")
    met = balance == 0 and short_in == short and counters.get("dropped_bytes") == dropped
    rows = [
        Row(
            what=f"{len(data) / 1e6:.0f} MB into a pty, over-long lines among them: unaccounted",
            agent=f"{balance:,} bytes, {rate:.1f} MB/s",
            target="0 bytes",
            met=met,
            values={"unaccounted": balance, "seconds": took, "dropped": dropped},
        )
    ]
    write_results(args.json, "serial_flood", rows, info)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
