"""Crashes: the agent SIGKILLed again and again while a log grows."""

from __future__ import annotations

import os
import random
import shutil
import threading
import time

import pytest
from conftest import wait_while_growing

pytestmark = pytest.mark.timeout(150)

KILLS = 20


class LineWriter(threading.Thread):
    """Appends numbered lines to a log file until told to stop, flushing each burst."""

    def __init__(self, path, burst: int = 5) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.burst = burst
        self.written = 0
        self.stopping = threading.Event()
        #: Held while a burst is written: copytruncate() takes it, as logrotate's copy
        #: and truncate would lose the lines written between them.
        self.lock = threading.Lock()

    def run(self) -> None:
        with open(self.path, "a", buffering=1) as handle:
            while not self.stopping.wait(0.005):
                with self.lock:
                    for _ in range(self.burst):
                        handle.write(f"line {self.written:06d}\n")
                        self.written += 1

    def copytruncate(self) -> None:
        """Rotate as logrotate's copytruncate does: .1 becomes .2, a copy becomes .1."""
        with self.lock:
            if os.path.exists(f"{self.path}.1"):
                os.replace(f"{self.path}.1", f"{self.path}.2")
            shutil.copyfile(self.path, f"{self.path}.1")
            os.truncate(self.path, 0)


def test_sigkill_loop_loses_and_repeats_no_line(
    tmp_path, subscriber, running_broker, agent_process
):
    log = tmp_path / "app.log"
    log.write_text("")
    agent = agent_process(
        f"""
        [agent]
        id = "test-gw"
        state_dir = "{tmp_path / "state"}"

        [[sources.tail]]
        name = "app"
        paths = ["{log}"]
        start_at = "beginning"
        poll_interval = "0.1s"

        [[sinks.mqtt]]
        name = "cloud"
        port = {running_broker.port}
        reconnect_min = "0.05s"
        reconnect_max = "0.2s"
        """
    )
    writer = LineWriter(log)
    writer.start()
    rng = random.Random(20261127)
    for _ in range(KILLS):
        agent.start()
        time.sleep(rng.uniform(0.2, 1.2))  # run for a random while, then crash (# ok: the fault)
        agent.kill()
    agent.start()
    time.sleep(0.5)  # let the last burst of lines be written while it runs (# ok: the fault)
    writer.stopping.set()
    writer.join()
    total = writer.written

    def delivered() -> set[int]:
        return {int(e["data"]["line"].split()[1]) for e in subscriber.events()}

    wait_while_growing(lambda: len(delivered()), total, "lines at the broker")
    events = subscriber.events()
    assert delivered() == set(range(total))

    ids_by_line: dict[str, set[str]] = {}
    for event in events:
        ids_by_line.setdefault(event["data"]["line"], set()).add(event["id"])
    repeated = {line: ids for line, ids in ids_by_line.items() if len(ids) > 1}
    assert not repeated, f"the source read these lines twice: {sorted(repeated)[:5]}"

    first_seen: list[int] = []
    seen: set[str] = set()
    for event in events:
        if event["id"] not in seen:
            seen.add(event["id"])
            first_seen.append(int(event["data"]["line"].split()[1]))
    assert first_seen == sorted(first_seen), "first deliveries must keep the line order"
    assert agent.terminate() == 0


@pytest.mark.timeout(180)  # ten agent starts and 40,000 lines on a loaded machine
def test_copytruncate_and_sigkill_loop_lose_no_line(
    tmp_path, subscriber, running_broker, agent_process
):
    """2,000 lines/s, ten SIGKILLs, copytruncate once while stopped and once while running."""
    log = tmp_path / "app.log"
    log.write_text("")
    agent = agent_process(
        f"""
        [agent]
        id = "test-gw"
        state_dir = "{tmp_path / "state"}"

        [[sources.tail]]
        name = "app"
        paths = ["{log}"]
        start_at = "beginning"
        poll_interval = "0.1s"
        rotate_wait = "0.5s"

        [[sinks.mqtt]]
        name = "cloud"
        port = {running_broker.port}
        reconnect_min = "0.05s"
        reconnect_max = "0.2s"
        """
    )
    writer = LineWriter(log, burst=12)  # about 2,000 lines/s
    writer.start()
    rng = random.Random(20261201)
    for kill in range(10):
        if kill == 3:
            writer.copytruncate()  # while the agent is stopped
        agent.start()
        agent.wait_started(20)
        if kill == 6:
            writer.copytruncate()  # while it runs
        time.sleep(rng.uniform(0.1, 0.6))  # run for a random while, then crash (# ok: the fault)
        agent.kill()
    agent.start()
    agent.wait_started(20)
    writer.stopping.set()
    writer.join()
    total = writer.written

    def delivered() -> set[int]:
        return {
            int(e["data"]["line"].split()[1])
            for e in subscriber.events()
            if e["type"] == "log.line"
        }

    wait_while_growing(lambda: len(delivered()), total, "lines at the broker")
    assert not [e for e in subscriber.events() if e["type"] == "log.gap"]
    assert agent.terminate() == 0
