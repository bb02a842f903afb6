"""The AMQP sink against the RabbitMQ on 127.0.0.1:5672 (guest/guest), with publisher confirms."""

from __future__ import annotations

import json
import socket
import uuid

import pytest
from conftest import run_cli

from edge_agent import Event, SinkUnavailable
from edge_agent.plugins.amqp import AmqpSink
from edge_agent.testing import CuttableProxy, SinkHarness, wait_for

pytestmark = pytest.mark.timeout(60)

RABBIT = ("127.0.0.1", 5672)
URL = "amqp://guest:guest@127.0.0.1:{port}/%2F"


def rabbit_available() -> bool:
    try:
        with socket.create_connection(RABBIT, timeout=1):
            return True
    except OSError:
        return False


if not rabbit_available():
    pytest.skip(
        "no RabbitMQ answers on 127.0.0.1:5672 (make test starts an installed one with"
        " rabbitmq-server -detached; install Debian's rabbitmq-server to run these)",
        allow_module_level=True,
    )

import pika  # noqa: E402


@pytest.fixture
def exchange():
    """A fresh topic exchange with one queue bound to edge.#; deleted afterwards."""
    name = f"edge-test-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(URL.format(port=5672)))
    channel = connection.channel()
    channel.exchange_declare(name, exchange_type="topic", durable=False, auto_delete=False)
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, name, routing_key="gw-01.#")
    yield name, channel, queue
    channel.exchange_delete(name)
    connection.close()


def received(channel, queue) -> list:
    messages = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return messages
        messages.append((method.routing_key, properties, json.loads(body)))


def events(count: int) -> list[Event]:
    return [Event(type="file.created", source="inbox", data={"n": i}) for i in range(count)]


def test_events_are_published_persistent_and_confirmed(exchange):
    name, channel, queue = exchange
    config = {"url": URL.format(port=5672), "exchange": name, "declare_exchange": False}
    confirmed = SinkHarness(AmqpSink, config, agent_id="gw-01").deliver(events(5))
    assert len(confirmed) == 5
    messages = received(channel, queue)
    assert [m[2]["data"]["n"] for m in messages] == [0, 1, 2, 3, 4]
    key, properties, body = messages[0]
    assert key == "gw-01.inbox.file.created"
    assert properties.delivery_mode == 2 and properties.message_id == body["id"]
    assert properties.headers["ce_source"] == "edge-agent://gw-01/inbox"


def test_an_event_no_queue_takes_is_set_aside_and_the_rest_flow(exchange):
    name, channel, queue = exchange
    channel.queue_bind(queue, name, routing_key="inbox.#")
    config = {
        "url": URL.format(port=5672),
        "exchange": name,
        "declare_exchange": False,
        "routing_key": "{source}.{type}",
    }
    lost = Event(type="file.created", source="lost", data={"n": 99})
    batch = events(4)
    batch.insert(2, lost)
    harness = SinkHarness(AmqpSink, config, agent_id="gw-01")
    confirmed = harness.deliver(batch)
    assert [e.data["n"] for e in confirmed] == [0, 1, 2, 3]
    assert [m[2]["data"]["n"] for m in received(channel, queue)] == [0, 1, 2, 3]
    # Returned unroutable (mandatory) three times: set aside, with why.
    assert len(harness.rejections) == 3
    [(event, reason)] = harness.dead_letters
    assert event.id == lost.id
    assert "unroutable" in reason and "'lost.file.created'" in reason


def test_wrong_credentials_are_reported():
    sink = SinkHarness(AmqpSink, {"url": "amqp://guest:wrong@127.0.0.1:5672/%2F"}).sink
    with pytest.raises(Exception, match="refused the credentials"):
        sink.open()
    assert "wrong" not in sink.target


def test_a_cut_connection_is_noticed_and_reopened(exchange):
    name, channel, queue = exchange
    proxy = CuttableProxy(5672).start()
    try:
        config = {"url": URL.format(port=proxy.port), "exchange": name, "declare_exchange": False}
        sink = SinkHarness(AmqpSink, config, agent_id="gw-01").sink
        sink.open()
        from edge_agent.testing import queued_events

        batch = queued_events(events(3), "gw-01")
        assert sink.publish(batch[:1]) == batch[:1]
        proxy.cut()
        with pytest.raises(Exception):  # noqa: B017 (pika's error depends on where it is cut)
            sink.publish(batch[1:])
            sink.check_connection()
        sink.close()
        proxy.restore()
        sink.open()
        assert sink.publish(batch[1:]) == batch[1:]
        sink.close()
        got: list = []
        wait_for(lambda: got.extend(received(channel, queue)) or len(got) >= 3, 5, "3 messages")
        assert sorted(m[2]["data"]["n"] for m in got) == [0, 1, 2]
    finally:
        proxy.stop()


def test_a_stalled_connection_shows_in_status_and_the_log_within_seconds(
    exchange, tmp_path, agent_process
):
    """The link hangs (socket open, no bytes): status says so and a warning tells, long
    before a 60 s heartbeat ends the connection; then the event arrives."""
    name, channel, queue = exchange
    proxy = CuttableProxy(5672).start()
    (tmp_path / "inbox").mkdir()
    agent = agent_process(
        f"""
        [agent]
        id = "gw-01"
        state_dir = "{tmp_path / "state"}"

        [[sources.file]]
        name = "inbox"
        paths = ["{tmp_path / "inbox"}"]
        events = ["created"]

        [[sinks.amqp]]
        name = "rabbit"
        url = "{URL.format(port=proxy.port)}"
        exchange = "{name}"
        declare_exchange = false
        heartbeat = 60
        """
    )
    try:
        agent.start()
        agent.wait_started()
        proxy.stall()
        (tmp_path / "inbox" / "a.csv").write_text("1")

        def stalled_for() -> float:
            result = run_cli("status", "--json", "-c", str(agent.config_path))
            sink = json.loads(result.stdout)["status"]["sinks"]["rabbit"]
            return sink["stalled_for"] or 0

        wait_for(lambda: stalled_for() >= 5, 20, "status to show the sink waiting")
        result = run_cli("status", "-c", str(agent.config_path))
        assert "no answer" in result.stdout, result.stdout
        agent.wait_log("has not answered for", timeout=20)
        proxy.resume()
        got: list = []
        wait_for(lambda: got.extend(received(channel, queue)) or got, 20, "the event")
        assert got[0][2]["data"]["path"].endswith("a.csv")
        assert agent.terminate() == 0
    finally:
        proxy.stop()


def test_pika_stays_quiet_and_returned_messages_fold_into_one_line(exchange):
    """pika's INFO chatter at connect and its dump of each returned message stay out of
    the log; the sink's own line per routing key is folded into a count."""
    import io
    import logging

    from edge_agent.logfold import RepeatFolder

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    folder = RepeatFolder(handler, window=0.5)
    handler.addFilter(folder)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # as the agent at log_level = "info"
    try:
        name, _channel, _queue = exchange
        config = {
            "url": URL.format(port=5672),
            "exchange": name,
            "declare_exchange": False,
            "routing_key": "{source}.{type}",
        }
        harness = SinkHarness(AmqpSink, config, agent_id="gw-01")
        lost = [Event(type="file.created", source="nobody", data={"n": i}) for i in range(10)]
        routed = Event(type="file.created", source="gw-01", data={})  # bound: gw-01.#
        harness.deliver([*lost, routed])
        assert len(harness.dead_letters) == 10  # each returned three times: 30 returns

        def summed_up() -> bool:
            folder.flush_due()
            return "more like this" in out.getvalue()

        wait_for(summed_up, 10, "the count of the folded lines")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = out.getvalue()
    assert "INFO pika" not in text  # about 18 lines per connect, otherwise
    assert "Published message was returned" not in text
    ours = [line for line in text.splitlines() if "the broker did not take an event" in line]
    assert len(ours) == 2, text  # the first, then one with the count of the rest
    assert "routing key nobody.file.created" in ours[0]
    assert "29 more like this" in ours[1]


def test_hosts_are_tried_in_turn_and_the_target_names_the_one_that_answered(exchange):
    name, channel, queue = exchange
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    config = {
        "url": "amqp://guest:guest@127.0.0.1:1/%2F",
        "hosts": [f"127.0.0.1:{dead}", "127.0.0.1:5672"],
        "exchange": name,
        "declare_exchange": False,
    }
    sink = SinkHarness(AmqpSink, config, agent_id="gw-01").sink
    sink.open()
    try:
        assert sink.target == "127.0.0.1:5672//"
        from edge_agent.testing import queued_events

        batch = queued_events(events(2), "gw-01")
        assert sink.publish(batch) == batch
    finally:
        sink.close()
    got: list = []
    wait_for(lambda: got.extend(received(channel, queue)) or len(got) >= 2, 5, "2 messages")


def test_hosts_none_of_which_answers_is_unavailable_naming_the_last():
    ports = []
    for _ in range(2):
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            ports.append(closed.getsockname()[1])
    config = {"hosts": [f"127.0.0.1:{p}" for p in ports], "connect_timeout": "2s"}
    sink = SinkHarness(AmqpSink, config).sink
    with pytest.raises(SinkUnavailable):
        sink.open()
    assert sink.target.startswith(f"127.0.0.1:{ports[1]}")


def test_a_malformed_host_is_a_config_error():
    with pytest.raises(Exception, match="is not host:port"):
        SinkHarness(AmqpSink, {"hosts": ["node1:port"]})
