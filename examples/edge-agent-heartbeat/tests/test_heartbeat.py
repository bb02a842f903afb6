"""The plugin's own tests, with the fixtures edge-event-agent gives pytest."""

import json

from edge_agent_heartbeat import Heartbeat, JsonLines

from edge_agent import Event


def test_heartbeat_beats(source_harness):
    harness = source_harness(Heartbeat, {"interval": "50ms", "message": "hi"})
    events = harness.wait_for_events(3)
    assert [e.type for e in events[:3]] == ["heartbeat.beat"] * 3
    assert [e.data["beat"] for e in events[:3]] == [1, 2, 3]
    assert events[0].data["message"] == "hi"


def test_jsonl_sink_writes_and_confirms(sink_harness, tmp_path):
    out = tmp_path / "out.jsonl"
    events = [Event(type="t.x", source="s", data={"n": n}) for n in range(3)]
    confirmed = sink_harness(JsonLines, {"path": str(out)}).deliver(events)
    assert len(confirmed) == 3
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["data"]["n"] for line in lines] == [0, 1, 2]
    assert lines[0]["source"] == "edge-agent://test-agent/s"
