"""Network faults between the agent and its broker, with the agent as a real process.

Two test doubles live here, both plain threads and sockets on 127.0.0.1:

- ``SilentBroker`` accepts MQTT connections, answers CONNECT with a valid
  CONNACK and then reads and discards everything: it never acknowledges a
  PUBLISH. The agent must time out, reconnect, re-send, keep every event on
  disk and not grow.
- ``CuttableProxy`` forwards TCP to a real Mosquitto; ``cut()`` drops every
  connection and refuses new ones until ``restore()``. Flapping it while files
  arrive must lose nothing, and the agent must back off instead of spinning.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import defaultdict

import pytest
from conftest import created_paths, make_files, mqtt_agent_config

from edge_agent.testing import (
    CuttableProxy,
    Listener,
    Mosquitto,
    Subscriber,
    free_port,
    shutdown_socket,
    wait_for,
)

# MQTT control packet types (the high nibble of the first byte).
CONNECT, PUBLISH = 1, 3


def _recv_exactly(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_packet(sock: socket.socket) -> tuple[int, bytes] | None:
    """One MQTT packet as (type, variable header + payload); None at end of stream."""
    first = _recv_exactly(sock, 1)
    if first is None:
        return None
    length, shift = 0, 0
    while True:  # remaining length: a variable byte integer, 7 bits a byte
        byte = _recv_exactly(sock, 1)
        if byte is None:
            return None
        length |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    body = _recv_exactly(sock, length) if length else b""
    if body is None:
        return None
    return first[0] >> 4, body


class SilentBroker:
    """Accepts MQTT connections and CONNACKs them, then never acknowledges anything."""

    def __init__(self) -> None:
        self.port = free_port()
        self.connections = 0
        self.publishes: list[int] = []  # PUBLISH packets received, per connection
        self.protocols: list[int] = []  # protocol level of each CONNECT (4: 3.1.1, 5: 5)
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener: Listener | None = None

    def start(self) -> SilentBroker:
        self._listener = Listener(self.port, self._handle)
        return self

    def _handle(self, conn: socket.socket) -> None:
        with self._lock:
            index = self.connections
            self.connections += 1
            self.publishes.append(0)
            self._socks.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
            self._threads.append(thread)
        thread.start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        try:
            packet = read_packet(conn)
            if packet is None:
                return
            kind, body = packet
            if kind != CONNECT:
                raise AssertionError(f"first packet was type {kind}, not CONNECT")
            # Variable header: protocol name (2-byte length + "MQTT"), then the level.
            name_length = int.from_bytes(body[:2], "big")
            level = body[2 + name_length]
            with self._lock:
                self.protocols.append(level)
            if level == 5:  # ack flags, reason code Success, no properties
                conn.sendall(bytes([0x20, 0x03, 0x00, 0x00, 0x00]))
            else:  # ack flags, return code Accepted
                conn.sendall(bytes([0x20, 0x02, 0x00, 0x00]))
            while (packet := read_packet(conn)) is not None:
                if packet[0] == PUBLISH:
                    with self._lock:
                        self.publishes[index] += 1
        except OSError:
            pass  # the agent hung up, or stop() shut the socket
        except BaseException as exc:  # reported by the test, not lost in a thread
            self.errors.append(exc)
        finally:
            conn.close()

    def stop(self) -> None:
        """Refuse new connections and drop the current ones."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for sock in socks:
            shutdown_socket(sock)
        for thread in threads:
            thread.join(5)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    with open(f"/proc/{pid}/stat") as handle:
        stat = handle.read()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(90)
def test_broker_that_never_acks_costs_reconnects_not_events(tmp_path, agent_process):
    files = 20
    events = 2 * files  # file.created + file.closed each
    double = SilentBroker().start()
    real: Mosquitto | None = None
    try:
        config = mqtt_agent_config(tmp_path, double.port, sink='ack_timeout = "1s"')
        agent = agent_process(config).start()
        assert agent.process is not None
        pid = agent.process.pid
        agent.wait_started()
        paths = make_files(tmp_path / "inbox", files)
        wait_for(lambda: agent.queued() == events, 15, f"{events} events queued")
        agent.wait_log("no acknowledgement within 1s", timeout=15)
        assert "Offline: events are kept on disk" in agent.log()

        # ~5 s of publish, no ack, time out, reconnect, re-send.
        connections_before = double.connections
        rss: list[int] = []
        queued: list[int] = []
        window_end = time.monotonic() + 5.0

        def observe() -> bool:
            assert agent.process is not None and agent.process.poll() is None, agent.log()
            rss.append(rss_kib(pid))
            queued.append(agent.queued())
            return time.monotonic() >= window_end and double.connections >= connections_before + 3

        wait_for(observe, 20, "5 s of unacknowledged publishing and 3 reconnects")
        reconnects = double.connections - connections_before
        print(
            f"never-ack broker: {double.connections} connections in all, {reconnects} in the"
            f" 5 s window; PUBLISH per connection {double.publishes}; RSS {min(rss)}..{max(rss)}"
            f" KiB over {len(rss)} samples"
        )
        assert not double.errors, double.errors
        assert set(double.protocols) == {5}, "the agent speaks MQTT 5 by default"
        assert reconnects >= 3, f"the agent should reconnect after each ack timeout: {reconnects}"
        assert set(queued) == {events}, f"nothing may leave the queue unacknowledged: {queued}"
        resent = [n for n in double.publishes[1:] if n >= events]
        assert len(resent) >= 2, (
            f"unacked events are re-sent on new connections: {double.publishes}"
        )
        assert max(rss) - min(rss) < 3 * 1024, f"RSS grew: {min(rss)}..{max(rss)} KiB"
        assert agent.process.poll() is None, "the agent keeps running"

        # Nothing was lost: a real broker on the same port gets every event. The agent
        # is paused meanwhile, so the subscriber is in place before the agent connects.
        agent.process.send_signal(signal.SIGSTOP)
        try:
            double.stop()
            real = Mosquitto(str(tmp_path / "real-broker"), port=double.port).start()
            subscriber = Subscriber(real.port, "edge/#").start()
        finally:
            agent.process.send_signal(signal.SIGCONT)
        try:
            wait_for(lambda: len(subscriber.events()) >= events, 20, f"{events} deliveries")
            wait_for(lambda: agent.queued() == 0, 10, "the queue to empty")
            assert sorted(created_paths(subscriber.events())) == paths
            types = [e["type"] for e in subscriber.events()]
            assert types.count("file.closed") == files
        finally:
            subscriber.stop()
        assert agent.terminate() == 0
    finally:
        double.stop()
        if real is not None:
            real.stop()


@pytest.mark.timeout(150)
def test_flapping_broker_loses_nothing_and_backs_off(
    tmp_path, running_broker, subscriber, agent_process, monkeypatch
):
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")  # a crash in the agent leaves a traceback
    flaps, down, up = 30, 0.5, 0.5  # 30 s: a cut every second
    proxy = CuttableProxy(running_broker.port).start()
    stop_writing = threading.Event()
    written: list[str] = []
    writer_errors: list[BaseException] = []

    def writer() -> None:
        """About 20 new files a second, until told to stop."""
        try:
            i = 0
            while not stop_writing.wait(0.05):
                path = tmp_path / "inbox" / f"w{i:05d}.csv"
                path.write_text(f"row {i}\n")
                written.append(str(path))
                i += 1
        except BaseException as exc:
            writer_errors.append(exc)

    writing = threading.Thread(target=writer, name="writer", daemon=True)
    try:
        config = mqtt_agent_config(tmp_path, proxy.port).replace(
            'id = "test-gw"', 'id = "test-gw"\n        log_level = "debug"'
        )
        agent = agent_process(config).start()
        assert agent.process is not None
        pid = agent.process.pid
        agent.wait_started()
        writing.start()

        cpu_start, wall_start = cpu_seconds(pid), time.monotonic()
        for _ in range(flaps):
            proxy.cut()
            time.sleep(down)  # ok: the fault
            proxy.restore()
            time.sleep(up)  # ok: the fault
        cpu_used, wall = cpu_seconds(pid) - cpu_start, time.monotonic() - wall_start
        stop_writing.set()
        writing.join(5)
        assert not writer_errors, writer_errors
        assert agent.process.poll() is None, (
            f"the agent exited with {agent.process.returncode} while the broker flapped:\n"
            + "\n".join(agent.log().splitlines()[-20:])
        )

        expected = set(written)
        wait_for(
            lambda: set(created_paths(subscriber.events())) >= expected,
            60,
            f"all {len(expected)} file.created events at the subscriber",
        )
        drained = time.monotonic() - wall_start - wall
        received = subscriber.events()
        assert set(created_paths(received)) == expected

        # A re-sent event is the same event: same id, same content.
        by_id: dict[str, dict] = {}
        for event in received:
            assert by_id.setdefault(event["id"], event) == event, event
        ids_per_path: dict[str, set[str]] = defaultdict(set)
        for event in received:
            if event["type"] == "file.created":
                ids_per_path[event["data"]["path"]].add(event["id"])
        assert all(len(ids) == 1 for ids in ids_per_path.values())
        duplicates = len(received) - len(by_id)

        # Backoff, not a spin: little CPU, a bounded number of connection attempts,
        # one "Offline" warning per outage at most.
        log = agent.log()
        lines = log.splitlines()
        offline = sum("Offline" in line for line in lines)
        warnings = [line for line in lines if " WARNING " in line]
        errors = [line for line in lines if " ERROR " in line]
        refused = sum("cannot reach 127.0.0.1:" in line for line in lines)
        lost = sum(f"lost 127.0.0.1:{proxy.port}" in line for line in lines)
        share = cpu_used / wall
        print(
            f"flapping: {flaps} cuts in {wall:.1f}s, {len(written)} files written,"
            f" {len(received)} messages ({duplicates} duplicates), drained in {drained:.1f}s"
            f" after; CPU {cpu_used:.2f}s = {share:.1%} of a core; {proxy.accepted}"
            f" connections through the proxy, {refused} refused attempts, {lost} lost"
            f" connections; {offline} 'Offline' lines, {len(warnings)} warnings"
        )
        assert share < 0.30, f"the agent used {share:.0%} of a core while the broker flapped"
        assert not errors, "\n".join(errors)
        assert 1 <= offline <= flaps, f"{offline} 'Offline' lines for {flaps} outages"
        assert len(warnings) <= flaps + 2, "\n".join(warnings)
        assert proxy.accepted <= 3 * flaps, f"{proxy.accepted} connections in {flaps} flaps"
        assert refused <= 8 * flaps, f"{refused} refused connection attempts in {flaps} flaps"
        wait_for(lambda: agent.queued() == 0, 15, "the queue to empty")
        assert agent.terminate() == 0
    finally:
        stop_writing.set()
        if writing.is_alive():
            writing.join(5)
        proxy.stop()
