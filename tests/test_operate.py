"""Operating the agent: status, and the queue commands, with the real daemon."""

from __future__ import annotations

import json
import os
import signal
from datetime import UTC, datetime, timedelta

import pytest
from conftest import mqtt_agent_config, run_cli

from edge_agent.testing import free_port, wait_for

pytestmark = pytest.mark.timeout(60)


def test_status_while_connected_and_while_the_broker_is_down(
    tmp_path, subscriber, running_broker, agent_process
):
    agent = agent_process(mqtt_agent_config(tmp_path, running_broker.port))
    agent.start()
    agent.wait_started()
    (tmp_path / "inbox" / "a.csv").write_text("1")
    wait_for(lambda: len(subscriber.messages) >= 2, 10, "the events")

    def status() -> dict:
        result = run_cli("status", "-c", str(agent.config_path), "--json")
        return json.loads(result.stdout)

    wait_for(lambda: status()["status"]["sinks"]["cloud"]["confirmed"] >= 2, 15, "a fresh status")
    data = status()
    assert data["running"] is True
    assert data["status"]["sinks"]["cloud"]["connected"] is True
    assert data["status"]["sources"]["inbox"]["events"] >= 2
    cloud = data["status"]["sinks"]["cloud"]
    assert cloud["errors"] == 0 and cloud["warnings"] == 0 and cloud["latency"]["count"] >= 1
    assert 0 < cloud["latency"]["p50"] <= cloud["latency"]["p99"] < 5
    human = run_cli("status", "-c", str(agent.config_path))
    assert (
        human.returncode == 0
        and "cloud (127.0.0.1:" in human.stdout
        and "connected" in human.stdout
    )

    running_broker.stop()
    agent.wait_log("Offline", timeout=15)
    agent.wait_ready()  # the file source watches: files made now are seen
    (tmp_path / "inbox" / "b.csv").write_text("2")
    wait_for(
        lambda: (
            status()["status"]["sinks"]["cloud"]["backlog"] >= 2
            and not status()["status"]["sinks"]["cloud"]["connected"]
        ),
        20,
        "the status to show the outage",
    )
    assert status()["status"]["sinks"]["cloud"]["last_error"]
    assert status()["status"]["sinks"]["cloud"]["errors"] >= 1
    assert "ERRORS" in run_cli("status", "-c", str(agent.config_path)).stdout
    assert agent.terminate() == 0
    stopped = run_cli("status", "-c", str(agent.config_path))
    running_broker.start()
    assert stopped.returncode in (0, 1)


def test_status_says_when_the_agent_is_not_running(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(mqtt_agent_config(tmp_path, free_port()))
    result = run_cli("status", "-c", str(config))
    assert result.returncode == 1
    assert "has not run with this config" in result.stderr


def test_queue_stats_peek_and_purge(tmp_path, agent_process):
    agent = agent_process(mqtt_agent_config(tmp_path, free_port()))
    agent.start()
    agent.wait_log("Offline", timeout=15)
    agent.wait_ready()  # the file source watches: files made now are seen
    for name in ("a", "b", "c"):
        (tmp_path / "inbox" / f"{name}.csv").write_text("1")
    wait_for(lambda: agent.queued() == 6, 10, "6 events")
    config = str(agent.config_path)

    stats = json.loads(run_cli("queue", "stats", "-c", config, "--json").stdout)
    assert stats["events"] == 6 and stats["sinks"] == {"cloud": 6}
    peeked = run_cli("queue", "peek", "-c", config, "-n", "2")
    assert peeked.returncode == 0 and peeked.stdout.count('"specversion": "1.0"') == 2

    # The queue has one writer: purge refuses while the agent runs, naming it.
    busy = run_cli("queue", "purge", "-c", config, "--sink", "cloud", "--before", "0s", "--yes")
    assert busy.returncode == 1
    assert f"state dir {agent.state_dir} is in use by pid {agent.pid}" in busy.stderr
    assert "stop it first" in busy.stderr
    events = [
        json.loads(e) for e in _split(run_cli("queue", "peek", "-c", config, "-n", "6").stdout)
    ]
    assert agent.terminate() == 0

    refused = run_cli("queue", "purge", "-c", config, "--sink", "cloud", "--before", "0s")
    assert refused.returncode == 1 and "Refusing without --yes" in refused.stderr
    wrong = run_cli("queue", "purge", "-c", config, "--sink", "nope", "--before", "0s", "--yes")
    assert wrong.returncode == 1 and "no sink named 'nope'" in wrong.stderr

    # Purge only what is older than the first two files' events: the third file stays.
    cut = events[4]["time"]
    done = run_cli("queue", "purge", "-c", config, "--sink", "cloud", "--before", cut, "--yes")
    assert done.returncode == 0 and "purged 4 events" in done.stdout
    stats = json.loads(run_cli("queue", "stats", "-c", config, "--json").stdout)
    assert stats["sinks"] == {"cloud": 2}


def _split(text: str) -> list[str]:
    """The pretty-printed events of ``queue peek``, one string each."""
    chunks, depth, current = [], 0, []
    for line in text.splitlines():
        current.append(line)
        depth += line.count("{") - line.count("}")
        if depth == 0 and current:
            chunks.append("\n".join(current))
            current = []
    return chunks


def test_json_logs_for_shippers(tmp_path, agent_process):
    config = mqtt_agent_config(tmp_path, free_port()).replace(
        'id = "test-gw"', 'id = "test-gw"\n        log_format = "json"'
    )
    agent = agent_process(config).start()
    agent.wait_log("Offline", timeout=15)
    agent.wait_ready()  # the file source watches: files made now are seen
    assert agent.terminate() == 0
    entries = [json.loads(line) for line in agent.log().splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any(e["level"] == "warning" and "Offline" in e["message"] for e in entries)


def test_a_large_backlog_drains_with_calm_progress_lines(tmp_path, monkeypatch, caplog):
    import logging

    from edge_agent import Event, Sink
    from edge_agent import forwarder as forwarding
    from edge_agent.queue import QueueStore, QueueWriter

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(forwarding, "DRAIN_REPORT_MIN", 20)
    monkeypatch.setattr(forwarding, "DRAIN_REPORT_EVERY", 0.0)

    class Slow(Sink):
        max_batch = 10

        def publish(self, events):
            return events

    store = QueueStore(str(tmp_path / "state"))
    store.open()
    QueueWriter(store).append([(Event(type="a.b", source="s"), "{}") for _ in range(100)])
    forwarder = forwarding.Forwarder(
        Slow(name="slow", config=None, agent_id="gw"), store, on_confirmed=lambda: None
    )
    forwarder.start()
    wait_for(lambda: forwarder.confirmed == 100, 10, "the backlog to drain")
    forwarder.abort()
    forwarder.join(5)
    assert "sink slow: sending the backlog:" in caplog.text
    assert "events/s" in caplog.text and "sink slow: backlog sent" in caplog.text


def test_prometheus_metrics_parse_with_prometheus_clients_parser(
    tmp_path, subscriber, running_broker, agent_process
):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    config = (
        mqtt_agent_config(tmp_path, running_broker.port)
        + f"""
        [metrics]
        listen = "127.0.0.1:{port}"
        """
    )
    agent = agent_process(config).start()
    agent.wait_log("serving Prometheus metrics")
    agent.wait_started()
    (tmp_path / "inbox" / "a.csv").write_text("1")
    wait_for(lambda: len(subscriber.messages) >= 2, 10, "the events")

    def samples() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    wait_for(
        lambda: (
            samples().get(("edge_agent_sink_confirmed_events_total", (("sink", "cloud"),)), 0) >= 2
        ),
        10,
        "confirmed events in the metrics",
    )
    got = samples()
    assert got[("edge_agent_sink_connected", (("sink", "cloud"),))] == 1
    assert got[("edge_agent_source_events_total", (("source", "inbox"),))] >= 2
    assert ("edge_agent_queue_events", ()) in got
    assert got[("edge_agent_queue_oldest_age_seconds", ())] >= 0
    assert got[("edge_agent_sink_publish_latency_seconds_count", (("sink", "cloud"),))] >= 1
    assert got[("edge_agent_sink_errors_total", (("sink", "cloud"),))] == 0
    assert got[("edge_agent_sink_warnings_total", (("sink", "cloud"),))] == 0
    assert got[("edge_agent_sink_confirmed_bytes_total", (("sink", "cloud"),))] > 0
    assert got[("edge_agent_source_bytes_total", (("source", "inbox"),))] > 0
    assert got[("edge_agent_source_errors_total", (("source", "inbox"),))] == 0
    assert agent.terminate() == 0


def test_the_status_source_sends_the_agents_health_to_the_broker(
    tmp_path, subscriber, running_broker, agent_process
):
    config = mqtt_agent_config(tmp_path, running_broker.port) + (
        '\n[[sources.status]]\ninterval = "1s"\n'
    )
    agent = agent_process(config).start()
    agent.wait_started()
    (tmp_path / "inbox" / "a.csv").write_text("1")

    def statuses() -> list[dict]:
        return [e["data"] for e in subscriber.events() if e["type"] == "agent.status"]

    wait_for(
        lambda: any(s["sources"]["inbox"]["events"] >= 2 for s in statuses()),
        15,
        "a status event that counts the file events",
    )
    latest = statuses()[-1]
    assert latest["agent"] == "test-gw" and "pid" not in latest
    assert latest["sinks"]["cloud"]["connected"] is True
    assert latest["sinks"]["cloud"]["confirmed"] >= 1
    assert latest["sources"]["status"]["plugin"] == "status"
    topics = {m.topic for m in subscriber.messages}
    assert "edge/test-gw/status/agent.status" in topics
    assert agent.terminate() == 0


def test_an_idle_agent_touches_its_status_instead_of_rewriting_it(tmp_path):
    from edge_agent import status

    first = {"agent": "a", "updated": "2026-11-27T03:00:00Z", "queue": {"events": 0}}
    status.write(str(tmp_path), first)
    inode = (tmp_path / status.STATUS_FILE).stat().st_ino
    os.utime(tmp_path / status.STATUS_FILE, (1, 1))  # as if written long ago
    status.write(str(tmp_path), {**first, "updated": "2026-11-27T03:00:05Z"}, first)
    data, problem = status.read(str(tmp_path))
    assert problem is None, "the touched snapshot counts as fresh"
    assert (tmp_path / status.STATUS_FILE).stat().st_ino == inode, "not rewritten"
    a_minute_ago = datetime.now(UTC) - timedelta(minutes=1)
    assert data["updated"] > a_minute_ago.strftime("%Y-%m-%dT%H:%M:%SZ")
    status.write(str(tmp_path), {**first, "queue": {"events": 1}}, first)
    assert (tmp_path / status.STATUS_FILE).stat().st_ino != inode, "a change is written"


def test_counters_survive_a_reload_that_restarts_the_sink(
    tmp_path, subscriber, running_broker, agent_process
):
    base = mqtt_agent_config(tmp_path, running_broker.port)
    agent = agent_process(base).start()
    agent.wait_started()
    (tmp_path / "inbox" / "a.csv").write_text("1")

    def cloud() -> dict:
        result = run_cli("status", "-c", str(agent.config_path), "--json")
        return json.loads(result.stdout)["status"]["sinks"]["cloud"]

    wait_for(lambda: cloud()["confirmed"] >= 2, 15, "the file's events confirmed")
    before = cloud()
    agent.config_path.write_text(base.replace('connect_timeout = "2s"', 'connect_timeout = "3s"'))
    os.kill(agent.pid, signal.SIGHUP)
    agent.wait_log("sink cloud restarted")
    (tmp_path / "inbox" / "b.csv").write_text("2")
    wait_for(lambda: cloud()["confirmed"] >= before["confirmed"] + 2, 15, "counted on, not anew")
    assert cloud()["latency"]["count"] >= before["latency"]["count"]
    assert agent.terminate() == 0


def test_plugin_warnings_are_counted_even_when_the_log_level_hides_them(capsys):
    import logging

    from edge_agent.cli import setup_logging
    from edge_agent.counters import LoggedProblems

    root = logging.getLogger()
    saved = (root.level, root.handlers[:])
    problems = LoggedProblems()
    logging.getLogger("edge_agent").addHandler(problems)
    try:
        setup_logging("error")
        logging.getLogger("edge_agent.source.inbox").warning("a folder is missing")
        logging.getLogger("edge_agent.sink.cloud").error("a real error")
        logging.getLogger("edge_agent.source.inbox").info("not a problem")
    finally:
        logging.getLogger("edge_agent").removeHandler(problems)
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
    assert problems.get("source", "inbox") == 1 and problems.get("sink", "cloud") == 1
    printed = capsys.readouterr().err
    assert "a real error" in printed and "a folder is missing" not in printed


def test_bytes_are_counted_in_utf8():
    from edge_agent.counters import utf8_len

    assert utf8_len('{"path": "/data/x.csv"}') == 23
    text = '{"path": "/data/Übersicht-日本.csv"}'
    assert utf8_len(text) == len(text.encode("utf-8")) == 39 > len(text)


def test_status_tables_line_up_with_long_names(tmp_path, agent_process):
    (tmp_path / "inbox").mkdir()
    long_name = "inbox-of-the-north-east-loading-bay"
    agent = agent_process(
        f"""
        [agent]
        state_dir = "{tmp_path / "state"}"

        [[sources.file]]
        name = "{long_name}"
        paths = ["{tmp_path / "inbox"}"]

        [[sources.status]]
        name = "st"

        [[processors]]
        type = "drop"
        name = "no-swap-files-from-any-source-at-all"
        match = {{ "data.path" = "*.swp" }}

        [[sinks.stdout]]
        name = "out"
        """
    ).start()
    agent.wait_ready()

    def table() -> str | None:
        result = run_cli("status", "-c", str(agent.config_path))
        return result.stdout if result.returncode == 0 else None

    text = wait_for(table, 15, "a status")
    blocks = [b.splitlines() for b in text.split("\n\n")[1:]]
    heads = [block[0].split()[0] for block in blocks]
    assert heads[:3] == ["SINK", "SOURCE", "PROCESSOR"], text
    second_columns = set()
    for block in blocks[:3]:
        header = block[0]
        # The header's second column starts where every row's second cell does.
        column = header.index(header.split()[1])
        second_columns.add(column)
        for row in block[1:]:
            assert row[column - 2 : column] == "  " and row[column] != " ", (row, text)
    assert len(second_columns) == 1, text  # the first column is as wide in every table
    assert max(second_columns) == len("no-swap-files-from-any-source-at-all") + 2
