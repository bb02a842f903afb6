"""The MQTT sink's options against real Mosquitto brokers: TLS, passwords, MQTT 5, batches,
failover, and the status topic with a broker-side last will."""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

import pytest
from conftest import created_paths, make_files, mqtt_agent_config

from edge_agent import Event
from edge_agent.plugins.mqtt import MqttSink
from edge_agent.testing import Mosquitto, SinkHarness, Subscriber, free_port, wait_for

pytestmark = pytest.mark.timeout(60)


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(folder, name: str) -> tuple[str, str]:
    key, cert = str(folder / f"{name}.key"), str(folder / f"{name}.pem")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", key, "-out", cert)  # fmt: skip
    return key, cert


def make_cert(folder, name: str, ca: tuple[str, str], san: str) -> tuple[str, str]:
    key, csr, cert = (str(folder / f"{name}.{ext}") for ext in ("key", "csr", "pem"))
    ext = folder / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", key,
            "-out", csr)  # fmt: skip
    openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
            "-days", "2", "-extfile", str(ext), "-out", cert)  # fmt: skip
    for path in (key, cert):
        os.chmod(path, 0o644)
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1, a client certificate, and a stranger CA."""
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "ca")
    server = make_cert(folder, "server", ca, "IP:127.0.0.1,DNS:localhost")
    client = make_cert(folder, "client", ca, "DNS:gw-01")
    stranger = make_ca(folder, "stranger")
    return {"ca": ca[1], "server": server, "client": client, "stranger": stranger[1]}


def tls_broker(folder, pki, *, require_certificate: bool) -> tuple[Mosquitto, int]:
    tls_port = free_port()
    extra = "\n".join(
        [
            f"listener {tls_port} 127.0.0.1",
            f"cafile {pki['ca']}",
            f"certfile {pki['server'][1]}",
            f"keyfile {pki['server'][0]}",
            f"require_certificate {'true' if require_certificate else 'false'}",
        ]
    )
    return Mosquitto(str(folder), extra_config=extra).start(), tls_port


def events(count: int, source: str = "inbox") -> list[Event]:
    return [
        Event(type="file.created", source=source, data={"path": f"/in/{i}.csv", "n": i})
        for i in range(count)
    ]


def deliver(config: dict, count: int = 3) -> list:
    return SinkHarness(MqttSink, config, agent_id="gw-01").deliver(events(count), timeout=15)


def test_tls_with_a_pinned_ca(tmp_path, pki):
    broker, tls_port = tls_broker(tmp_path / "b", pki, require_certificate=False)
    try:
        with Subscriber(broker.port, "edge/#") as sub:
            confirmed = deliver({"port": tls_port, "tls": {"ca_file": pki["ca"]}})
            assert len(confirmed) == 3
            wait_for(lambda: len(sub.messages) == 3, 10, "3 messages over TLS")
    finally:
        broker.stop()


@pytest.mark.filterwarnings(
    # paho-mqtt 2.2 leaves the socket of a failed TLS handshake unclosed (_ssl_wrap_socket);
    # Python closes it when it is collected.
    "ignore::pytest.PytestUnraisableExceptionWarning"
)
def test_an_untrusted_certificate_is_refused_clearly(tmp_path, pki):
    broker, tls_port = tls_broker(tmp_path / "b", pki, require_certificate=False)
    try:
        sink = SinkHarness(MqttSink, {"port": tls_port, "tls": {"ca_file": pki["stranger"]}}).sink
        with pytest.raises(Exception, match="TLS failed: the server's certificate chain is not"):
            sink.open()
        sink.close()
    finally:
        broker.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # as above
def test_a_certificate_for_another_host_name_is_named_as_such(tmp_path, pki, caplog):
    ca = (os.path.splitext(pki["ca"])[0] + ".key", pki["ca"])
    other = make_cert(tmp_path, "other", ca, "DNS:x.example")
    broker, tls_port = tls_broker(
        tmp_path / "b", {**pki, "server": other}, require_certificate=False
    )
    try:
        for host, why in (("localhost", "Hostname mismatch"), ("127.0.0.1", "IP address mismatch")):
            config = {"host": host, "port": tls_port, "tls": {"ca_file": pki["ca"]}}
            sink = SinkHarness(MqttSink, config).sink
            with pytest.raises(Exception, match=rf"not for the host name {host} \({why}"):
                sink.open()
            sink.close()
        # insecure skips exactly that check, and says so whenever a sink is made (each start).
        insecure = {"port": tls_port, "tls": {"ca_file": pki["ca"], "insecure": True}}
        assert len(deliver(insecure)) == 3
        assert "tls.insecure = true: the broker's certificate is not checked" in caplog.text
    finally:
        broker.stop()


def test_mutual_tls(tmp_path, pki):
    broker, tls_port = tls_broker(tmp_path / "b", pki, require_certificate=True)
    try:
        key, cert = pki["client"]
        tls = {"ca_file": pki["ca"], "cert_file": cert, "key_file": key}
        assert len(deliver({"port": tls_port, "tls": tls})) == 3
        anonymous = SinkHarness(MqttSink, {"port": tls_port, "tls": {"ca_file": pki["ca"]}}).sink
        with pytest.raises(Exception):  # noqa: B017 (the broker only hangs up; no reason given)
            anonymous.open()
        anonymous.close()
    finally:
        broker.stop()


def test_passwords_and_a_wrong_one(tmp_path, agent_process):
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "gw-01", "right"], check=True)
    os.chmod(passwords, 0o644)
    broker = Mosquitto(
        str(tmp_path / "b"), extra_config=f"password_file {passwords}\nallow_anonymous false"
    )
    broker.write_config()
    config = broker.config_path
    with open(config) as handle:  # allow_anonymous is global: the last one wins
        text = handle.read().replace("allow_anonymous true\n", "")
    broker.write_config = lambda: None
    with open(config, "w") as handle:
        handle.write(text)
    broker.start()
    try:
        sink = SinkHarness(
            MqttSink, {"port": broker.port, "username": "gw-01", "password": "wrong"}
        )
        with pytest.raises(
            Exception, match=r"refused the connection: (Bad user name or password|Not authorized)"
        ):
            sink.sink.open()
        sink.sink.close()
        (tmp_path / "secret").write_text("right\n")
        agent = agent_process(
            f"""
            [agent]
            id = "gw-01"
            state_dir = "{tmp_path / "state"}"
            [[sources.file]]
            paths = ["{tmp_path / "inbox"}"]
            [[sinks.mqtt]]
            port = {broker.port}
            username = "gw-01"
            password_file = "{tmp_path / "secret"}"
            """
        )
        (tmp_path / "inbox").mkdir()
        with Subscriber(broker.port, "edge/#", username="gw-01", password="right") as sub:
            agent.start()
            agent.wait_started()
            (tmp_path / "inbox" / "a.csv").write_text("1")
            wait_for(lambda: sub.messages, 10, "an event through the password-protected broker")
        assert "right" not in agent.log()
        assert agent.terminate() == 0
    finally:
        broker.stop()


def test_mqtt5_user_properties_and_binary_payload(broker):
    with Subscriber(broker.port, "edge/#", protocol="5") as sub:
        deliver({"port": broker.port}, count=1)
        deliver({"port": broker.port, "payload": "binary"}, count=1)
        wait_for(lambda: len(sub.messages) == 2, 10, "2 messages")
    structured, binary = sub.messages
    envelope = structured.json()
    assert structured.properties.ContentType == "application/cloudevents+json"
    assert ("id", envelope["id"]) in structured.properties.UserProperty
    attributes = dict(binary.properties.UserProperty)
    assert binary.json() == {"path": "/in/0.csv", "n": 0}
    assert attributes["type"] == "file.created" and attributes["specversion"] == "1.0"
    assert attributes["source"] == "edge-agent://gw-01/inbox"
    assert binary.properties.ContentType == "application/json"


def test_batches_carry_many_events_per_message(broker):
    config = {"port": broker.port, "batch_max_events": 50, "topic": "edge/{agent}/{source}"}
    with Subscriber(broker.port, "edge/#") as sub:
        confirmed = deliver(config, count=120)
        assert len(confirmed) == 120
        wait_for(lambda: sum(len(m.json()) for m in sub.messages) == 120, 10, "120 events")
    sizes = [len(m.json()) for m in sub.messages]
    assert sizes == [50, 50, 20]
    assert [e["data"]["n"] for m in sub.messages for e in m.json()] == list(range(120))


def test_topic_templates_use_data_fields(broker):
    config = {"port": broker.port, "topic": "edge/{agent}/files/{data.n}"}
    with Subscriber(broker.port, "edge/#") as sub:
        deliver(config, count=2)
        wait_for(lambda: len(sub.messages) == 2, 10, "2 messages")
    assert [m.topic for m in sub.messages] == ["edge/gw-01/files/0", "edge/gw-01/files/1"]


def test_the_subject_keeps_its_levels_under_a_prefix(broker):
    """A bridge keeps a device's topic layout upstream: {subject} with its / as levels,
    + and # made _, a missing subject _."""
    subjects = ["sensors/kitchen/temp", "a/+/b#", None, "/var/in/x.csv"]
    batch = [
        Event(type="mqtt.message", source="local", subject=subject, data={"n": i})
        for i, subject in enumerate(subjects)
    ]
    config = {"port": broker.port, "topic": "site-7/{subject}"}
    with Subscriber(broker.port, "site-7/#") as sub:
        confirmed = SinkHarness(MqttSink, config, agent_id="gw-01").deliver(batch, timeout=15)
        assert len(confirmed) == 4
        wait_for(lambda: len(sub.messages) == 4, 10, "4 messages")
    assert [m.topic for m in sub.messages] == [
        "site-7/sensors/kitchen/temp",
        "site-7/a/_/b_",
        "site-7/_",
        "site-7//var/in/x.csv",
    ]


def test_failover_to_the_second_broker(tmp_path):
    second = Mosquitto(str(tmp_path / "second")).start()
    try:
        hosts = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{second.port}"]
        with Subscriber(second.port, "edge/#") as sub:
            assert len(deliver({"hosts": hosts, "connect_timeout": "2s"})) == 3
            wait_for(lambda: len(sub.messages) == 3, 10, "3 messages at the second broker")
    finally:
        second.stop()


def test_status_topic_online_offline_and_the_will(tmp_path, running_broker, agent_process):
    config = f"""
        [agent]
        id = "gw-07"
        state_dir = "{tmp_path / "state"}"
        [[sources.file]]
        paths = ["{tmp_path / "inbox"}"]
        [[sinks.mqtt]]
        port = {running_broker.port}
        status_topic = "edge/{{agent}}/status"
        keepalive = 5
        """
    (tmp_path / "inbox").mkdir()
    agent = agent_process(config)
    with Subscriber(running_broker.port, "edge/gw-07/status") as sub:

        def statuses() -> list[bytes]:
            return [m.payload for m in sub.messages]

        agent.start()
        wait_for(lambda: statuses()[-1:] == [b"online"], 10, "online")
        agent.kill()  # the broker sends the will
        wait_for(lambda: statuses()[-1:] == [b"offline"], 10, "the will")
        agent.start()
        wait_for(lambda: statuses()[-1:] == [b"online"], 10, "online again")
        assert agent.terminate() == 0  # a clean stop leaves offline too
        wait_for(lambda: statuses()[-1:] == [b"offline"], 10, "offline after a clean stop")


def test_bad_options_are_config_errors():
    from edge_agent.config import parse_config
    from edge_agent.errors import ConfigError
    from edge_agent.plugin_host import load_plugins

    data = {
        "sinks": {
            "mqtt": [
                {"topic": "a/{nope}"},
                {"name": "b", "payload": "binary", "protocol": "3.1.1"},
                {"name": "c", "hosts": ["x:notaport"]},
                {"name": "d", "tls": {"ca_file": "/no/such/ca.pem"}},
                {"name": "e", "tls": {"ca_file": "/dev/zero"}},
            ]
        }
    }
    with pytest.raises(ConfigError) as error:
        parse_config(data, "t.toml", load_plugins())
    text = str(error.value)
    assert "sinks.mqtt[0].topic: topic 'a/{nope}' uses unknown field(s) nope" in text
    assert 'sinks.mqtt[1].payload: payload = "binary" needs protocol = "5"' in text
    assert "sinks.mqtt[2].hosts: 'x:notaport' is not host:port" in text
    assert "sinks.mqtt[3].tls.ca_file: cannot read /no/such/ca.pem" in text
    assert "sinks.mqtt[4].tls.ca_file: /dev/zero is not a regular file" in text


def test_websockets_transport(tmp_path):
    ws_port = free_port()
    broker = Mosquitto(
        str(tmp_path / "ws"), extra_config=f"listener {ws_port} 127.0.0.1\nprotocol websockets"
    )
    try:
        broker.start()
    except RuntimeError as exc:
        pytest.skip(f"this mosquitto has no websockets support: {exc}")
    try:
        with Subscriber(broker.port, "edge/#") as sub:
            assert len(deliver({"port": ws_port, "transport": "websockets"})) == 3
            wait_for(lambda: len(sub.messages) == 3, 10, "3 messages over websockets")
    finally:
        broker.stop()


def test_retain_message_expiry_and_a_persistent_session(tmp_path):
    broker = Mosquitto(str(tmp_path / "b")).start()
    try:
        config = {
            "port": broker.port,
            "retain": True,
            "message_expiry": "1h",
            "clean_start": False,
            "session_expiry": "10m",
            "client_id": "gw-01-session",
        }
        deliver(config, count=1)
        # A subscriber arriving later still gets it: it was retained.
        with Subscriber(broker.port, "edge/#", protocol="5") as sub:
            wait_for(lambda: sub.messages, 10, "the retained message")
        assert 0 < sub.messages[0].properties.MessageExpiryInterval <= 3600
        log = Path(broker.log_path).read_text()
        assert "as gw-01-session (p5, c0" in log, "connected without a clean start"
    finally:
        broker.stop()


def test_an_idle_connection_keeps_alive_and_still_delivers(tmp_path, agent_process):
    """paho has no thread of its own in the sink: the idle forwarder must keep the
    keepalive, or the broker drops the client after 1.5 keepalive periods of silence."""
    broker = Mosquitto(str(tmp_path / "b"), extra_config="log_type all").start()
    try:
        config = mqtt_agent_config(tmp_path, broker.port, sink="keepalive = 2")
        agent = agent_process(config).start()
        agent.wait_started()
        broker_log = Path(broker.log_path)
        wait_for(
            lambda: broker_log.read_text().count("Received PINGREQ from edge-agent-") >= 3,
            15,
            "three keepalive pings from the idle agent",
        )
        text = broker_log.read_text()
        assert "exceeded timeout" not in text
        assert text.count("New client connected") == 1, "one connection, never dropped"
        with Subscriber(broker.port, "edge/#") as sub:
            (tmp_path / "inbox" / "late.csv").write_text("1")
            wait_for(lambda: created_paths(sub.events()), 10, "an event after the idle time")
        assert "reconnect" not in agent.log().lower()
        assert agent.terminate() == 0
    finally:
        broker.stop()


@pytest.mark.parametrize("qos", [1, 2])
def test_the_status_topics_own_ack_does_not_end_the_wait_for_events(
    tmp_path, running_broker, agent_process, qos
):
    """The PUBACK of the "online" status message is not an event's: a round that read
    it must go on waiting for the events' acks (at QoS 2 it always comes first)."""
    sink = f'status_topic = "status/{{agent}}"\n        qos = {qos}'
    agent = agent_process(mqtt_agent_config(tmp_path, running_broker.port, sink=sink))
    with Subscriber(running_broker.port, "edge/test-gw/#") as subscriber:
        agent.start()
        agent.wait_started()
        paths = make_files(tmp_path / "inbox", 3)
        wait_for(lambda: len(created_paths(subscriber.events())) >= 3, 15, "three events")
        wait_for(lambda: agent.queued() == 0, 10, "the queue to empty")
        assert sorted(created_paths(subscriber.events())) == paths, "each event once"
    log = agent.log()
    assert "no acknowledgement" not in log
    assert log.count("connected to") == 1, "never reconnected"
    assert agent.terminate() == 0


def test_a_socket_numbered_1024_or_above_still_works(broker):
    """select() cannot watch a descriptor of 1024 or more, and an agent tailing many
    files hands those out; the sink waits with poll()."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard limit on open files here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    held: list[int] = []
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        held.append(null)
        while held[-1] < 1100:  # the sink's socket gets the next free number, above these
            held.append(os.dup(null))
        confirmed = deliver({"port": broker.port})
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(confirmed) == 3


def sink_losing_its_connection(broker, provoke) -> str:
    """Open an MQTT 5 sink, ``provoke(sink)``, and return why the sink says it was lost."""
    from edge_agent import SinkUnavailable

    config = {"port": broker.port, "protocol": "5", "client_id": "edge-test-same-id"}
    sink = SinkHarness(MqttSink, config, agent_id="gw-01").sink
    sink.open()
    try:
        provoke(sink)

        def lost() -> str | None:
            try:
                sink.check_connection()
            except SinkUnavailable as exc:
                return str(exc)
            return None

        return wait_for(lost, 10, "the sink to see its connection closed")
    finally:
        sink.close()


def test_a_second_client_with_the_same_id_is_named_as_the_likely_cause(broker):
    """MQTT 5, two clients with one client id: Mosquitto 2.0 closes the older connection
    without a DISCONNECT (seen: no packet, just the close), and paho calls that
    "Unspecified error". The sink says what happened and the likely cause instead."""
    import paho.mqtt.client as mqtt

    other = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="edge-test-same-id", protocol=mqtt.MQTTv5
    )

    def take_over(_sink) -> None:
        other.connect("127.0.0.1", broker.port)
        other.loop_start()

    try:
        reason = sink_losing_its_connection(broker, take_over)
    finally:
        other.loop_stop()
        other.disconnect()
    assert "Unspecified error" not in reason
    assert "closed without a reason from the broker" in reason
    assert "'edge-test-same-id'" in reason and "own client_id" in reason


def test_the_reason_code_of_a_brokers_disconnect_is_reported(broker):
    """A DISCONNECT with a reason code, from a real Mosquitto: a topic alias above the
    broker's Topic Alias Maximum (10) gets DISCONNECT 0x94."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    def bad_alias(sink) -> None:
        properties = Properties(PacketTypes.PUBLISH)
        properties.TopicAlias = 11
        sink._client.publish("edge/alias", b"x", qos=0, properties=properties)

    reason = sink_losing_its_connection(broker, bad_alias)
    assert "the broker disconnected us: Topic alias invalid (0x94)" in reason
    assert "Unspecified error" not in reason
