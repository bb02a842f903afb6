"""`make run` on a machine with no broker: a throwaway Mosquitto for the session.

tools/run.py is what the target runs. Where nothing answers on MQTT_HOST:MQTT_PORT
it starts Mosquitto on a free loopback port, points the agent at it and prints what
arrives; Ctrl-C stops the agent, then the broker. Where a broker answers, the agent
uses it and the script says which.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edge_agent.testing import Mosquitto, Subscriber, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "run.py"

pytestmark = pytest.mark.skipif(
    not (
        any(os.access(os.path.join(d, "mosquitto"), os.X_OK) for d in os.get_exec_path())
        or os.access("/usr/sbin/mosquitto", os.X_OK)
    ),
    reason="needs the mosquitto binary",
)


class Session:
    """tools/run.py as `make run` starts it, in a session of its own (a terminal's Ctrl-C
    goes to its whole foreground process group: here, ``os.killpg``)."""

    def __init__(self, workdir: Path, port: int) -> None:
        (workdir / "var" / "inbox").mkdir(parents=True)
        (workdir / "var" / "state").mkdir()
        env = {k: v for k, v in os.environ.items() if k != "MQTT_HOST"}
        env.update(MQTT_PORT=str(port), EDGE_AGENT_ID="firstrun", PYTHONUNBUFFERED="1")
        self.inbox = workdir / "var" / "inbox"
        self.log_path = workdir / "agent.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "-c", str(ROOT / "config" / "agent.toml")],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def line(self, pattern: str, timeout: float = 20.0) -> re.Match:
        def found() -> re.Match | None:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            return None

        return wait_for(found, timeout, f"a line matching {pattern!r}; got {self.lines}")

    def ready(self) -> None:
        wait_for(
            lambda: "ready: every source listens" in self.log_path.read_text(),
            30,
            "the agent to say it is ready",
        )

    def interrupt(self) -> int:
        """Ctrl-C, as a terminal sends it; the exit status."""
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(30)

    def kill(self) -> None:
        """Whatever is left of it (after a failure), and its pipe and log closed."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._reader.join(5)
        assert self.process.stdout is not None
        self.process.stdout.close()
        self._log.close()


def refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


def test_no_broker_starts_a_throwaway_one_and_shows_events(tmp_path):
    configured = free_port()  # nothing answers there
    session = Session(tmp_path, configured)
    try:
        started = session.line(
            r"nothing answers on 127\.0\.0\.1:(\d+): started a throwaway Mosquitto"
            r" \(pid (\d+)\) on 127\.0\.0\.1:(\d+) for this session, in (\S+);"
        )
        assert int(started[1]) == configured
        pid, port, folder = int(started[2]), int(started[3]), started[4]
        assert port != configured and not refuses(port) and os.path.isdir(folder)
        session.line(r"drop a file into .* and watch it arrive here; Ctrl-C stops")
        session.ready()
        (session.inbox / "hello.txt").write_text("hello\n")
        session.line(r"arrived on edge/firstrun/inbox/file\.created: file\.created .*hello\.txt")
        assert session.interrupt() == 0
    finally:
        session.kill()
    assert f"[make run] stopped the throwaway Mosquitto on 127.0.0.1:{port}" in session.lines
    log = session.log_path.read_text()
    assert log.count("received SIGINT; stopping") == 1, log
    assert "0 events left queued" in log, log
    assert refuses(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the broker is gone (reaped: no zombie either)
    assert not os.path.exists(folder)


def test_a_broker_that_answers_is_used(tmp_path):
    with Mosquitto(str(tmp_path / "broker")) as broker, Subscriber(broker.port, "edge/#") as sub:
        session = Session(tmp_path / "run", broker.port)
        try:
            session.line(rf"using the MQTT broker that answers on 127\.0\.0\.1:{broker.port}")
            session.ready()
            (session.inbox / "hello.txt").write_text("hello\n")
            wait_for(
                lambda: any(m.topic == "edge/firstrun/inbox/file.created" for m in sub.messages),
                20,
                "the event on the broker that answered",
            )
            assert session.interrupt() == 0
        finally:
            session.kill()
    assert not any("throwaway" in line for line in session.lines)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_runs_the_script():
    dry = subprocess.run(
        ["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    )
    assert "tools/run.py -c config/agent.toml" in dry.stdout
