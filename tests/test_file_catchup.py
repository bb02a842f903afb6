"""The file source across restarts and bursts: catch-up scans, overflows, folders that
come back. Real files, real inotify, the real agent, a real Mosquitto and subscriber."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal

import pytest
from conftest import inotify_watched, mqtt_agent_config, run_cli

from edge_agent.plugins.file import FileSource
from edge_agent.plugins.file_scan import EVENTS_PER_COMMIT
from edge_agent.testing import SourceHarness, wait_for

#: A burst's messages carry up to this many events (a JSON array): fewer round trips.
#: Only consecutive events bound for one topic share a message, hence CREATED_ONLY.
BATCHED = 'batch_max_events = 500\nbatch_max_bytes = "1MiB"'
CREATED_ONLY = 'events = ["created"]'


def received(subscriber) -> list[dict]:
    """Every event the subscriber got, batched messages unpacked."""
    events: list[dict] = []
    for message in subscriber.messages[:]:
        payload = json.loads(message.payload)
        events.extend(payload if isinstance(payload, list) else [payload])
    return events


def paths_of(events: list[dict], type: str, **data) -> set[str]:
    return {
        e["data"]["path"]
        for e in events
        if e["type"] == type and all(e["data"].get(k) == v for k, v in data.items())
    }


def touch_many(folder, count: int, prefix: str) -> list[str]:
    """``count`` empty files, as fast as a Python loop makes them."""
    paths = [os.path.join(folder, f"{prefix}{i:06d}") for i in range(count)]
    for path in paths:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
    return paths


def max_queued_events() -> int:
    with open("/proc/sys/fs/inotify/max_queued_events") as handle:
        return int(handle.read())


def baseline(folder, config: dict) -> dict[str, str]:
    """Run the source once on ``folder`` until its first baseline is committed; its index."""
    with SourceHarness(FileSource, {"paths": [str(folder)], **config}) as harness:
        wait_for(
            lambda: any(k.startswith("baseline:") for k in harness.saved_checkpoints),
            10,
            "the baseline",
        )
        assert harness.events == []  # files already there at the first start are no news
        return dict(harness.saved_checkpoints)


def test_a_scan_applies_include_exclude_and_recursive_as_live_events_do(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    (inbox / "gone.csv").write_text("x")
    config = {"include": ["*.csv"], "exclude": ["skip*"], "recursive": False}
    index = baseline(inbox, config)
    for name in ("a.csv", "b.txt", "skip.csv", "sub/c.csv"):
        (inbox / name).write_text("x")
    (inbox / "gone.csv").unlink()
    bad = os.fsdecode(b"bad-\xff.csv")
    (inbox / bad).write_text("x")

    with SourceHarness(FileSource, {"paths": [str(inbox)], **config}, checkpoints=index) as h:
        h.wait_for_events(3)
        wait_for(lambda: len([e for e in h.events if e.type == "file.closed"]) == 2, 10, "closed")
    found = {(e.type, e.data["path"]) for e in h.events}
    assert found == {
        ("file.created", str(inbox / "a.csv")),
        ("file.closed", str(inbox / "a.csv")),
        ("file.created", str(inbox / "bad-\ufffd.csv")),
        ("file.closed", str(inbox / "bad-\ufffd.csv")),
        ("file.deleted", str(inbox / "gone.csv")),
    }
    assert all(e.data["scan"] is True for e in h.events)
    raw = next(e for e in h.events if "path_base64" in e.data)
    assert base64.b64decode(raw.data["path_base64"]) == os.fsencode(inbox) + b"/bad-\xff.csv"


def test_a_scan_that_finds_many_files_commits_them_in_parts(tmp_path):
    """12,000 files made while stopped: reported in transactions of at most
    EVENTS_PER_COMMIT, so that a nearly full disk is never asked for room for
    all of them at once (it could wait for that room for ever with the queue empty)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = {"events": ["created"]}
    index = baseline(inbox, config)
    made = set(touch_many(inbox, 12_000, "f"))
    with SourceHarness(FileSource, {"paths": [str(inbox)], **config}, checkpoints=index) as h:
        h.wait_for_events(12_000, timeout=60)
    assert {e.data["path"] for e in h.events} == made
    assert max(h.commit_sizes) <= EVENTS_PER_COMMIT


def test_a_scan_reports_folders_trees_gone_and_folders_moved(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "gone" / "deeper").mkdir(parents=True)
    (inbox / "mv").mkdir()
    for name in ("gone/a", "gone/deeper/b", "mv/c"):
        (inbox / name).write_text("x")
    config = {"directories": True, "events": ["created", "deleted", "moved"]}
    index = baseline(inbox, config)
    shutil.rmtree(inbox / "gone")
    (inbox / "mv").rename(inbox / "mv2")
    (inbox / "new").mkdir()  # may well get the inode "gone" had: not a move

    with SourceHarness(FileSource, {"paths": [str(inbox)], **config}, checkpoints=index) as h:
        h.wait_for_events(7)
    assert {(e.type, e.data["path"], e.data.get("src_path")) for e in h.events} == {
        ("file.deleted", str(inbox / "gone"), None),
        ("file.deleted", str(inbox / "gone/deeper"), None),
        ("file.deleted", str(inbox / "gone/a"), None),
        ("file.deleted", str(inbox / "gone/deeper/b"), None),
        ("file.moved", str(inbox / "mv2"), str(inbox / "mv")),
        ("file.moved", str(inbox / "mv2/c"), str(inbox / "mv/c")),
        ("file.created", str(inbox / "new"), None),
    }


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_changes_while_stopped_are_reported_at_start_with_scan(
    tmp_path, subscriber, running_broker, agent_process, stop
):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    old = [inbox / f"old{i}.csv" for i in range(5)]
    for path in old:
        path.write_text("row\n")
    agent = agent_process(mqtt_agent_config(tmp_path, running_broker.port)).start()
    agent.wait_started()
    agent.wait_log("indexed 5 files")  # the first run's baseline, committed
    if stop == "sigterm":
        assert agent.terminate() == 0
    else:
        agent.kill()

    new = touch_many(inbox, 10, "new")
    for path in old[:3]:
        path.unlink()
    old[3].rename(inbox / "renamed.csv")
    with old[4].open("a") as handle:
        handle.write("appended\n")

    agent.start()
    agent.wait_started()

    def complete() -> bool:
        events = received(subscriber)
        return (
            paths_of(events, "file.created", scan=True) >= set(new)
            and paths_of(events, "file.deleted", scan=True) == {str(p) for p in old[:3]}
            and paths_of(events, "file.moved", scan=True) == {str(inbox / "renamed.csv")}
            and str(old[4]) in paths_of(events, "file.closed", scan=True)
        )

    wait_for(complete, 20, f"the changes made while stopped:\n{agent.run_log()}")
    events = received(subscriber)
    moved = next(e for e in events if e["type"] == "file.moved")
    assert moved["data"]["src_path"] == str(old[3])
    appended = next(e for e in events if e["type"] == "file.closed" and e["data"]["scan"])
    assert appended["data"]["size"] == len("row\nappended\n")
    # The files that were there at the very first start were a baseline, not news.
    assert not paths_of(events, "file.created") & {str(p) for p in old}
    assert agent.terminate() == 0


@pytest.mark.timeout(240)  # 20 starts and stops of the real agent
def test_files_made_right_after_ready_are_all_reported_20_times(
    tmp_path, subscriber, running_broker, agent_process
):
    agent = agent_process(mqtt_agent_config(tmp_path, running_broker.port))
    inbox = tmp_path / "inbox"
    for round in range(20):
        agent.start()
        agent.wait_started()
        made = set(touch_many(inbox, 300, f"r{round:02d}-"))
        wait_for(
            lambda made=made: made <= paths_of(received(subscriber), "file.created"),
            20,
            f"round {round}: 300 files reported",
        )
        assert agent.terminate() == 0


def test_every_subfolder_is_watched_before_ready(
    tmp_path, subscriber, running_broker, agent_process
):
    inbox = tmp_path / "inbox"
    folders = [inbox / f"d{i:04d}" for i in range(1000)]
    for folder in folders:
        folder.mkdir(parents=True)
    agent = agent_process(mqtt_agent_config(tmp_path, running_broker.port, sink=BATCHED))
    agent.start()
    agent.wait_started()
    made = {path for folder in folders for path in touch_many(folder, 1, "f")}
    wait_for(lambda: made <= paths_of(received(subscriber), "file.created"), 30, "1000 files")
    # Seen live, not by a scan: every watch was in place before READY.
    assert not paths_of(received(subscriber), "file.created", scan=True)
    assert agent.terminate() == 0


def test_an_overflow_without_catch_up_is_a_gap_event_and_counted(
    tmp_path, subscriber, running_broker, agent_process
):
    config = mqtt_agent_config(
        tmp_path, running_broker.port, sink=BATCHED, source=f"catch_up = false\n{CREATED_ONLY}"
    )
    agent = agent_process(config).start()
    agent.wait_started()
    # A stopped agent reads nothing: the kernel's queue overflows for certain.
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        touch_many(tmp_path / "inbox", max_queued_events() + 100, "o")
    finally:
        os.kill(agent.pid, signal.SIGCONT)

    gaps = wait_for(
        lambda: [e for e in received(subscriber) if e["type"] == "file.gap"], 30, "a file.gap"
    )
    data = gaps[0]["data"]
    assert data["path"] == str(tmp_path / "inbox")
    assert data["reason"] == "inotify queue overflowed"
    assert data["from"] <= data["to"] and data["to"].endswith("Z")

    def source_status() -> dict:
        result = run_cli("status", "-c", str(agent.config_path), "--json")
        return json.loads(result.stdout)["status"]["sources"]["inbox"]

    status = wait_for(lambda: source_status()["gaps"] >= 1 and source_status(), 15, "status")
    assert status["counters"]["overflows"] >= 1
    assert "inotify queue overflowed" in agent.run_log()
    assert agent.terminate() == 0


def test_files_in_a_watched_folder_made_again_are_reported(
    tmp_path, subscriber, running_broker, agent_process
):
    # A minute between looks for missing paths: only the prompt re-watch can pass this.
    config = mqtt_agent_config(tmp_path, running_broker.port, source='retry_missing = "60s"')
    agent = agent_process(config).start()
    agent.wait_started()
    inbox = tmp_path / "inbox"
    shutil.rmtree(inbox)
    inbox.mkdir()
    made = set(touch_many(inbox, 50, "again"))
    wait_for(lambda: made <= paths_of(received(subscriber), "file.created"), 15, "50 files")

    # Gone for a while this time (noticed, and its parent watched), then back.
    # The loss noticed is the parent's watch in place (its warning may be folded
    # into the first one's when the first removal was noticed too).
    shutil.rmtree(inbox)
    wait_for(lambda: inotify_watched(agent.pid, tmp_path), 15, "a watch on the inbox's parent")
    inbox.mkdir()
    made = set(touch_many(inbox, 50, "later"))
    wait_for(lambda: made <= paths_of(received(subscriber), "file.created"), 15, "50 more")
    assert agent.terminate() == 0


def test_a_name_that_is_not_utf8_is_warned_about_once(tmp_path, caplog):
    """Each event of such a file carries path_base64; the warning comes once per name."""
    import logging

    caplog.set_level(logging.WARNING)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    names = [os.fsencode(str(inbox)) + b"/bad-\xff-%d.txt" % i for i in range(2)]
    with SourceHarness(FileSource, {"paths": [str(inbox)]}) as harness:
        harness.wait_listening()
        for _round in range(3):
            for raw in names:
                with open(raw, "ab") as handle:
                    handle.write(b"x")
        wait_for(lambda: len(harness.events) >= 6, 10, "an event per write")
        bad = [e for e in harness.events if "path_base64" in e.data]
        assert {base64.b64decode(e.data["path_base64"]) for e in bad} == set(names)
    warnings = [r for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]
