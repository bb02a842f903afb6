"""What ``make run`` runs: the agent on config/agent.toml, with a broker to talk to.

The configured broker is ``$MQTT_HOST:$MQTT_PORT`` (default 127.0.0.1:1883, as in
config/agent.toml). Where it answers, the agent uses it, and this says so. Where
nothing answers on a loopback address and Mosquitto is installed (on PATH or
/usr/sbin/mosquitto), a throwaway Mosquitto is started for the session: on a
free loopback port, in a temporary folder of its own, without persistence; the
agent is pointed at it, every message that arrives there is printed, and the
broker is stopped and its folder removed when the agent exits (Ctrl-C included).
Otherwise the agent runs as it always does: events wait on disk until a broker
answers.

    .venv/bin/python tools/run.py [-c config/agent.toml]

Ctrl-C (SIGINT) or SIGTERM stops the agent as ``edge-agent run`` does; the exit
status is the agent's.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import FrameType
from typing import Any

from edge_agent.testing import free_port, mosquitto_binary

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1883
DEFAULT_CONFIG = "config/agent.toml"
PR_SET_PDEATHSIG = 1


def say(text: str) -> None:
    """One line for the person at the terminal (stdout; the agent logs on stderr)."""
    print(f"[make run] {text}", flush=True)


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts a TCP connection on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if this script dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ThrowawayBroker:
    """A Mosquitto for this session only: a free loopback port, a temporary folder, no
    persistence, in a session of its own (the terminal's Ctrl-C is not for it: it is
    stopped after the agent, so the agent can still send what it has)."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.folder = tempfile.mkdtemp(prefix="edge-agent-mosquitto-")
        self.port = free_port()
        self.log_path = os.path.join(self.folder, "mosquitto.log")
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        config = os.path.join(self.folder, "mosquitto.conf")
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            f"log_dest file {self.log_path}",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto' and cannot read its folder
        with open(config, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        self.process = subprocess.Popen(
            [self.binary, "-c", config],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # started before any thread of this script
        )
        deadline = time.monotonic() + timeout
        while not answers("127.0.0.1", self.port, timeout=0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not start: {self._log_tail()}")
            time.sleep(0.05)  # poll interval, bounded by the deadline above

    def _log_tail(self) -> str:
        try:
            with open(self.log_path) as handle:
                return handle.read()[-500:].strip() or "(its log is empty)"
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, wait (SIGKILL after 5 s), and remove its folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


class Watcher:
    """Prints every message that arrives on the broker, one line each: subscribed when made,
    printing once :meth:`start` ed (paho's thread; none before, so children can be forked)."""

    def __init__(self, port: int, topic: str = "#", timeout: float = 10.0) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.topic = topic
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edge-agent-make-run-{os.getpid()}"
        )
        self.subscribed = False
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        deadline = time.monotonic() + timeout
        while not self.subscribed:
            if time.monotonic() > deadline:
                raise OSError(f"no SUBACK from 127.0.0.1:{port} within {timeout:g}s")
            self.client.loop(0.1)

    def start(self) -> None:
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, reasons: Any, props: Any) -> None:
        self.subscribed = True

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with contextlib.suppress(Exception):  # never end paho's thread over a line of output
            say(f"arrived on {message.topic}: {summary(message.payload)}")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
            self.client.loop_stop()


def summary(payload: bytes, limit: int = 200) -> str:
    """A CloudEvent's type and data (or the payload itself), on one line."""
    try:
        event = json.loads(payload)
        text = f"{event['type']} {json.dumps(event.get('data'), ensure_ascii=False)}"
    except (ValueError, KeyError, TypeError):
        text = payload.decode("utf-8", "replace")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _same(path: str, other: str) -> bool:
    try:
        return os.path.samefile(path, other)
    except OSError:
        return False


def agent_command(config: str) -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "edge-agent")
    if os.access(script, os.X_OK):
        return [script, "run", "-c", config]
    return [sys.executable, "-m", "edge_agent", "run", "-c", config]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="the config file")
    args = parser.parse_args()

    host = os.environ.get("MQTT_HOST") or DEFAULT_HOST
    try:
        port = int(os.environ.get("MQTT_PORT") or DEFAULT_PORT)
    except ValueError:
        port = DEFAULT_PORT  # the agent's check names the bad value
    env = dict(os.environ)
    agent: subprocess.Popen | None = None
    received: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        if agent is not None:
            with contextlib.suppress(ProcessLookupError):
                agent.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)

    broker: ThrowawayBroker | None = None
    watcher: Watcher | None = None
    try:
        broker = find_broker(host, port, env)
        if broker is not None:
            try:
                watcher = Watcher(broker.port)
            except OSError as exc:
                say(f"cannot watch the throwaway broker: {exc}")
            else:
                inbox = "var/inbox" if _same(args.config, DEFAULT_CONFIG) else "a watched folder"
                say(f"drop a file into {inbox} and watch it arrive here; Ctrl-C stops")
        stops = [s for s in received if s != signal.SIGHUP]
        if stops:
            return 128 + stops[0]  # stopped before the agent started
        # In a process group of its own, so that the terminal's Ctrl-C reaches it once (from
        # here); stopped if this script dies. Forked before any thread of this script starts.
        agent = subprocess.Popen(
            agent_command(args.config), env=env, process_group=0, preexec_fn=_die_with_parent
        )
        if watcher is not None:
            watcher.start()
        for signum in received:  # any that came while it was being started
            agent.send_signal(signum)
        return agent.wait()
    finally:
        if watcher is not None:
            watcher.stop()
        if broker is not None:
            broker.stop()
            say(f"stopped the throwaway Mosquitto on 127.0.0.1:{broker.port}")


def find_broker(host: str, port: int, env: dict[str, str]) -> ThrowawayBroker | None:
    """Say which broker the agent will use; start (and return) a throwaway one where nothing
    answers on a loopback ``host:port`` and Mosquitto is installed, pointing ``env`` at it."""
    if answers(host, port):
        say(
            f"using the MQTT broker that answers on {host}:{port} (MQTT_HOST, MQTT_PORT);"
            f" watch the events with: mosquitto_sub -h {host} -p {port} -t 'edge/#' -v"
        )
        return None
    if not is_loopback(host):
        say(f"nothing answers on {host}:{port}; events wait on disk until the broker answers")
        return None
    try:
        binary = mosquitto_binary()
    except RuntimeError:  # not installed
        binary = None
    if binary is None:
        say(
            f"nothing answers on {host}:{port}, and Mosquitto is not installed: events wait on"
            " disk until a broker answers there. Install it (Debian: apt-get install mosquitto)"
            " for a throwaway one each session, or set MQTT_HOST and MQTT_PORT to your broker"
        )
        return None
    broker = ThrowawayBroker(binary)
    try:
        broker.start()
    except RuntimeError as exc:
        say(f"{exc}; events wait on disk until a broker answers on {host}:{port}")
        return None
    assert broker.process is not None
    env["MQTT_HOST"], env["MQTT_PORT"] = "127.0.0.1", str(broker.port)
    say(
        f"nothing answers on {host}:{port}: started a throwaway Mosquitto (pid"
        f" {broker.process.pid}) on 127.0.0.1:{broker.port} for this session, in"
        f" {broker.folder}; it stops with the agent"
    )
    return broker


if __name__ == "__main__":
    sys.exit(main())
