"""What the writer's check that its queue file is still there costs, beside a commit.

Not a test and not run by CI. Before each commit (and when idle, every half
second) the writer ``stat``s the queue's path and compares device and inode
with the file it has open (``QueueWriter.check_file``), so that a deleted or
replaced queue stops the agent before anything more is committed into it.
This prints the cost of one check next to the cost of a one-event commit and
of a 1,000-event commit, with ``synchronous`` FULL, in a temporary folder
under ``--dir`` (default: the current directory, so the disk measured is yours).

    .venv/bin/python bench/file_check.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from edge_agent.event import Event, encode_data  # noqa: E402
from edge_agent.queue import QueueStore, QueueWriter  # noqa: E402


def per_call(function, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        function()
    return (time.perf_counter() - started) / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=os.curdir, help="where to make the temporary folder")
    parser.add_argument("-n", type=int, default=200_000, help="checks to time")
    parser.add_argument("--commits", type=int, default=300, help="commits of each size to time")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="file-check-", dir=args.dir)
    try:
        store = QueueStore(folder, sync="full")
        store.open()
        writer = QueueWriter(store)
        event = Event(type="log.line", source="app", data={"line": "x" * 100})
        one = [(event, encode_data(event.data))]
        thousand = one * 1000
        check = per_call(writer.check_file, args.n)
        commit_1 = per_call(lambda: writer.append(one), args.commits)
        commit_1000 = per_call(lambda: writer.append(thousand), max(1, args.commits // 10))
        writer.close()
    finally:
        shutil.rmtree(folder)
    print(f"check_file (one stat):      {check * 1e6:8.2f} µs")
    print(f"commit of 1 event:          {commit_1 * 1e6:8.0f} µs  (check: {check / commit_1:.2%})")
    print(
        f"commit of 1,000 events:     {commit_1000 * 1e6:8.0f} µs"
        f"  (check: {check / commit_1000:.3%})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
