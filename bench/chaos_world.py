"""The chaos soak's world: the real agent, a broker behind a cuttable link, a subscriber,
the agent's state dir on a small tmpfs, and the producers that feed the agent.

Everything runs on loopback in one temporary folder; :meth:`World.close` stops every
process it started and unmounts the tmpfs, whatever happened before.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from bench.chaos_oracle import Ledger, serial_text, serials_in
from bench.common import NotifySocket
from edge_agent.testing import CuttableProxy, Mosquitto, Subscriber, wait_for

AGENT_ID = "chaos"
#: Serials the exec command prints start above this: the ledger numbers the others.
EXEC_BASE = 500_000_000
#: The broker takes no packet larger than this (advertised in its CONNACK).
MAX_PACKET = 16 * 1024
#: The agent's state dir: a tmpfs of this size, and what the queue keeps free on it.
TMPFS_SIZE = "48m"
RESERVE_FREE = "2MiB"
#: The exec source's run timeout: a run cut by an agent stop happened within it.
EXEC_TIMEOUT = 5.0

EXEC_SCRIPT = r"""
[ -e "$STOP" ] && exit 0
exec 9>>"$COUNTER.lock"; flock 9
n=$(cat "$COUNTER" 2>/dev/null || echo {base})
n=$((n + 1))
echo "$n" > "$COUNTER.tmp" && mv "$COUNTER.tmp" "$COUNTER"
echo "$n $(date +%s.%N)" >> "$LEDGER"
printf 'ser-%09d\n' "$n"
""".replace("{base}", str(EXEC_BASE))


def toml_value(value: object) -> str:
    """A TOML value: JSON writes strings, numbers, booleans and lists the way TOML reads
    them; a dict becomes an inline table."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def table(section: str, **values: object) -> str:
    lines = [f"[[{section}]]"] + [f"{key} = {toml_value(v)}" for key, v in values.items()]
    return "\n".join(lines) + "\n\n"


class Agent:
    """``python -m edge_agent run -c FILE`` as a child; READY=1 read from a notify socket."""

    def __init__(self, folder: str, config_path: str) -> None:
        self.folder = folder
        self.config_path = config_path
        self.log_path = os.path.join(folder, "agent.log")
        self.process: subprocess.Popen | None = None
        self.notify: NotifySocket | None = None

    def start(self) -> Agent:
        sock = os.path.join(self.folder, "notify.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        self.notify = NotifySocket(sock)
        env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
        env["NOTIFY_SOCKET"] = sock
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edge_agent", "run", "-c", self.config_path],
                cwd=self.folder,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = 120.0) -> None:
        def ready() -> bool:
            if not self.running():
                code = self.process.returncode if self.process else None
                raise RuntimeError(f"the agent exited with status {code}:\n{self.log_tail()}")
            return self.notify is not None and self.notify.ready.is_set()

        try:
            wait_for(ready, timeout, "the agent's READY=1")
        except AssertionError as exc:
            raise RuntimeError(f"{exc}; the agent's log ends:\n{self.log_tail()}") from None

    def signal(self, signum: int) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGCONT)  # in case it was stopped
                self.process.kill()
            self.process.wait()
        self._forget()

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not end in time. Its exit status."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGCONT)
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    print(f"  the agent did not stop within {timeout:g}s; killing it")
                    self.process.kill()
                    self.process.wait()
            code = self.process.returncode
        self._forget()
        return code

    def _forget(self) -> None:
        self.process = None
        if self.notify is not None:
            self.notify.close()
            self.notify = None

    def log(self) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as handle:
            return handle.read()
        return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


class CountingSubscriber(Subscriber):
    """:class:`edge_agent.testing.Subscriber` that counts its acknowledged subscriptions, one
    per (re)connection, so a broker restart can wait until it is back."""

    def __init__(self, port: int, topic: str) -> None:
        super().__init__(port, topic)
        self.subscriptions = 0
        inner = self.client.on_subscribe

        def on_subscribe(*args: object) -> None:
            self.subscriptions += 1
            inner(*args)

        self.client.on_subscribe = on_subscribe


class World:
    """Folders, broker, link, subscriber, tmpfs and agent of one chaos run."""

    def __init__(self, folder: str, ledger: Ledger) -> None:
        self.folder = folder
        self.ledger = ledger
        self.inbox = os.path.join(folder, "inbox")
        self.denied = os.path.join(self.inbox, "denied")
        self.logs = os.path.join(folder, "logs")
        self.app_log = os.path.join(self.logs, "app.log")
        self.app2_log = os.path.join(self.logs, "app2.log")
        self.state = os.path.join(folder, "state")
        self.db_path = os.path.join(self.state, "queue.db")
        self.exec_dir = os.path.join(folder, "exec")
        self.config_path = os.path.join(folder, "agent.toml")
        self.acl_path = os.path.join(folder, "acl")
        self.mounted = False
        self.closed = False
        self.broker: Mosquitto | None = None
        self.broker_paused = False
        self.proxy: CuttableProxy | None = None
        self.subscriber: CountingSubscriber | None = None
        self._arrived: set[int] = set()  # serials the subscriber has seen (sweep_inbox)
        self._arrived_read = 0
        self.agent = Agent(folder, self.config_path)
        self.variant = "full"
        #: (stopped, ready again) of every agent stop, for the oracle's "cut".
        self.stops: list[tuple[float, float]] = []
        #: The tail producer holds it while it writes; rotation holds it to rotate.
        self.log_lock = threading.Lock()
        self.rotations = 0

    # -- set-up and tear-down -------------------------------------------------------

    def open(self) -> None:
        for path in (self.inbox, self.denied, self.logs, self.state, self.exec_dir):
            os.makedirs(path, exist_ok=True)
        for path in (self.app_log, self.app2_log):
            open(path, "a").close()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", self.state],
            check=True,
        )
        self.mounted = True
        with open(self.acl_path, "w") as handle:
            handle.write("topic readwrite #\n")
            # The ACL poison: files in inbox/denied/ map to topics the broker refuses.
            handle.write(f"topic deny edge/{AGENT_ID}/inbox/+/{self.denied}/#\n")
        broker_config = "\n".join(
            [
                "max_inflight_messages 100",
                "max_queued_messages 1000000",  # 0 would disconnect a client on an ACL refusal
                f"acl_file {self.acl_path}",
                f"max_packet_size {MAX_PACKET}",
                *(["log_type all"] if os.environ.get("CHAOS_BROKER_DEBUG") else []),
            ]
        )
        self.broker = Mosquitto(os.path.join(self.folder, "mosquitto"), extra_config=broker_config)
        self.broker.start()
        self.proxy = CuttableProxy(self.broker.port).start()
        self.subscriber = CountingSubscriber(self.broker.port, "edge/#").start()
        self.write_config("full")
        self.agent.start()
        self.agent.wait_ready()

    def close(self) -> None:
        """Stop everything started, each step on its own so one failure skips none."""
        if self.closed:
            return
        self.closed = True
        steps = [
            self.agent.kill,
            self.resume_broker,
            lambda: self.subscriber and self.subscriber.stop(),
            lambda: self.proxy and self.proxy.stop(),
            lambda: self.broker and self.broker.stop(),
            self.unmount,
        ]
        for step in steps:
            try:
                step()
            except Exception as exc:  # go on with the rest of the clean-up
                print(f"  clean-up: {exc}")

    def unmount(self) -> None:
        if self.mounted:
            result = subprocess.run(["umount", self.state], capture_output=True, text=True)
            if result.returncode != 0:
                subprocess.run(["umount", "-l", self.state], check=True)
            self.mounted = False

    # -- the agent's config -----------------------------------------------------------

    def config_text(self, variant: str) -> str:
        """``full``: every source, 100 in flight; ``lean`` (a SIGHUP's other choice): no
        second tail source, 20 in flight."""
        assert self.proxy is not None
        text = (
            f'[agent]\nid = "{AGENT_ID}"\nstate_dir = "{self.state}"\n'
            'shutdown_grace = "2s"\nlog_level = "info"\n\n'
            f'[queue]\nwhen_full = "block"\nreserve_free = "{RESERVE_FREE}"\n'
            'max_bytes = "32MiB"\n\n'
        )
        text += table("sources.file", name="inbox", paths=[self.inbox], recursive=True)
        text += table("sources.tail", name="app", paths=[self.app_log], start_at="beginning")
        if variant == "full":
            text += table("sources.tail", name="app2", paths=[self.app2_log], start_at="beginning")
        text += table(
            "sources.exec",
            name="counter",
            command=["/bin/sh", "-c", EXEC_SCRIPT],
            interval="0.5s",
            timeout=f"{EXEC_TIMEOUT:g}s",
            env={
                "COUNTER": os.path.join(self.exec_dir, "counter"),
                "LEDGER": os.path.join(self.exec_dir, "ledger"),
                "STOP": os.path.join(self.exec_dir, "stop"),
            },
        )
        text += table(
            "sinks.mqtt",
            name="broker",
            host="127.0.0.1",
            port=self.proxy.port,
            protocol="5",
            qos=1,
            topic="edge/{agent}/{source}/{type}/{data.path}",
            max_inflight=100 if variant == "full" else 20,
            connect_timeout="2s",
            ack_timeout="5s",
            reconnect_min="0.1s",
            reconnect_max="2s",
        )
        return text

    def write_config(self, variant: str) -> None:
        with open(self.config_path + ".tmp", "w") as handle:
            handle.write(self.config_text(variant))
        os.replace(self.config_path + ".tmp", self.config_path)
        self.variant = variant

    def reload(self, variant: str, timeout: float = 60.0) -> None:
        """Write the config ``variant`` and SIGHUP the agent; wait until it says it reloaded."""
        before = self.agent.log().count("SIGHUP: configuration reloaded")
        self.write_config(variant)
        self.agent.signal(signal.SIGHUP)
        wait_for(
            lambda: self.agent.log().count("SIGHUP: configuration reloaded") > before,
            timeout,
            "the agent to reload its configuration",
        )

    # -- the agent's life ---------------------------------------------------------------

    def stop_agent(self, how: int) -> float:
        """SIGKILL or SIGTERM the agent; when it was stopped."""
        stopped = time.time()
        if how == signal.SIGKILL:
            self.agent.kill()
        else:
            self.agent.terminate()
        return stopped

    def start_agent(self, stopped: float) -> None:
        self.agent.start()
        self.agent.wait_ready()
        self.stops.append((stopped, time.time()))

    def resume_broker(self) -> None:
        if self.broker_paused and self.broker and self.broker.process:
            self.broker.process.send_signal(signal.SIGCONT)
        self.broker_paused = False

    def sweep_inbox(self) -> int:
        """Act as the inbox's consumer: delete the files whose events have arrived upstream,
        as an application that processes an inbox does. Without it the inbox only grows
        (450,000 files in 30 minutes), and so does the file source's index of it, until it
        fills the small state disk the soak gives the agent. Returns how many went."""
        assert self.subscriber is not None
        messages = self.subscriber.messages
        for message in messages[self._arrived_read : len(messages)]:
            self._arrived |= serials_in(message.payload.decode("utf-8", "replace"))
            self._arrived_read += 1
        removed = 0
        with os.scandir(self.inbox) as entries:
            for entry in entries:
                found = serials_in(entry.name)
                if entry.is_file() and found and found <= self._arrived:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        return removed

    # -- what producers make --------------------------------------------------------------

    def make_file(self, folder: str | None = None, suffix: str = ".txt") -> int:
        serial = self.ledger.take()
        path = os.path.join(folder or self.inbox, serial_text(serial) + suffix)
        at = time.time()
        with open(path, "w") as handle:
            handle.write(f"{serial}\n")
        self.ledger.note(serial, "file", path, at)
        return serial

    def write_line(self, path: str, padding: int = 40) -> int:
        serial = self.ledger.take()
        line = f"{serial_text(serial)} " + "x" * padding + "\n"
        with self.log_lock:
            at = time.time()
            with open(path, "a") as handle:
                handle.write(line)
            self.ledger.note(serial, "tail", path, at)
        return serial

    def rotate(self, copytruncate: bool, keep: bool = True) -> None:
        """logrotate on app.log: generations shift up (app.log.1 → app.log.2 ...), then
        app.log is renamed to app.log.1, or copied there and truncated (no line is
        written between the copy and the truncation: the producer waits). ``keep=False``
        deletes app.log.1 afterwards, unread lines and all (logrotate's "rotate 0")."""
        with self.log_lock:
            numbers = []
            for name in os.listdir(self.logs):
                match = re.fullmatch(r"app\.log\.(\d+)", name)
                if match:
                    numbers.append(int(match[1]))
            for number in sorted(numbers, reverse=True):
                base = os.path.join(self.logs, "app.log.")
                os.rename(f"{base}{number}", f"{base}{number + 1}")
            if copytruncate:
                shutil.copyfile(self.app_log, self.app_log + ".1")
                os.truncate(self.app_log, 0)
            else:
                os.rename(self.app_log, self.app_log + ".1")
                # Created while the old file still exists, so it cannot reuse its inode.
                open(self.app_log, "a").close()
                if not keep:
                    os.unlink(self.app_log + ".1")
            self.rotations += 1

    def replace_log(self) -> None:
        """Delete app.log and create it anew, unread lines and all; the new file may get
        the old one's inode number back."""
        with self.log_lock:
            os.unlink(self.app_log)
            open(self.app_log, "a").close()
            self.rotations += 1

    def exec_serials(self) -> None:
        """Note the serials the exec command printed (its own ledger) in the ledger."""
        path = os.path.join(self.exec_dir, "ledger")
        with contextlib.suppress(FileNotFoundError), open(path) as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 2:
                    self.ledger.note(int(parts[0]), "exec", "exec", float(parts[1]))

    def stop_exec(self) -> None:
        open(os.path.join(self.exec_dir, "stop"), "w").close()


class Producers:
    """Threads that write files, log lines and second-log lines at steady rates."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._loop, args=(world.make_file, 0.1), daemon=True),
            threading.Thread(
                target=self._loop, args=(lambda: world.write_line(world.app_log), 0.02), daemon=True
            ),
            threading.Thread(
                target=self._loop, args=(lambda: world.write_line(world.app2_log), 0.1), daemon=True
            ),
        ]

    def _loop(self, make, every: float) -> None:
        # A steady rate by design: each producer makes one item every ``every`` seconds.
        while not self.stopping.wait(every):
            try:
                make()
            except OSError as exc:
                self.errors.append(str(exc))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            if thread.ident is not None:
                thread.join(10)
