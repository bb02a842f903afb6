"""One owner per state directory, and what an operator sees when it is taken or lost."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import mqtt_agent_config, run_cli

from edge_agent.testing import wait_for

pytestmark = pytest.mark.timeout(60)


def test_a_second_agent_on_the_same_state_dir_exits_1_naming_the_first(
    tmp_path, running_broker, agent_process
):
    first = agent_process(mqtt_agent_config(tmp_path, running_broker.port)).start()
    first.wait_started()
    second = run_cli("run", "-c", str(first.config_path))
    assert second.returncode == 1
    assert f"state dir {first.state_dir} is in use by pid {first.pid}" in second.stderr
    assert "stop it first" in second.stderr and "Traceback" not in second.stderr
    assert first.process.poll() is None, "the first agent runs on"
    # The kernel lets go of the lock however the owner ends: a killed agent blocks nobody.
    first.kill()
    first.start()
    first.wait_started()
    assert first.terminate() == 0


def test_a_deleted_lock_file_is_taken_again_so_a_second_agent_still_cannot_run(
    tmp_path, running_broker, agent_process
):
    first = agent_process(mqtt_agent_config(tmp_path, running_broker.port)).start()
    first.wait_started()
    lock = first.state_dir / "lock"
    lock.unlink()  # a clean-up job, a person tidying up
    first.wait_log("lock file", timeout=10)
    assert "was made and locked again" in first.run_log()
    assert lock.exists() and lock.read_text().strip() == str(first.pid)
    second = run_cli("run", "-c", str(first.config_path))
    assert second.returncode == 1
    assert f"is in use by pid {first.pid}" in second.stderr
    assert first.terminate() == 0


def test_status_says_not_running_at_once_after_a_stop_and_reads_past_a_broken_config(
    tmp_path, running_broker, agent_process
):
    agent = agent_process(mqtt_agent_config(tmp_path, running_broker.port)).start()
    agent.wait_started()
    config = str(agent.config_path)
    good = agent.config_path.read_text()
    # An edit that breaks the file: the agent runs on what it read at start, and
    # status still answers from its state dir.
    agent.config_path.write_text(good + "\n[queue]\nmax_events = -1\nno_such_key = 1\n")
    status = run_cli("status", "-c", config, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"]["pid"] == agent.pid
    assert f"warning: {config} is invalid (" in status.stderr
    # A syntax error elsewhere: the [agent] table alone still says where the state is.
    agent.config_path.write_text(good + "\nbogus = [\n")
    broken = run_cli("status", "-c", config, "--json")
    assert broken.returncode == 0 and json.loads(broken.stdout)["status"]["pid"] == agent.pid
    agent.config_path.write_text("[agent\nthis is not TOML")  # the default state dir, then
    assert "Status from /var/lib/edge-agent" in run_cli("status", "-c", config).stderr
    agent.config_path.write_text(good)

    pid = agent.pid
    assert agent.terminate() == 0
    stopped = run_cli("status", "-c", config, "--json")
    assert stopped.returncode == 1
    assert json.loads(stopped.stdout)["running"] is False
    assert f"the agent is not running: pid {pid} has ended" in json.loads(stopped.stdout)["problem"]


def tail_config(tmp_path, port: int) -> str:
    return f"""
        [agent]
        id = "test-gw"
        state_dir = "{tmp_path / "state"}"

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


def write_lines(path, start: int, count: int) -> None:
    with open(path, "a") as handle:
        handle.writelines(f"line {i}\n" for i in range(start, start + count))


def test_a_deleted_state_dir_stops_the_agent_and_the_next_start_reports_it(
    tmp_path, subscriber, running_broker, agent_process
):
    log = tmp_path / "app.log"
    log.write_text("")
    agent = agent_process(tail_config(tmp_path, running_broker.port)).start()
    agent.wait_started()
    write_lines(log, 0, 100)
    wait_for(lambda: len(subscriber.events()) >= 100, 15, "the first 100 lines")

    shutil.rmtree(agent.state_dir)
    assert agent.process.wait(15) == 1, "exits non-zero: systemd starts it again"
    agent._close()
    run = agent.log()
    assert run.count("was deleted with its state directory while the agent was using it") == 1
    assert "No more events are accepted" in run and "Traceback" not in run

    agent.start()  # as systemd would: on a new queue, which reports the old one's loss
    agent.wait_started()
    write_lines(log, 100, 50)
    wait_for(lambda: len(subscriber.events()) >= 151, 15, "the gap event and 50 more lines")
    gaps = [e for e in subscriber.events() if e["type"] == "queue.gap"]
    assert len(gaps) == 1 and gaps[0]["source"] == "edge-agent://test-gw/agent"
    assert "deleted with its state directory" in gaps[0]["data"]["reason"]
    assert gaps[0]["data"]["events"] == 0 and gaps[0]["data"]["sinks"] == {"cloud": 0}
    lines = [e for e in subscriber.events() if e["type"] == "log.line"]
    # Its checkpoint and numbering were carried over: nothing read or numbered twice.
    assert [e["data"]["line"] for e in lines] == [f"line {i}" for i in range(150)]
    assert [int(e["sequence"]) for e in lines] == list(range(1, 151))
    assert not (agent.state_dir / "queue.lost.json").exists()
    assert agent.terminate() == 0


@pytest.mark.parametrize("how", ["renamed", "replaced"])
def test_a_queue_file_renamed_or_replaced_takes_no_more_commits(tmp_path, how):
    from edge_agent.errors import QueueError
    from edge_agent.event import Event
    from edge_agent.queue import QueueStore
    from edge_agent.writer import Writer

    store = QueueStore(str(tmp_path / "state"))
    store.open()
    writer = Writer(
        store, commit_max_events=100, handoff_max_events=100, sink_names=["s"], on_commit=list
    )
    writer.start()
    items = [(Event(type="t.x", source="a", data={}), "{}")] * 3
    writer.submit(items, [("a", "offset", "3")])
    os.rename(store.path, store.path + ".moved")
    if how == "replaced":
        shutil.copy(store.path + ".moved", store.path)
    why = "was deleted" if how == "renamed" else "was replaced by another file"
    with pytest.raises(QueueError, match=why):
        writer.submit(items)
    wait_for(lambda: not writer.is_alive(), 5, "the writer to stop")
    assert "No more events are accepted" in writer.failure
    writer.record_lost()
    record = json.loads((tmp_path / "state" / "queue.lost.json").read_text())
    assert record["events"] == 3 and record["sequences"] == {"a": 3}
    assert record["checkpoints"] == [["a", "offset", "3"]]
