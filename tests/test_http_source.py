"""The http source with real HTTP clients (http.client, raw sockets) on loopback."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import threading
import time

import pytest

from edge_agent.plugins.http_source import HttpSource
from edge_agent.testing import SourceHarness, free_port, wait_for

JSON = {"Content-Type": "application/json"}


def post(port: int, body, headers=None, conn=None, path="/events"):
    """POST and return (status, headers, parsed JSON answer)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    try:
        conn.request("POST", path, body, {**JSON, **(headers or {})})
        response = conn.getresponse()
        answer = json.loads(response.read() or b"null")
    finally:
        if own:  # also when the server went away mid-request (no unclosed socket)
            conn.close()
    return response.status, dict(response.getheaders()), answer


@pytest.fixture
def source():
    """A running http source on a free port, with its committed events in memory."""
    made = []

    def make(**config):
        harness = SourceHarness(HttpSource, {"port": 0, **config}).start()
        made.append(harness)
        harness.wait_listening()
        harness.port = harness.source.address[1]
        return harness

    yield make
    for harness in made:
        harness.stop()


def test_json_object_array_and_cloudevents_are_committed(source):
    harness = source()
    assert post(harness.port, {"temp": 21.5})[::2] == (200, {"accepted": 1})
    assert post(harness.port, [{"n": 1}, {"n": 2}])[::2] == (200, {"accepted": 2})
    event = {
        "specversion": "1.0",
        "id": "app-42",
        "source": "/app",
        "type": "app.reading",
        "subject": "sensor-1",
        "time": "2026-11-26T23:59:01Z",
        "data": {"v": 1},
    }
    headers = {"Content-Type": "application/cloudevents+json"}
    assert post(harness.port, event, headers)[0] == 200
    batch = [{**event, "id": f"b-{i}", "data": i} for i in range(3)]
    headers = {"Content-Type": "application/cloudevents-batch+json; charset=utf-8"}
    assert post(harness.port, batch, headers)[::2] == (200, {"accepted": 3})

    events = harness.events
    assert [(e.type, e.data) for e in events[:3]] == [
        ("http.event", {"temp": 21.5}),
        ("http.event", {"n": 1}),
        ("http.event", {"n": 2}),
    ]
    ce = events[3]
    assert (ce.id, ce.type, ce.subject, ce.data) == ("app-42", "app.reading", "sensor-1", {"v": 1})
    assert ce.time == "2026-11-26T23:59:01.000000Z"
    assert [e.id for e in events[4:]] == ["b-0", "b-1", "b-2"]


def test_errors_are_small_json_bodies_that_say_what_is_wrong(source):
    harness = source(max_body_bytes=1000)
    status, _, answer = post(harness.port, b'{"a": [1, 2,, 3]}')
    assert status == 400
    assert "line 1 column 13" in answer["error"]
    status, _, answer = post(harness.port, b"{}", {"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in answer["error"]
    event = {"specversion": "1.0", "id": "x", "source": "/a", "type": "bad type"}
    headers = {"Content-Type": "application/cloudevents-batch+json"}
    status, _, answer = post(harness.port, [{**event, "type": "ok"}, event], headers)
    assert status == 400 and answer["error"].startswith("event 1 (counting from 0)")
    status, _, answer = post(harness.port, {"x": "y" * 2000})
    assert status == 413 and "max_body_bytes" in answer["error"]
    status, _, answer = post(harness.port, {}, path="/other")
    assert status == 404
    assert harness.events == []


def test_json_too_deep_or_with_a_huge_number_is_refused_400(source, caplog):
    harness = source(max_body_bytes=100_000)
    status, _, answer = post(harness.port, b"[" * 5000 + b"]" * 5000)
    assert status == 400
    assert "nested too deep" in answer["error"]
    status, _, answer = post(harness.port, b'{"n": ' + b"7" * 5000 + b"}")
    assert status == 400
    assert "4300 digits" in answer["error"] and "as a string" in answer["error"]
    assert post(harness.port, {"n": 1})[0] == 200  # and the source goes on
    assert [e.data for e in harness.events] == [{"n": 1}]
    assert not [r for r in caplog.records if r.exc_info], "no traceback is logged"


def test_a_body_over_the_limit_is_refused_before_it_is_sent(source):
    """A client that asks first (Expect: 100-continue) gets its 413 without sending the body."""
    harness = source(max_body_bytes=1000)
    with socket.create_connection(("127.0.0.1", harness.port), timeout=10) as sock:
        sock.sendall(
            b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 50000000\r\nExpect: 100-continue\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(4096):  # until the agent closes: it does not read the body
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"status": 413' in answer
    harness2 = source(max_body_bytes=1000)  # and a client that does not ask reads it too
    status, _, answer = post(harness2.port, b"[" + b"1," * 500_000 + b"1]")
    assert status == 413


def test_a_bearer_token_is_required_when_set(source):
    harness = source(token="s3cret")
    status, headers, answer = post(harness.port, {"a": 1})
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert "bearer token" in answer["error"]
    assert post(harness.port, {"a": 1}, {"Authorization": "Bearer wrong"})[0] == 401
    assert post(harness.port, {"a": 1}, {"Authorization": "Bearer s3cret"})[0] == 200
    assert len(harness.events) == 1


def test_one_connection_serves_many_requests(source):
    harness = source()
    conn = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=10)
    post(harness.port, {"n": 0}, conn=conn)
    first = conn.sock
    for n in range(1, 20):
        assert post(harness.port, {"n": n}, conn=conn)[0] == 200
    bad = post(harness.port, b"{", conn=conn)  # an error keeps the connection too
    assert bad[0] == 400
    assert post(harness.port, {"n": 20}, conn=conn)[0] == 200
    assert conn.sock is first
    conn.close()
    assert [e.data["n"] for e in harness.events] == list(range(21))


def test_concurrent_posters_all_get_their_events_committed(source):
    harness = source(threads=4)
    results: list[int] = []

    def poster(who: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=30)
        for n in range(25):
            batch = [{"who": who, "n": n, "i": i} for i in range(10)]
            results.append(post(harness.port, batch, conn=conn)[0])
        conn.close()

    threads = [threading.Thread(target=poster, args=(who,)) for who in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [200] * 300
    events = harness.wait_for_events(3000)
    assert len(events) == 3000
    assert len({e.id for e in events}) == 3000
    for who in range(12):  # each poster's events in the order it sent them
        mine = [(e.data["n"], e.data["i"]) for e in events if e.data["who"] == who]
        assert mine == sorted(mine)


def test_slow_and_idle_clients_do_not_starve_the_others(source):
    """Connections that send nothing cost no worker; one that trickles its request holds
    one worker at most request_timeout, then gets a 408."""
    harness = source(threads=2, request_timeout=3)
    idle = [socket.create_connection(("127.0.0.1", harness.port)) for _ in range(20)]
    slow = socket.create_connection(("127.0.0.1", harness.port), timeout=10)
    slow.sendall(b"POST /events HTTP/1.1\r\n")
    trickled = threading.Event()

    def trickle() -> None:
        try:
            for byte in b"Host: x\r\nContent-Type: application/json\r\n":
                slow.sendall(bytes([byte]))
                if trickled.wait(0.2):  # ok: a slow client's pace
                    return
        except OSError:
            pass

    threading.Thread(target=trickle, daemon=True).start()
    try:
        started = time.monotonic()
        for n in range(5):
            assert post(harness.port, {"n": n})[0] == 200
        assert time.monotonic() - started < 2.0
        answer = slow.recv(4096)  # request_timeout after its first byte
        assert answer.startswith(b"HTTP/1.1 408 ")
    finally:
        trickled.set()
        slow.close()
        for sock in idle:
            sock.close()
    assert len(harness.events) == 5


def test_idle_kept_alive_connections_give_their_workers_up(source):
    """Kept-alive connections that posted once and then idle hold no worker another
    client needs, and one alone is closed after keepalive_timeout, not request_timeout."""
    harness = source(threads=2, keepalive_timeout=20, request_timeout=30)
    kept = [http.client.HTTPConnection("127.0.0.1", harness.port, timeout=10) for _ in range(2)]
    try:
        for n, conn in enumerate(kept):
            assert post(harness.port, {"n": n}, conn=conn)[0] == 200
        # Every worker now has an idle kept-alive connection; a third client is served
        # long before keepalive_timeout (20 s) or request_timeout (30 s) would free one.
        third = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=5)
        assert post(harness.port, {"n": 2}, conn=third)[0] == 200
        third.close()
    finally:
        for conn in kept:
            conn.close()
    assert [e.data["n"] for e in harness.events] == [0, 1, 2]

    harness = source(keepalive_timeout=1, request_timeout=30)
    conn = http.client.HTTPConnection("127.0.0.1", harness.port, timeout=10)
    try:
        assert post(harness.port, {"n": 0}, conn=conn)[0] == 200
        conn.sock.settimeout(10)  # well under request_timeout
        assert conn.sock.recv(1) == b""  # closed by the agent after keepalive_timeout
    finally:
        conn.close()


def test_a_body_shorter_than_its_length_gets_408_and_a_closed_connection(source):
    harness = source(request_timeout=1)
    client = socket.create_connection(("127.0.0.1", harness.port), timeout=10)
    try:
        client.sendall(
            b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"a": 1}'
        )
        answer = b""
        while chunk := client.recv(4096):  # the agent closes the connection after its answer
            answer += chunk
    finally:
        client.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in answer.lower()
    assert harness.events == []


def test_an_idempotency_key_makes_a_retry_a_no_op(source):
    harness = source()
    headers = {"Idempotency-Key": "order-17"}
    assert post(harness.port, [{"a": 1}, {"a": 2}], headers)[::2] == (200, {"accepted": 2})
    status, _, answer = post(harness.port, [{"a": 1}, {"a": 2}], headers)
    assert status == 200 and answer["duplicate"] is True and answer["accepted"] == 0
    assert post(harness.port, [{"a": 3}], {"Idempotency-Key": "order-18"})[0] == 200
    assert [e.data["a"] for e in harness.events] == [1, 2, 3]
    assert set(harness.saved_checkpoints) == {"idem:order-17", "idem:order-18"}
    assert post(harness.port, {}, {"Idempotency-Key": "x" * 500})[0] == 400


# -- the real agent ------------------------------------------------------------------


def agent_config(tmp_path, port: int, source_extra: str = "", queue: str = "") -> str:
    return f"""
        [agent]
        id = "test-gw"
        state_dir = "{tmp_path / "state"}"
        shutdown_grace = "1s"

        [queue]
        {queue}

        [[sources.http]]
        name = "apps"
        port = {port}
        {source_extra}

        [[sinks.mqtt]]
        name = "cloud"
        host = "127.0.0.1"
        port = {free_port()}
        connect_timeout = "1s"
        reconnect_max = "1s"
        """


def queued_ids(state_dir) -> list[str]:
    conn = sqlite3.connect(str(state_dir / "queue.db"))
    try:
        return [row[0] for row in conn.execute("SELECT id FROM events ORDER BY position")]
    finally:
        conn.close()


def test_a_full_blocking_queue_answers_503_with_retry_after(agent_process, tmp_path):
    """Until one request has waited queue_wait in vain each may wait; from then on the
    queue is known full: the waiting ones and new ones are answered 503 at once, but for
    one request at a time, which waits queue_wait to see whether room came."""
    port = free_port()
    (tmp_path / "token").write_text("from-a-file\n")
    agent = agent_process(
        agent_config(
            tmp_path,
            port,
            f'token_file = "{tmp_path / "token"}"\nqueue_wait = "4s"\nretry_after = 7',
            'max_events = 10\nwhen_full = "block"',
        )
    ).start()
    agent.wait_ready()
    auth = {"Authorization": "Bearer from-a-file"}
    status, _, answer = post(port, [{"n": i} for i in range(11)], auth)
    assert status == 413 and "max_events" in answer["error"]  # could never fit: not 503
    assert post(port, [{"n": i} for i in range(10)], auth)[0] == 200

    answers: list[tuple[int, dict, str]] = []  # in the order they came

    def poster(n: int) -> None:
        status, headers, answer = post(port, {"n": n}, auth)
        answers.append((status, headers, answer["error"]))

    # The first request to find the queue full waits queue_wait; one that came while it
    # waited is answered with it, before its own queue_wait ran out.
    first = threading.Thread(target=poster, args=(100,))
    first.start()
    first.join(1.5)
    assert first.is_alive()  # it waits for room
    second = threading.Thread(target=poster, args=(101,))
    second.start()
    for thread in (first, second):
        thread.join(30)
    assert [status for status, _, _ in answers] == [503, 503]
    assert answers[0][1]["Retry-After"] == "7"
    assert "no room came within 4s" in answers[0][2]  # the first, after its queue_wait
    assert "another request waited 4s for room in vain" in answers[1][2]  # before its own

    # Now four at once: one waits queue_wait, the three others are answered before it.
    answers.clear()
    threads = [threading.Thread(target=poster, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [status for status, _, _ in answers] == [503] * 4
    assert ["another request waits for room" in error for _, _, error in answers] == [
        True,
        True,
        True,
        False,
    ]
    assert "no room came within 4s" in answers[3][2]
    assert agent.queued() == 10
    assert agent.terminate() == 0


def test_a_2xx_after_a_sigkill_means_the_events_are_there(agent_process, tmp_path):
    """Posters keep posting while the agent is killed: every event answered 2xx is in
    the queue after the restart; a post without an answer was simply not accepted."""
    port = free_port()
    agent = agent_process(agent_config(tmp_path, port)).start()
    agent.wait_ready()
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def poster(who: int) -> None:
        n = 0
        while not stop.is_set():
            batch = [
                {
                    "specversion": "1.0",
                    "id": f"{who}-{n}-{i}",
                    "source": "/t",
                    "type": "t.x",
                    "data": i,
                }
                for i in range(20)
            ]
            try:
                status = post(port, batch, {"Content-Type": "application/cloudevents-batch+json"})
            except (OSError, http.client.HTTPException):
                continue  # the agent is gone: no answer, nothing promised
            if status[0] == 200:
                with lock:
                    answered.extend(e["id"] for e in batch)
            n += 1

    threads = [threading.Thread(target=poster, args=(who,), daemon=True) for who in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(answered) >= 2000, 30, "2,000 events answered")
    os.kill(agent.pid, signal.SIGKILL)
    agent.process.wait(10)
    agent._close()
    stop.set()
    for thread in threads:
        thread.join(15)
    agent.start()
    agent.wait_ready()
    ids = set(queued_ids(tmp_path / "state"))
    missing = [i for i in answered if i not in ids]
    assert not missing, f"{len(missing)} events answered 200 are not in the queue"
    assert agent.terminate() == 0
