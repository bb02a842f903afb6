"""Crashes: the agent SIGKILLed again and again while a log grows."""

from __future__ import annotations

import random
import threading
import time

import pytest

from agent.testing import wait_for

pytestmark = pytest.mark.timeout(150)

KILLS = 20


class LineWriter(threading.Thread):
    """Appends numbered lines to a log file until told to stop, flushing each burst."""

    def __init__(self, path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.written = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        with open(self.path, "a", buffering=1) as handle:
            while not self.stopping.wait(0.005):
                for _ in range(5):
                    handle.write(f"line {self.written:06d}\n")
                    self.written += 1


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

    wait_for(lambda: len(delivered()) == total, 60, f"all {total} lines at the broker")
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
