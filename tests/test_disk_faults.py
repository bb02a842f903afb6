"""Disk faults: a full filesystem, and writes or fsyncs that fail in the middle of a batch."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator

import pytest

from edge_agent.testing import free_port, wait_for

pytestmark = pytest.mark.timeout(120)


@contextlib.contextmanager
def tmpfs(mount_point, size: str) -> Iterator:
    """A tmpfs of ``size`` mounted at ``mount_point`` (root may mount; others skip)."""
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs for the state directory."""
    with tmpfs(tmp_path / "small-disk", "24m") as mount_point:
        yield mount_point


def tail_config(tmp_path, state_dir, port: int, queue: str = "") -> str:
    return f"""
        [agent]
        id = "test-gw"
        state_dir = "{state_dir}"

        [queue]
        {queue}

        [[sources.tail]]
        name = "app"
        paths = ["{tmp_path / "app.log"}"]
        start_at = "beginning"
        poll_interval = "0.1s"

        [[sinks.mqtt]]
        name = "cloud"
        port = {port}
        reconnect_min = "0.05s"
        reconnect_max = "0.3s"
        """


def write_lines(path, start: int, count: int, width: int = 1000) -> None:
    with open(path, "a") as handle:
        for i in range(start, start + count):
            handle.write(f"line {i:07d} " + "x" * width + "\n")


def integrity(state_dir) -> str:
    conn = sqlite3.connect(f"file:{state_dir}/queue.db?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def line_numbers(subscriber) -> list[int]:
    return [int(e["data"]["line"].split()[1]) for e in subscriber.events()]


def test_full_disk_blocks_then_resumes_on_its_own_and_loses_nothing(
    tmp_path, small_disk, broker, agent_process
):
    """when_full = "block": the tail source stops reading; nothing is lost."""
    from edge_agent.testing import Subscriber

    if broker.process is None:
        broker.start()
    port = free_port()  # no broker there yet: events pile up in the queue
    filler = small_disk / "filler"
    with open(filler, "wb") as handle:
        handle.write(b"\0" * 12 * 1024 * 1024)
    log = tmp_path / "app.log"
    log.write_text("")
    queue = 'when_full = "block"\n        reserve_free = "6MiB"'
    agent = agent_process(tail_config(tmp_path, small_disk / "state", port, queue)).start()
    write_lines(log, 0, 10_000)  # 10 MB of lines: more than the 6 MiB the disk has left
    agent.wait_log("queue cannot grow: disk nearly full", timeout=30)
    assert "sources wait" in agent.log()
    assert agent.process.poll() is None, "the agent keeps running"
    assert integrity(small_disk / "state") == "ok"

    filler.unlink()  # the operator frees space, and a broker appears: all arrives
    agent.wait_log("queue has room again", timeout=30)
    agent.terminate()
    with Subscriber(broker.port, "edge/#") as subscriber:
        agent.config_path.write_text(
            tail_config(tmp_path, small_disk / "state", broker.port, queue)
        )
        agent.start()
        wait_for(lambda: len(set(line_numbers(subscriber))) == 10_000, 60, "all 10000 lines")
    assert sorted(set(line_numbers(subscriber))) == list(range(10_000))
    assert agent.terminate() == 0
    assert integrity(small_disk / "state") == "ok"


def test_full_disk_with_drop_oldest_keeps_running_and_sound(tmp_path, small_disk, agent_process):
    log = tmp_path / "app.log"
    log.write_text("")
    queue = 'when_full = "drop_oldest"\n        reserve_free = "4MiB"'
    agent = agent_process(tail_config(tmp_path, small_disk / "state", free_port(), queue)).start()
    write_lines(log, 0, 40_000)  # 40 MB: far more than fits
    agent.wait_log("queue cannot grow: disk nearly full", timeout=30)
    agent.wait_log("dropped", timeout=90)
    assert "(app: " in agent.log()
    assert agent.process.poll() is None
    assert agent.terminate() == 0
    assert integrity(small_disk / "state") == "ok"
    usage = shutil.disk_usage(small_disk)
    assert usage.free > 0


def test_no_reserve_and_a_really_full_disk_fails_batches_not_the_agent(
    tmp_path, small_disk, agent_process
):
    """With reserve_free = 0, SQLite meets ENOSPC itself: batches fail, the agent goes on."""
    filler = small_disk / "filler"
    log = tmp_path / "app.log"
    log.write_text("")
    queue = 'reserve_free = 0\n        when_full = "block"'
    agent = agent_process(tail_config(tmp_path, small_disk / "state", free_port(), queue))
    agent.state_dir = small_disk / "state"
    agent.start()
    agent.wait_ready()  # running, the tail source at its offsets: then the disk fills
    with open(filler, "wb", buffering=0) as handle:  # to the last byte; nothing left to flush
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError:
            pass
    write_lines(log, 0, 2000)
    agent.wait_log("could not commit", timeout=30)
    assert agent.process.poll() is None
    filler.unlink()
    wait_for(lambda: agent.queued() == 2000, 60, "all 2000 lines queued once space returned")
    assert agent.terminate() == 0
    assert integrity(small_disk / "state") == "ok"


@pytest.mark.parametrize(
    "fault",
    [
        "inject=fdatasync:error=EIO:when=3..5",
        "inject=pwrite64:error=ENOSPC:when=20..24",
    ],
)
def test_a_failed_write_or_fsync_rolls_the_batch_back_and_loses_nothing(
    fault, tmp_path, subscriber, running_broker, agent_process
):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (Debian: apt-get install strace)")
    log = tmp_path / "app.log"
    log.write_text("")
    agent = agent_process(tail_config(tmp_path, tmp_path / "state", running_broker.port))
    agent.start()
    agent.wait_started()
    # strace attaches once the agent runs, so the Nth call it fails is counted from
    # here (per thread), not from start-up, whose writes change as the agent does.
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", fault, "-p", str(agent.pid)]
    )
    try:
        wait_for(lambda: traced(agent.pid), 10, "strace to attach to the agent")
        # One commit or so per burst, so that the failing calls fall on commits of lines.
        for burst in range(60):
            write_lines(log, burst * 50, 50, width=50)
            time.sleep(0.1)  # ok: spacing the bursts is the fault timing
        wait_for(lambda: len(set(line_numbers(subscriber))) == 3000, 60, "all 3000 lines")
    finally:
        tracer.terminate()  # detaches; the agent runs on
        tracer.wait(10)
    lines = line_numbers(subscriber)
    assert sorted(set(lines)) == list(range(3000))
    ids: dict[int, set[str]] = {}
    for event in subscriber.events():
        ids.setdefault(int(event["data"]["line"].split()[1]), set()).add(event["id"])
    assert all(len(v) == 1 for v in ids.values()), "no line was read twice by the source"
    text = agent.log()
    assert "could not commit" in text, text[-2000:]  # the fault fell on a commit of lines
    assert agent.terminate() == 0


def traced(pid: int) -> bool:
    """True once a tracer is attached to every thread of ``pid``."""
    tasks = os.listdir(f"/proc/{pid}/task")
    for task in tasks:
        with open(f"/proc/{pid}/task/{task}/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        if fields.get("TracerPid", "0").strip() == "0":
            return False
    return True


@pytest.fixture
def tiny_disk(tmp_path):
    """An 8 MiB tmpfs: a small state partition, less than the 64 MiB reserve alone."""
    with tmpfs(tmp_path / "tiny-disk", "8m") as mount_point:
        yield mount_point


def test_a_small_state_filesystem_takes_events_with_the_default_reserve(
    tmp_path, tiny_disk, agent_process
):
    log = tmp_path / "app.log"
    log.write_text("")
    write_lines(log, 0, 500, width=100)
    # A reserve as large as the filesystem: the warnings say what really happens.
    config = tail_config(tmp_path, tiny_disk / "state", free_port(), 'reserve_free = "64MiB"')
    agent = agent_process(config)
    agent.state_dir = tiny_disk / "state"
    agent.start()
    agent.wait_log("nothing is left to drop, so sources wait until space is freed")
    assert "the queue takes no events until space is freed" in agent.log()
    assert agent.queued() == 0
    agent.kill()
    # The default reserve is 10% of so small a filesystem: the lines are queued.
    agent.config_path.write_text(tail_config(tmp_path, tiny_disk / "state", free_port()))
    agent.start()
    write_lines(log, 500, 500, width=100)
    wait_for(lambda: agent.queued() == 1000, 30, "all 1000 lines queued")
    assert "queue cannot grow" not in agent.run_log()
    assert agent.terminate() == 0
