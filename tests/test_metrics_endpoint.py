"""The metrics listener as a scraper, a load balancer's probe and a careless client see it."""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request

import pytest
from conftest import mqtt_agent_config
from prometheus_client.core import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from edge_agent import __version__, metrics
from edge_agent.testing import free_port, wait_for


def get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of ``GET path``, as urllib sees it."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.fixture
def metrics_agent(tmp_path, agent_process):
    port = free_port()
    listen = f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
    config = mqtt_agent_config(tmp_path, free_port()) + listen
    agent = agent_process(config).start()
    agent.wait_ready(15)
    agent.wait_log("serving Prometheus metrics")
    return agent, port


def test_metrics_at_its_path_health_beside_it_404_elsewhere(metrics_agent):
    _agent, port = metrics_agent
    code, content_type, text = get(port, "/metrics")
    assert code == 200 and content_type.startswith("text/plain; version=")
    samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["edge_agent_build_info"].labels == {"version": __version__}
    assert samples["edge_agent_build_info"].value == 1
    assert samples["process_resident_memory_bytes"].value > 1e6
    assert samples["process_open_fds"].value > 3
    assert samples["process_cpu_seconds_total"].value > 0
    assert "edge_agent_sink_connected" in samples
    code, content_type, text = get(port, "/health")
    assert (code, content_type, json.loads(text)) == (200, "application/json", {"status": "ok"})
    for path in ("/", "/metric", "/metrics/", "/metrics/x", "/favicon.ico"):
        code, _, text = get(port, path)
        assert code == 404, path
        assert "/metrics and /health" in text
    assert get(port, "/metrics?name[]=edge_agent_build_info")[0] == 200


def test_200_idle_connections_cost_no_thread_and_the_scrape_still_answers(metrics_agent):
    agent, port = metrics_agent
    get(port, "/metrics")  # the workers that a scrape starts are there
    before = threads(agent.pid)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(200)]
    try:
        started = time.monotonic()
        code, _, text = get(port, "/metrics")
        assert code == 200 and "edge_agent_build_info" in text
        assert time.monotonic() - started < 3
        assert threads(agent.pid) <= before + metrics.WORKERS
        # Past MAX_CONNECTIONS the longest idle are closed; the rest time out.
        closed = sum(1 for s in idle if _closed(s))
        assert closed >= 200 - metrics.MAX_CONNECTIONS
        wait_for(
            lambda: all(_closed(s) for s in idle), metrics.IDLE_TIMEOUT + 10, "idle ones closed"
        )
    finally:
        for s in idle:
            s.close()
    assert get(port, "/health")[0] == 200


def _closed(sock: socket.socket) -> bool:
    """Has the server closed this connection (EOF or reset waiting to be read)?"""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class StubAgent:
    """Only what the listener reads from an agent: is a part stuck, and the status."""

    def __init__(self) -> None:
        self.stuck_part: tuple[str, float] | None = None

    def stuck(self) -> tuple[str, float] | None:
        return self.stuck_part


@pytest.fixture
def stub_server():
    agent = StubAgent()
    server = metrics.MetricsServer(agent, CollectorRegistry(), "127.0.0.1", 0)
    yield agent, server, server.server_address[1]
    server.shutdown()


def test_health_is_503_with_the_reason_while_a_part_makes_no_progress(stub_server):
    agent, _server, port = stub_server
    assert get(port, "/health")[0] == 200
    agent.stuck_part = ("sink cloud", 130.4)
    code, content_type, text = get(port, "/health")
    assert (code, content_type) == (503, "application/json")
    assert json.loads(text) == {"status": "stuck", "reason": "sink cloud made no progress for 130s"}
    agent.stuck_part = ("the queue writer", float("inf"))
    code, _, text = get(port, "/health")
    assert (code, json.loads(text)["reason"]) == (503, "the queue writer has stopped")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("HEAD", "/health")
    response = conn.getresponse()
    assert response.status == 503 and response.read() == b""
    conn.close()


def test_a_client_that_never_finishes_its_request_is_cut_off(stub_server, monkeypatch):
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 1.0)
    _agent, server, port = stub_server
    slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(6)]
    try:
        for s in slow:
            s.sendall(b"GET /metr")  # and nothing more
        wait_for(lambda: server.connections()[1] >= metrics.WORKERS, 5, "the workers taken")
        started = time.monotonic()
        code, _, _ = get(port, "/health")  # waits for a worker, which the cut-off frees
        assert code == 200
        assert time.monotonic() - started < 5
        for s in slow:
            s.setblocking(True)
            assert s.recv(100) in (b"", b"HTTP/1.0 408")  # closed
    finally:
        for s in slow:
            s.close()
    wait_for(lambda: server.connections() == (0, 0), 5, "no connection held")
