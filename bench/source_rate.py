"""What bench/tail.py and bench/file_burst.py share: a source's rate into the queue.

The real agent runs as a child process (``python -m edge_agent run``) with one source and an
MQTT sink whose broker is away (a loopback port nobody listens on), so events stay in
the queue. A thread of the benchmark reads the queue file (read-only, WAL) every
``POLL`` seconds and notes when the first event was committed and when the last one
was: the rate is measured between those two commits. The agent's CPU seconds over the
same window come from ``/proc``.

``--profile FILE`` records the agent with py-spy during the burst.

``--base REF`` runs the same measurement, alternated run by run in the same process, on
the code of another commit (``git archive REF`` unpacked into the temporary folder and
put first on the child's ``PYTHONPATH``), for an A/B comparison on a busy machine.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.common import ROOT, AgentProcess, NotifySocket, cpu_seconds, plugin_table

#: How often the queue file is looked at while a burst is committed.
POLL = 0.002


def closed_port() -> int:
    """A loopback port nobody listens on (the sink's broker is away)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def away_sink(agent_id: str) -> str:
    """An MQTT sink whose broker is away: events stay queued, as on a device offline."""
    return plugin_table(
        "sinks.mqtt",
        name="away",
        host="127.0.0.1",
        port=closed_port(),
        reconnect_min="1s",
        reconnect_max="5s",
    )


def unpack(ref: str, folder: str) -> str:
    """The code of commit ``ref`` of this checkout, unpacked into ``folder``: its path."""
    target = os.path.join(folder, f"code-{ref.replace('/', '_')}")
    os.makedirs(target)
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", ref, "agent", "plugins"],
        check=True,
        capture_output=True,
    ).stdout
    # Importable under both layouts: edge_agent and edge_agent.plugins (the installed
    # names since 0.1.0's packaging), and agent and plugins (older commits).
    subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
    transform = [
        "--transform",
        "s,^agent,edge_agent,",
        "--transform",
        "s,^plugins,edge_agent/plugins,",
    ]
    subprocess.run(["tar", "-x", "-C", target, *transform], input=archive, check=True)
    return target


class CodeAgent(AgentProcess):
    """The agent as a child process, run from the code in ``code`` (None: this checkout)."""

    def __init__(self, folder: str, config_text: str, code: str | None = None) -> None:
        super().__init__(folder, config_text)
        self.code = code or ROOT

    def start(self) -> CodeAgent:
        self.notify = NotifySocket(os.path.join(self.folder, "notify.sock"))
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "EDGE_AGENT_CONFIG")
        }
        env["NOTIFY_SOCKET"] = self.notify.path
        env["PYTHONPATH"] = self.code
        command = [sys.executable, "-m", "edge_agent", "run", "-c", self.config_path]
        with open(self.log_path, "a") as log:
            self.spawned_at = time.perf_counter()
            self.process = subprocess.Popen(
                command,
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
        return self


@dataclass
class Burst:
    """One burst into the queue: how many, first to last commit, the agent's CPU."""

    count: int
    seconds: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("nan")

    @property
    def cpu_us(self) -> float:
        """The agent's CPU microseconds per item."""
        return self.cpu / self.count * 1e6


def measure_burst(
    agent: CodeAgent,
    queue_path: str,
    make_burst: Callable[[], None],
    expected: int,
    count: int,
    timeout: float = 300.0,
    profile: str | None = None,
    count_sql: str = "SELECT max(position) FROM events",
) -> Burst:
    """Run ``make_burst`` (the agent is READY), then wait until ``expected`` events are in
    the queue; ``count`` items (lines, files) made them. ``profile``: a file for py-spy's
    samples of the agent during the burst (raw format, one line per stack).
    ``count_sql`` counts the events that matter (by default all: positions count from 1
    in a fresh queue, so the highest is how many were committed)."""
    pid = agent.pid
    profiler = None
    if profile:  # py-spy attached for the burst only, stopped with SIGINT (it then writes)
        spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        command = [spy, "record", "--pid", str(pid), "--format", "raw", "--threads"]
        command += ["--rate", "250", "--nonblocking", "-o", profile]
        profiler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # py-spy attaches
    cpu_before = cpu_seconds(pid)
    first: list[float] = []
    last: list[float] = []
    done = threading.Event()

    def watch() -> None:
        conn = sqlite3.connect(f"file:{queue_path}?mode=ro", uri=True, check_same_thread=False)
        try:
            while not done.is_set():
                seen = conn.execute(count_sql).fetchone()[0] or 0
                now = time.perf_counter()
                if seen and not first:
                    first.append(now)
                if seen >= expected:
                    last.append(now)
                    return
                time.sleep(POLL)
        finally:
            conn.close()

    watcher = threading.Thread(target=watch, name="queue-watch", daemon=True)
    watcher.start()
    make_burst()
    agent.wait(lambda: not watcher.is_alive(), timeout, f"{expected} events in the queue")
    done.set()
    cpu = cpu_seconds(pid) - cpu_before
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        _, errors = profiler.communicate(timeout=60)
        if profiler.returncode:
            print(errors.decode(errors="replace")[-500:])
    return Burst(count, last[0] - first[0], cpu)
