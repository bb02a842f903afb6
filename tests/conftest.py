"""Fixtures: a real Mosquitto per test module, and the agent as a real process."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.queue import count_events
from edge_agent.testing import Mosquitto, Subscriber, wait_for


def pytest_report_header(config):
    versions = {name: importlib.metadata.version(name) for name in ("sqlite-utils", "paho-mqtt")}
    return f"sqlite {sqlite3.sqlite_version}, " + ", ".join(f"{k} {v}" for k, v in versions.items())


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """No test reads the machine's config or loads a stray plugin by accident."""
    monkeypatch.setenv("EDGE_AGENT_CONFIG", str(tmp_path / "missing-config.toml"))
    monkeypatch.delenv("EDGE_AGENT_LOAD_PLUGINS", raising=False)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A Mosquitto of this module's own; tests may stop() and start() it."""
    mosquitto = Mosquitto(str(tmp_path_factory.mktemp("mosquitto")))
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


@pytest.fixture
def running_broker(broker):
    """The module's broker, started again if an earlier test left it stopped."""
    if broker.process is None:
        broker.start()
    return broker


@pytest.fixture
def subscriber(running_broker):
    with Subscriber(running_broker.port, "edge/#") as sub:
        yield sub


class AgentProcess:
    """``edge-agent run`` as a real child process, with its config in a temp folder."""

    def __init__(self, workdir: Path, config: str) -> None:
        self.workdir = workdir
        self.config_path = workdir / "agent.toml"
        self.config_path.write_text(textwrap.dedent(config))
        self.state_dir = workdir / "state"
        self.log_path = workdir / "agent.log"
        self.process: subprocess.Popen | None = None
        self.wrapped = False
        self._log = None

    def start(self, wrapper: list[str] | None = None, env: dict | None = None) -> AgentProcess:
        """Start it; ``wrapper`` runs it under a command (strace …); ``env`` adds variables."""
        self._log = open(self.log_path, "a")  # noqa: SIM115 (closed in _close)
        self._started_at = self.log_path.stat().st_size  # this run's lines come after it
        self.wrapped = bool(wrapper)
        self.process = subprocess.Popen(
            [
                *(wrapper or []),
                sys.executable,
                "-m",
                "edge_agent",
                "run",
                "-c",
                str(self.config_path),
            ],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env={**os.environ, **(env or {})},
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        wait_for(lambda: text in self.log(), timeout, f"{text!r} in the agent's log:\n{self.log()}")

    def run_log(self) -> str:
        """What the agent logged since its last start."""
        return self.log()[getattr(self, "_started_at", 0) :]

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until this run is ready: every source listens (READY=1 was sent)."""
        text = "ready: every source listens"
        wait_for(lambda: text in self.run_log(), timeout, f"{text!r} in:\n{self.run_log()}")

    def wait_started(self, timeout: float = 10.0) -> None:
        """Wait until this run is ready (every source listens) and a sink is connected."""
        for text in ("ready: every source listens", "connected to"):
            wait_for(
                lambda text=text: text in self.run_log(),
                timeout,
                f"{text!r} in the agent's log:\n{self.run_log()}",
            )

    @property
    def pid(self) -> int:
        """The agent's own process id, also when it runs under a wrapper."""
        assert self.process is not None
        if not self.wrapped:
            return self.process.pid

        def child() -> int | None:
            path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            children = path.read_text().split() if path.exists() else []
            return int(children[0]) if children else None

        return wait_for(child, 10, "the wrapped agent process")

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        os.kill(self.pid, signal.SIGTERM)
        code = self.process.wait(timeout)
        self._close()
        return code

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.pid, signal.SIGKILL)
        self.process.wait(10)
        self._close()

    def _close(self) -> None:
        self.process = None
        if self._log:
            self._log.close()
            self._log = None

    def queued(self) -> int:
        """Events in the queue file now (0 before it exists)."""
        return count_events(str(self.state_dir / "queue.db"))


@pytest.fixture
def agent_process(tmp_path):
    """Make agents with ``agent_process(config_text)``; each is stopped at the end."""
    made: list[AgentProcess] = []

    def make(config: str) -> AgentProcess:
        agent = AgentProcess(tmp_path, config)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        if agent.process is not None:
            if agent.wrapped and agent.process.poll() is None:
                os.kill(agent.pid, signal.SIGKILL)  # the agent, not just its wrapper
            agent.process.kill()
            agent.process.wait()
            agent._close()


def installed_plugin(
    site: Path, distribution: str, module: str, code: str, plugin: str = ""
) -> dict:
    """A pip-installed plugin as ``pip install`` leaves it: ``module``.py and a dist-info
    (METADATA, an edge_agent entry point ``plugin``, by default the module's name) in
    ``site``. Returns the environment that puts ``site`` on PYTHONPATH for the agent."""
    info = site / f"{distribution.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[edge_agent]\n{plugin or module} = {module}\n")
    (site / f"{module}.py").write_text(code)
    return dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    )


def wait_while_growing(count: Callable[[], int], total: int, what: str, stall: float = 20.0):
    """Wait until ``count()`` reaches ``total``, for as long as it keeps growing: fail once
    it has not grown for ``stall`` seconds, saying how many of ``total`` came. For a big
    delivery on a loaded machine, where how long it takes says nothing, but a stop does."""
    last, since = -1, time.monotonic()
    while True:
        now = count()
        if now >= total:
            return
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall:
            raise AssertionError(f"{what}: {now} of {total}, none more for {stall:g}s")
        time.sleep(0.2)  # ok: a poll interval


def run_cli(*args: str, env: dict | None = None, stdin: str | None = None, cwd=None):
    """``edge-agent ARGS`` as a user types it; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        capture_output=True,
        text=True,
        timeout=30,
        input=stdin,
        env=env,
        cwd=cwd,
    )


def make_files(folder, count: int, prefix: str = "f") -> list[str]:
    """``count`` small CSV files in ``folder``; their paths, in creation order."""
    paths = []
    for i in range(count):
        path = folder / f"{prefix}{i:04d}.csv"
        path.write_text(f"row {i}\n")
        paths.append(str(path))
    return paths


def mqtt_agent_config(tmp_path: Path, port: int, **extra: str) -> str:
    """A config with one file source on tmp_path/inbox and one MQTT sink."""
    (tmp_path / "inbox").mkdir(exist_ok=True)
    sink_extra = extra.get("sink", "")
    source_extra = extra.get("source", "")
    return f"""
        [agent]
        id = "test-gw"
        state_dir = "{tmp_path / "state"}"
        shutdown_grace = "{extra.get("grace", "3s")}"

        [[sources.file]]
        name = "inbox"
        paths = ["{tmp_path / "inbox"}"]
        {source_extra}

        [[sinks.mqtt]]
        name = "cloud"
        host = "127.0.0.1"
        port = {port}
        reconnect_min = "0.05s"
        reconnect_max = "0.5s"
        connect_timeout = "2s"
        {sink_extra}
        """


def inotify_watched(pid: int, folder: Path) -> bool:
    """Whether process ``pid`` holds an inotify watch on ``folder`` now (read from /proc)."""
    inode = folder.stat().st_ino
    fds = Path(f"/proc/{pid}/fdinfo")
    for info in fds.iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue  # the descriptor was closed meanwhile
        for line in text.splitlines():
            if line.startswith("inotify wd:"):
                fields = dict(f.split(":", 1) for f in line.split()[1:] if ":" in f)
                if int(fields.get("ino", "0"), 16) == inode:
                    return True
    return False


def created_paths(events: list[dict]) -> list[str]:
    return [e["data"]["path"] for e in events if e["type"] == "file.created"]


def first_deliveries(events: list[dict]) -> list[dict]:
    """Each event id once, in the order it first arrived."""
    seen: set[str] = set()
    firsts = []
    for event in events:
        if event["id"] not in seen:
            seen.add(event["id"])
            firsts.append(event)
    return firsts


__all__ = ["AgentProcess", "created_paths", "first_deliveries", "mqtt_agent_config", "wait_for"]
