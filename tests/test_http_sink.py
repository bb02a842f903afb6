"""The http sink against a real local HTTP server: ok, slow, failing, busy, refusing."""

from __future__ import annotations

import gzip
import json
import sqlite3
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import run_cli
from test_http_source import post
from test_mqtt_sink import make_ca, make_cert

from edge_agent import Event, SinkUnavailable
from edge_agent.plugins.http_sink import HttpSink
from edge_agent.testing import SinkHarness, free_port, wait_for


class Receiver:
    """A local HTTP server that records what it is sent and answers as ``answer`` says.

    ``answer(request)`` returns ``(status, headers)`` (or ``(status, headers, delay)``);
    ``request`` is a dict: events, content_type, encoding, headers, peer.
    """

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        receiver = self
        self.requests: list[dict] = []
        self.delivered: list[dict] = []
        self.lock = threading.Lock()
        self.answer = lambda request: (200, {})

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                encoding = self.headers.get("Content-Encoding")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                parsed = json.loads(body)
                request = {
                    "events": parsed if isinstance(parsed, list) else [parsed],
                    "content_type": self.headers["Content-Type"],
                    "encoding": encoding,
                    "headers": dict(self.headers),
                    "peer": self.client_address,
                    "at": time.monotonic(),
                }
                status, headers, *delay = receiver.answer(request)
                if delay:
                    time.sleep(delay[0])  # ok: a slow server
                request["status"] = status
                with receiver.lock:
                    receiver.requests.append(request)
                    if 200 <= status < 300:
                        receiver.delivered.extend(request["events"])
                answer = json.dumps({"status": status}).encode()
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/ingest"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def ids(self) -> list[str]:
        with self.lock:
            return [e["id"] for e in self.delivered]


def events(count: int, **data) -> list[Event]:
    return [Event(type="t.x", source="s", data={"n": n, **data}) for n in range(count)]


def test_batches_are_posted_as_cloudevents_on_one_connection():
    with Receiver() as receiver:
        harness = SinkHarness(
            HttpSink,
            {"url": receiver.url(), "headers": {"X-Device": "gw-01"}, "token": "t0k"},
        )
        sent = events(250)
        confirmed = harness.deliver(sent)
        assert [e.id for e in confirmed] == [e.id for e in sent]
        assert receiver.ids() == [e.id for e in sent]
        assert [len(r["events"]) for r in receiver.requests] == [100, 100, 50]
        first = receiver.requests[0]
        assert first["content_type"] == "application/cloudevents-batch+json"
        assert first["headers"]["X-Device"] == "gw-01"
        assert first["headers"]["Authorization"] == "Bearer t0k"
        assert first["events"][0]["source"] == "edge-agent://test-agent/s"
        assert first["events"][0]["data"] == {"n": 0}
        assert len({r["peer"] for r in receiver.requests}) == 1  # one connection, reused


def test_single_events_and_gzip():
    with Receiver() as receiver:
        harness = SinkHarness(
            HttpSink, {"url": receiver.url(), "batch_max_events": 1, "gzip": True}
        )
        harness.deliver(events(3))
        assert [r["content_type"] for r in receiver.requests] == [
            "application/cloudevents+json"
        ] * 3
        assert {r["encoding"] for r in receiver.requests} == {"gzip"}
        assert [e["data"]["n"] for e in receiver.delivered] == [0, 1, 2]


def test_a_400_for_one_event_among_many_sets_only_that_one_aside():
    with Receiver() as receiver:
        receiver.answer = lambda request: (
            (400, {}) if any(e["data"].get("bad") for e in request["events"]) else (200, {})
        )
        sent = events(100)
        sent[37].data["bad"] = True
        harness = SinkHarness(HttpSink, {"url": receiver.url()}, dead_letter_after=3)
        confirmed = harness.deliver(sent)
        assert len(confirmed) == 99
        assert sorted(e["data"]["n"] for e in receiver.delivered) == [
            n for n in range(100) if n != 37
        ]
        reason = f'{receiver.url()} answered 400 Bad Request: {{"status": 400}}'
        assert [(e.data["n"], why) for e, why in harness.dead_letters] == [(37, reason)]


def test_a_413_alone_is_set_aside_at_once():
    with Receiver() as receiver:
        receiver.answer = lambda request: (
            (413, {}) if any(e["data"].get("huge") for e in request["events"]) else (200, {})
        )
        sent = events(10)
        sent[4].data["huge"] = True
        harness = SinkHarness(HttpSink, {"url": receiver.url()}, dead_letter_after=0)
        assert len(harness.deliver(sent)) == 9
        assert [e.data["n"] for e, _ in harness.dead_letters] == [4]
        assert harness.rejections[0].invalid


@pytest.mark.parametrize("status", [500, 503, 408])
def test_a_failing_server_confirms_nothing_and_says_why(status):
    with Receiver() as receiver:
        receiver.answer = lambda request: (status, {})
        harness = SinkHarness(HttpSink, {"url": receiver.url()})
        with pytest.raises(SinkUnavailable, match=f"answered {status}"):
            harness.deliver(events(5))
        assert harness.rejections == []


def test_a_wrong_token_is_a_configuration_problem_not_a_dead_letter():
    with Receiver() as receiver:
        receiver.answer = lambda request: (401, {})
        harness = SinkHarness(HttpSink, {"url": receiver.url(), "token": "old"})
        with pytest.raises(SinkUnavailable, match="check token"):
            harness.deliver(events(5))
        assert len(receiver.requests) == 1 and harness.rejections == []


def test_a_slow_server_times_out():
    with Receiver() as receiver:
        receiver.answer = lambda request: (200, {}, 2.0)
        harness = SinkHarness(HttpSink, {"url": receiver.url(), "timeout": 0.3})
        with pytest.raises(SinkUnavailable, match=r"no answer within 0\.3s"):
            harness.deliver(events(1))


def test_retry_after_is_honoured():
    with Receiver() as receiver:
        receiver.answer = lambda request: (429, {"Retry-After": "2"})
        harness = SinkHarness(HttpSink, {"url": receiver.url()})
        with pytest.raises(SinkUnavailable, match=r"429 Too Many Requests.*2s"):
            harness.deliver(events(3))
        receiver.answer = lambda request: (200, {})
        harness.sink.open()
        try:
            assert len(harness.sink.publish(_queued(3))) == 3
        finally:
            harness.sink.close()
        gap = receiver.requests[1]["at"] - receiver.requests[0]["at"]
        assert gap >= 1.9


def _queued(count):
    from edge_agent.testing import queued_events

    return queued_events(events(count))


def test_tls_with_a_ca_file_and_a_client_certificate(tmp_path):
    ca = make_ca(tmp_path, "ca")
    server_key, server_cert = make_cert(tmp_path, "server", ca, "IP:127.0.0.1")
    client_key, client_cert = make_cert(tmp_path, "client", ca, "DNS:gw-01")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_cert, server_key)
    context.load_verify_locations(ca[1])
    context.verify_mode = ssl.CERT_REQUIRED
    with Receiver(tls=context) as receiver:
        tls = {"ca_file": ca[1], "cert_file": client_cert, "key_file": client_key}
        harness = SinkHarness(HttpSink, {"url": receiver.url("https"), "tls": tls})
        assert len(harness.deliver(events(5))) == 5
        stranger = make_ca(tmp_path, "stranger")
        harness = SinkHarness(
            HttpSink, {"url": receiver.url("https"), "tls": {"ca_file": stranger[1]}}
        )
        with pytest.raises(SinkUnavailable, match=r"chain is not trusted.*tls\.ca_file"):
            harness.deliver(events(1))


# -- the real agent: http source -> queue -> http sink ---------------------------------


def relay_config(tmp_path, source_port: int, url: str, sink_extra: str = "") -> str:
    return f"""
        [agent]
        id = "relay"
        state_dir = "{tmp_path / "state"}"
        shutdown_grace = "1s"

        [queue]
        dead_letter_after = 2

        [[sources.http]]
        name = "apps"
        port = {source_port}

        [[sinks.http]]
        name = "backend"
        url = "{url}"
        retry_min = "0.1s"
        retry_max = "0.5s"
        {sink_extra}
        """


def test_the_agent_delivers_through_failures_and_sets_one_bad_event_aside(agent_process, tmp_path):
    """Through a server that fails, is slow, is busy (429), and refuses one event:
    every other event arrives, the bad one is a dead letter, nothing is lost."""
    port = free_port()
    (tmp_path / "token").write_text("s3cret\n")
    with Receiver() as receiver:
        calls = {"n": 0}

        def answer(request):
            calls["n"] += 1
            if calls["n"] <= 2:
                return (500, {})
            if calls["n"] == 4:
                return (429, {"Retry-After": "1"})
            status = 400 if any(e["data"].get("bad") for e in request["events"]) else 200
            if calls["n"] == 3:
                return (status, {}, 1.5)  # slower than the sink's timeout: sent again
            return (status, {})

        receiver.answer = answer
        agent = agent_process(
            relay_config(
                tmp_path,
                port,
                receiver.url(),
                f'timeout = "0.5s"\ntoken_file = "{tmp_path / "token"}"\ngzip = true',
            )
        ).start()
        agent.wait_ready()
        for batch in range(5):
            body = [{"batch": batch, "i": i, "bad": batch == 2 and i == 7} for i in range(20)]
            assert post(port, body)[0] == 200
        wanted = {(b, i) for b in range(5) for i in range(20)} - {(2, 7)}

        def arrived():
            with receiver.lock:
                return {(e["data"]["batch"], e["data"]["i"]) for e in receiver.delivered}

        wait_for(lambda: arrived() >= wanted, 30, "every good event at the server")
        assert (2, 7) not in arrived()
        assert receiver.requests[-1]["headers"]["Authorization"] == "Bearer s3cret"

        def dead():
            conn = sqlite3.connect(str(tmp_path / "state" / "queue.db"))
            try:
                return conn.execute("SELECT data, reason FROM dead_letters").fetchall()
            finally:
                conn.close()

        rows = wait_for(dead, 15, "the bad event set aside")
        assert json.loads(rows[0][0])["i"] == 7 and "400 Bad Request" in rows[0][1]
        ordered = sorted(receiver.requests, key=lambda r: r["at"])  # as they came in
        busy = next(i for i, r in enumerate(ordered) if r["status"] == 429)
        assert ordered[busy + 1]["at"] - ordered[busy]["at"] >= 0.95  # Retry-After: 1
        assert agent.terminate() == 0


def test_a_server_that_refuses_every_event_is_warned_about_and_counted(agent_process, tmp_path):
    """A 400 for every event: nothing is set aside (no event gets through to prove the
    others bad), but the log says what the server answered, once for its repeats, and
    status counts the refusals."""
    port = free_port()
    with Receiver() as receiver:
        receiver.answer = lambda request: (400, {})
        agent = agent_process(relay_config(tmp_path, port, receiver.url())).start()
        agent.wait_ready()
        assert post(port, [{"i": i} for i in range(4)])[0] == 200
        wait_for(lambda: len(receiver.requests) >= 14, 20, "two rounds of split requests")

        def refused() -> int:
            result = run_cli("status", "--json", "-c", str(agent.config_path))
            return json.loads(result.stdout)["status"]["sinks"]["backend"]["refused"]

        wait_for(lambda: refused() >= 8, 20, "status to count the refusals of two rounds")
        warning = f"{receiver.url()} refused an event: 400 Bad Request;"
        agent.wait_log(warning)
        line = next(x for x in agent.run_log().splitlines() if warning in x)
        assert "WARNING" in line and "they all stay queued" in line
        said = [x for x in agent.run_log().splitlines() if warning in x]
        assert len([x for x in said if "more like this" not in x]) == 1, "repeats are folded"
        table = run_cli("status", "-c", str(agent.config_path)).stdout
        assert "REFUSED" in table
        assert receiver.delivered == []
        assert agent.terminate() == 0
    dead = sqlite3.connect(str(tmp_path / "state" / "queue.db"))
    try:
        assert dead.execute("SELECT COUNT(*) FROM dead_letters").fetchone() == (0,)
    finally:
        dead.close()
