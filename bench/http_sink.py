"""The http sink: how fast a backlog of 100,000 events drains to a local HTTP server.

Fills a queue with ``-n`` events (about 200 bytes of data each), then times the
agent's forwarder with the ``http`` sink until the server has answered 200 for
every event. The server is a child process (stdlib ``http.server``, one thread
per connection) that reads each body, un-gzips it, parses the JSON and counts
the events, so its work is not on the forwarder's interpreter lock. Cases:
batches of 100 (the default), 100 with gzip, 1,000, and one event per request
(on a tenth of the events).

    .venv/bin/python bench/http_sink.py [-n 100000] [--repeat 1]
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
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

from bench.common import (  # noqa: E402
    Row,
    add_output_arguments,
    machine,
    print_machine,
    workdir,
    write_results,
)
from edge_agent.event import Event  # noqa: E402
from edge_agent.forwarder import Forwarder  # noqa: E402
from edge_agent.plugins.http_sink import HttpSink  # noqa: E402
from edge_agent.queue import QueueStore, QueueWriter  # noqa: E402
from edge_agent.schema import build  # noqa: E402
from edge_agent.testing import free_port, wait_for  # noqa: E402

DATA = '{"path":"/var/spool/inbox/' + "x" * 150 + '.csv","size":1432}'

SERVER = r"""
import gzip, json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
count = 0
lock = threading.Lock()
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        body = str(count).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        global count
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        parsed = json.loads(body)
        with lock:
            count += len(parsed) if isinstance(parsed, list) else 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
server.daemon_threads = True
server.serve_forever()
"""


def fill(folder: str, count: int) -> QueueStore:
    store = QueueStore(folder)
    store.open()
    writer = QueueWriter(store)
    for start in range(0, count, 1000):
        writer.append(
            [
                (Event(type="file.created", source="inbox"), DATA)
                for _ in range(min(1000, count - start))
            ]
        )
    writer.close()
    return store


def drain(folder: str, url: str, count: int, options: dict) -> tuple[float, int, int]:
    """Events/s to drain ``count`` queued events; and the requests and reused ones."""
    store = fill(folder, count)
    problems: list = []
    config = build(HttpSink.Config, {"url": url, **options}, "bench", problems)
    if problems:
        raise SystemExit(problems)
    sink = HttpSink(name="bench", config=config, agent_id="bench")
    done = threading.Event()

    def on_confirmed() -> None:
        if forwarder.confirmed >= count:
            done.set()

    forwarder = Forwarder(sink, store, on_confirmed=on_confirmed)
    started = time.perf_counter()
    forwarder.start()
    if not done.wait(600):
        raise SystemExit(f"draining took more than 10 minutes: {forwarder.last_error}")
    elapsed = time.perf_counter() - started
    forwarder.abort()
    forwarder.join(10)
    return count / elapsed, sink.requests, sink.reused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="events in the backlog")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; median")
    add_output_arguments(parser)
    args = parser.parse_args()
    info = machine()
    port = free_port()
    url = f"http://127.0.0.1:{port}/ingest"
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    rows = []
    try:

        def up() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                    return True
            except OSError:
                return False

        wait_for(up, 10, "the bench's HTTP server")
        with workdir("http-sink", args.dir, args.keep) as folder:
            print_machine(info, folder)
            print(
                f"workload:  a backlog of {args.n:,} events (~{len(DATA)} bytes of data each),"
                " forwarded to a local stdlib HTTP server (a child process) that parses every body"
            )
            cases = [
                ("batches of 100 (default)", {}, args.n),
                ("batches of 100, gzip", {"gzip": True}, args.n),
                ("batches of 1,000", {"batch_max_events": 1000}, args.n),
                ("one event per request", {"batch_max_events": 1}, args.n // 10),
            ]
            print(f"\n{'case':<28} | {'events':>8} | {'events/s':>9} | requests (reused) | runs")
            print("-" * 86)
            for label, options, count in cases:
                runs = []
                for run in range(args.repeat):
                    queue_dir = os.path.join(folder, f"q-{len(rows)}-{run}")
                    rate, requests, reused = drain(queue_dir, url, count, options)
                    runs.append(rate)
                rate = statistics.median(runs)
                shown = ", ".join(f"{r:,.0f}" for r in runs)
                print(
                    f"{label:<28} | {count:>8,} | {rate:>9,.0f} | {requests:>8,} ({reused:,})"
                    f" | {shown}"
                )
                rows.append(
                    Row(
                        what=f"Drain {count:,} events to a local HTTP server, {label}"
                        " (`bench/http_sink.py`)",
                        agent=f"{rate:,.0f} events/s",
                        values={"events_per_s": rate, "requests": requests, "reused": reused},
                    )
                )
    finally:
        server.terminate()
        server.wait(10)
    write_results(args.json, "http_sink", rows, info)


if __name__ == "__main__":
    main()
