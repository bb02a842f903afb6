"""The tail source: lines, rotation, truncation, limits, encodings, resuming."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import pytest
from conftest import first_deliveries

from edge_agent.event import encode_data
from edge_agent.plugins.tail import LINES_PER_COMMIT, TailSource, line_json
from edge_agent.testing import SourceHarness, wait_for

pytestmark = pytest.mark.timeout(30)

FAST = {"poll_interval": "0.05s", "rotate_wait": "0.3s"}


def lines(harness: SourceHarness) -> list[str]:
    return [e.data["line"] for e in harness.events]


def append(path, text: str | bytes) -> None:
    mode = "ab" if isinstance(text, bytes) else "a"
    with open(path, mode) as handle:
        handle.write(text)


def test_new_lines_become_events_with_path_and_offset(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("old line\n")
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as harness:
        harness.wait_listening()
        append(log, "one\ntwo\r\n")
        events = harness.wait_for_events(2)
    assert [e.type for e in events] == ["log.line", "log.line"]
    assert [e.data for e in events] == [
        {"path": str(log), "line": "one", "offset": 9},
        {"path": str(log), "line": "two", "offset": 13},
    ]
    assert events[0].subject == str(log)


def test_start_at_beginning_reads_what_is_there(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("a\nb\n")
    config = {"paths": [str(log)], "start_at": "beginning", **FAST}
    with SourceHarness(TailSource, config) as harness:
        harness.wait_for_events(2)
    assert lines(harness) == ["a", "b"]


def test_a_partial_line_waits_for_its_end(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as harness:
        harness.wait_listening()
        append(log, "hal")
        append(log, "f\n")
        harness.wait_for_events(1)
    assert lines(harness) == ["half"]


def test_rotation_by_rename_loses_nothing(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as harness:
        harness.wait_listening()
        append(log, "1\n2\n")
        harness.wait_for_events(2)
        os.rename(log, tmp_path / "app.log.1")
        append(tmp_path / "app.log.1", "3\n")  # a writer still holding the old file
        log.write_text("4\n")
        harness.wait_for_events(4)
        wait_for(lambda: len(harness.saved_checkpoints) == 2, 5, "the old file to be retired")
    assert sorted(lines(harness)) == ["1", "2", "3", "4"]


def test_copytruncate_reads_from_the_start_again(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as harness:
        harness.wait_listening()
        append(log, "before truncate, a long line\n")
        harness.wait_for_events(1)
        with open(log, "r+") as handle:
            handle.truncate(0)
        append(log, "after\n")
        harness.wait_for_events(2)
    assert lines(harness) == ["before truncate, a long line", "after"]


def test_a_file_that_appears_later_is_read_from_its_start(tmp_path):
    log = tmp_path / "later.log"
    with SourceHarness(TailSource, {"paths": [str(tmp_path / "*.log")], **FAST}) as harness:
        harness.wait_listening()
        log.write_text("first\nsecond\n")
        harness.wait_for_events(2)
    assert lines(harness) == ["first", "second"]


def test_long_lines_are_cut_and_counted(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    config = {"paths": [str(log)], "max_line_bytes": 10, **FAST}
    with SourceHarness(TailSource, config) as harness:
        harness.wait_listening()
        append(log, "x" * 25 + "\nshort\n" + "y" * 300_000 + "\nend\n")
        harness.wait_for_events(4)
    assert lines(harness) == ["x" * 10, "short", "y" * 10, "end"]
    assert harness.source.counters["truncated_lines"] == 2
    assert harness.source.counters["dropped_bytes"] == 15 + 299_990


def test_invalid_bytes_are_replaced_not_fatal(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as harness:
        harness.wait_listening()
        append(log, b"caf\xe9 \xff\xfe ok\n")
        harness.wait_for_events(1)
    assert lines(harness) == ["caf\ufffd \ufffd\ufffd ok"]


def test_other_encodings_are_decoded(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    config = {"paths": [str(log)], "encoding": "latin-1", **FAST}
    with SourceHarness(TailSource, config) as harness:
        harness.wait_listening()
        append(log, "café\n".encode("latin-1"))
        harness.wait_for_events(1)
    assert lines(harness) == ["café"]


def test_resumes_exactly_at_the_committed_checkpoint(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as first:
        first.wait_listening()
        append(log, "1\n2\n")
        first.wait_for_events(2)
    append(log, "3\n4\n")  # written while the agent was down
    saved = first.saved_checkpoints
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}, checkpoints=saved) as second:
        append(log, "5\n")
        second.wait_for_events(3)
    assert lines(second) == ["3", "4", "5"]


def test_rotated_while_down_reads_the_rest_of_the_old_file(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as first:
        first.wait_listening()
        append(log, "1\n")
        first.wait_for_events(1)
    append(log, "2\n")
    os.rename(log, tmp_path / "app.log.1")
    log.write_text("3\n")
    saved = first.saved_checkpoints
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}, checkpoints=saved) as second:
        second.wait_for_events(2)
    assert sorted(lines(second)) == ["2", "3"]


def test_a_failed_commit_is_read_again_not_lost(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as harness:
        harness.wait_listening()
        harness.fail_commits(1)
        append(log, "a\nb\n")
        harness.wait_for_events(2)
    assert lines(harness) == ["a", "b"]


def test_a_chunk_of_many_short_lines_is_committed_in_parts(tmp_path):
    """One read of 256 KiB of short lines is tens of thousands of events: committed
    in parts of at most LINES_PER_COMMIT, each with its offset, so a nearly full
    disk or a small max_events never has to take them all at once."""
    log = tmp_path / "app.log"
    log.write_text("")
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as harness:
        harness.wait_listening()
        append(log, "".join(f"{n}\n" for n in range(2500)))
        harness.wait_for_events(2500)
        offsets = harness.saved_checkpoints
    assert lines(harness) == [str(n) for n in range(2500)]
    assert max(harness.commit_sizes) <= LINES_PER_COMMIT
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}, checkpoints=offsets) as again:
        append(log, "last\n")
        again.wait_for_events(1)
    assert lines(again) == ["last"], "the last part's offset was committed"


def test_a_failed_part_of_a_chunk_is_read_again_once(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as harness:
        harness.wait_listening()
        harness.fail_commits(1)
        append(log, "".join(f"{n}\n" for n in range(1500)))
        harness.wait_for_events(1500)
    assert lines(harness) == [str(n) for n in range(1500)]


def test_a_missing_file_is_followed_once_it_appears(tmp_path, caplog):
    log = tmp_path / "missing.log"
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as harness:
        wait_for(lambda: "no such file yet" in caplog.text, 5, "the missing-file warning")
        log.write_text("here\n")
        harness.wait_for_events(1)
    assert lines(harness) == ["here"]


def numbered(prefix: str, count: int, start: int = 0) -> list[str]:
    return [f"{prefix} {i}" for i in range(start, start + count)]


def write_lines(path, texts: list[str]) -> None:
    append(path, "".join(f"{text}\n" for text in texts))


def log_lines(harness: SourceHarness) -> list[str]:
    return [e.data["line"] for e in harness.events if e.type == "log.line"]


def gaps(harness: SourceHarness) -> list:
    return [e for e in harness.events if e.type == "log.gap"]


def test_two_rotations_while_stopped_read_every_generation_in_order(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as first:
        first.wait_listening()
        write_lines(log, numbered("a", 50))
        first.wait_for_events(50)
    write_lines(log, numbered("a", 50, start=50))  # written while stopped, never read
    os.rename(log, tmp_path / "app.log.1")
    write_lines(log, numbered("b", 100))
    os.rename(tmp_path / "app.log.1", tmp_path / "app.log.2")
    os.rename(log, tmp_path / "app.log.1")
    write_lines(log, numbered("c", 100))
    saved = first.saved_checkpoints
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}, checkpoints=saved) as second:
        second.wait_for_events(250)
    assert log_lines(second) == numbered("a", 50, 50) + numbered("b", 100) + numbered("c", 100)
    assert {e.data["path"] for e in second.events} == {str(log)}
    assert not gaps(second)


def test_two_rotations_between_two_looks_read_every_generation_in_order(tmp_path):
    """Two rotations in a row while running: the middle generation, never opened, is read."""
    (tmp_path / "app").mkdir()
    log = tmp_path / "app" / "app.log"
    write_lines(log, numbered("a", 10))
    # A glob in the folder name: no inotify watch, so the source only looks every
    # poll_interval, and both rotations below happen between two looks.
    pattern = str(tmp_path / "[a]pp" / "app.log")
    config = {"paths": [pattern], "start_at": "beginning", "poll_interval": "2s"}
    with SourceHarness(TailSource, {**config, "rotate_wait": "0.3s"}) as harness:
        harness.wait_for_events(10)
        os.rename(log, f"{log}.1")
        write_lines(log, numbered("b", 10))
        os.rename(f"{log}.1", f"{log}.2")
        os.rename(log, f"{log}.1")
        write_lines(log, numbered("c", 10))
        harness.wait_for_events(30)
    assert log_lines(harness) == numbered("a", 10) + numbered("b", 10) + numbered("c", 10)


def test_truncated_and_regrown_past_the_offset_while_stopped_is_read_from_its_start(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as first:
        first.wait_listening()
        write_lines(log, numbered("old", 100))
        first.wait_for_events(100)
    log.write_text("".join(f"{text}\n" for text in numbered("new", 300)))  # truncates, regrows
    assert log.stat().st_size > int(json.loads(first.saved_checkpoints[key(log)])["offset"])
    saved = first.saved_checkpoints
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}, checkpoints=saved) as second:
        second.wait_for_events(300)
    assert log_lines(second) == numbered("new", 300)
    # What the old file got after the offset before it was cut cannot be known: said.
    (gap,) = gaps(second)
    assert gap.data["from_offset"] == int(json.loads(saved[key(log)])["offset"])
    assert "truncated or replaced while the agent was stopped" in gap.data["reason"]


def test_copytruncate_while_stopped_reads_the_rest_from_the_copy(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as first:
        first.wait_listening()
        write_lines(log, numbered("x", 10))
        first.wait_for_events(10)
    write_lines(log, numbered("x", 10, start=10))
    shutil.copyfile(log, f"{log}.1")
    log.write_text("")
    write_lines(log, numbered("y", 30))  # past the offset, so only the fingerprint tells
    saved = first.saved_checkpoints
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}, checkpoints=saved) as second:
        second.wait_for_events(40)
    assert log_lines(second) == numbered("x", 10, start=10) + numbered("y", 30)


def test_a_generation_deleted_while_stopped_is_reported_once_as_a_gap(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as first:
        first.wait_listening()
        write_lines(log, numbered("a", 10))
        first.wait_for_events(10)
    offset = log.stat().st_size
    write_lines(log, numbered("a", 5, start=10))  # never read: lost below
    os.rename(log, f"{log}.1")
    write_lines(log, numbered("b", 3))
    os.remove(f"{log}.1")
    saved = first.saved_checkpoints
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}, checkpoints=saved) as second:
        second.wait_for_events(4)
    [gap] = gaps(second)
    assert gap.subject == str(log)
    assert gap.data["path"] == str(log)
    assert gap.data["from_offset"] == offset
    assert gap.data["since"] < gap.data["until"]
    assert "deleted" in gap.data["reason"]
    assert log_lines(second) == numbered("b", 3)
    assert len(second.saved_checkpoints) == 2  # "started" and the new file: the gap is settled


def test_checkpoints_without_a_fingerprint_still_resume(tmp_path):
    """Checkpoints saved by earlier versions have no fingerprint: they resume at their offset."""
    log = tmp_path / "app.log"
    write_lines(log, ["1", "2"])
    old = {"path": str(log), "offset": 2, "skipping": False}
    saved = {"started": "1", key(log): json.dumps(old)}
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}, checkpoints=saved) as harness:
        harness.wait_for_events(1)
        write_lines(log, ["3"])
        harness.wait_for_events(2)
    assert log_lines(harness) == ["2", "3"]
    assert json.loads(harness.saved_checkpoints[key(log)])["head"] == 6


def key(path) -> str:
    stat = os.stat(path)
    return f"{stat.st_dev}:{stat.st_ino}"


def test_another_file_with_the_same_identity_is_not_taken_for_the_old_one(tmp_path):
    """An inode reused by another file: its identity matches, its first bytes do not."""
    log = tmp_path / "app.log"
    log.write_text("")
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as first:
        first.wait_listening()
        write_lines(log, numbered("a", 10))
        first.wait_for_events(10)
    os.rename(log, f"{log}.1")
    with open(f"{log}.1", "w") as handle:  # same inode, other content: as if reused
        handle.write("".join(f"{text}\n" for text in numbered("b", 20)))
    write_lines(log, numbered("c", 5))
    saved = first.saved_checkpoints
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}, checkpoints=saved) as second:
        second.wait_for_events(26)
    assert len(gaps(second)) == 1
    assert log_lines(second) == numbered("b", 20) + numbered("c", 5)


def test_a_generation_left_only_compressed_is_reported_as_a_gap(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("")
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}) as first:
        first.wait_listening()
        write_lines(log, numbered("a", 10))
        first.wait_for_events(10)
    offset = log.stat().st_size
    write_lines(log, numbered("a", 5, start=10))
    os.rename(log, f"{log}.1")
    write_lines(log, numbered("b", 3))
    with open(f"{log}.1", "rb") as plain, gzip.open(f"{log}.1.gz", "wb") as packed:
        shutil.copyfileobj(plain, packed)  # logrotate's compress, without delaycompress
    os.remove(f"{log}.1")
    saved = first.saved_checkpoints
    with SourceHarness(TailSource, {"paths": [str(log)], **FAST}, checkpoints=saved) as second:
        second.wait_for_events(4)
    [gap] = gaps(second)
    assert gap.data["compressed"] == f"{log}.1.gz"
    assert gap.data["from_offset"] == offset
    assert log_lines(second) == numbered("b", 3)


def test_the_agent_restarted_after_rotations_sends_every_generation_and_one_gap(
    tmp_path, subscriber, running_broker, agent_process
):
    """The real agent, killed; while it is down app.log is rotated twice and other.log
    is rotated and its generation deleted."""
    app, other = tmp_path / "app.log", tmp_path / "other.log"
    app.write_text("")
    other.write_text("")
    agent = agent_process(
        f"""
        [agent]
        id = "test-gw"
        state_dir = "{tmp_path / "state"}"

        [[sources.tail]]
        name = "logs"
        paths = ["{app}", "{other}"]
        poll_interval = "0.1s"

        [[sinks.mqtt]]
        name = "cloud"
        port = {running_broker.port}
        reconnect_min = "0.05s"
        """
    )
    agent.start()
    agent.wait_started()
    write_lines(app, numbered("a", 5))
    write_lines(other, numbered("o", 5))

    def lines_at_broker() -> list[str]:  # first deliveries: a kill makes the agent re-send
        events = first_deliveries(subscriber.events())
        return [e["data"]["line"] for e in events if e["type"] == "log.line"]

    wait_for(lambda: len(lines_at_broker()) == 10, 10, "the first lines at the broker")
    agent.kill()
    offset = other.stat().st_size
    write_lines(app, numbered("a", 100, start=5))
    os.rename(app, f"{app}.1")
    write_lines(app, numbered("b", 100))
    os.rename(f"{app}.1", f"{app}.2")
    os.rename(app, f"{app}.1")
    write_lines(app, numbered("c", 100))
    write_lines(other, numbered("o", 5, start=5))
    os.rename(other, f"{other}.1")
    other.write_text("")
    os.remove(f"{other}.1")
    agent.start()
    wait_for(lambda: len(lines_at_broker()) == 310, 20, "every generation's lines at the broker")
    app_lines = [line for line in lines_at_broker() if not line.startswith("o")]
    assert app_lines == numbered("a", 105) + numbered("b", 100) + numbered("c", 100)
    [gap] = [e for e in first_deliveries(subscriber.events()) if e["type"] == "log.gap"]
    assert gap["data"]["path"] == str(other)
    assert gap["data"]["from_offset"] == offset
    assert agent.terminate() == 0


def test_lines_are_queued_as_the_json_the_queue_would_make():
    """tail builds each line's JSON as text (cheaper than encoding a dict): it must be the
    very text the queue would store for the line's data."""
    texts = ["plain", 'quote " and \\ backslash', "tab\tand\x00\x1f\x7f", "é ü 😀 \u2028", ""]
    path = '/var/log/ünïcode "app".log'
    offsets = [0, 6, 40, 1 << 40, 99]
    made = line_json(path, texts, offsets)
    for text, offset, json_text in zip(texts, offsets, made, strict=True):
        assert json_text == encode_data({"path": path, "line": text, "offset": offset})
        assert json.loads(json_text)["line"] == text
