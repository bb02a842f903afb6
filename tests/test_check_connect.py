"""``edge-agent check --connect``: each sink connects once, as the agent would, against a
real Mosquitto (plain, with passwords, with TLS), and says per sink what happened."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
from conftest import mqtt_agent_config, run_cli
from test_mqtt_sink import make_ca, make_cert

from edge_agent.testing import Mosquitto, Subscriber, free_port, wait_for


def check_connect(tmp_path, sinks: str, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\nid = "gw-01"\nstate_dir = "{tmp_path / "state"}"\n{sinks}')
    return run_cli("check", "-c", str(path), "--connect", *extra)


def mqtt_sink(port: int, name: str = "cloud", extra: str = "") -> str:
    return f'[[sinks.mqtt]]\nname = "{name}"\nport = {port}\nconnect_timeout = "5s"\n{extra}\n'


def test_a_reachable_broker_is_exit_0_and_an_absent_one_is_exit_1_naming_sink_and_why(
    tmp_path, running_broker
):
    good = check_connect(tmp_path, mqtt_sink(running_broker.port) + "[[sinks.stdout]]\n")
    assert good.returncode == 0, good.stdout + good.stderr
    assert f"sink cloud (127.0.0.1:{running_broker.port}): connected in " in good.stdout
    assert "sink stdout (stdout): connected" in good.stdout
    down = free_port()
    bad = check_connect(tmp_path, mqtt_sink(running_broker.port) + mqtt_sink(down, "backup"))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"sink cloud (127.0.0.1:{running_broker.port}): connected" in bad.stdout
    assert f"sink backup (127.0.0.1:{down}): cannot connect: Connection refused" in bad.stdout
    assert "1 of 2 sinks could not connect" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_without_connect_nothing_is_dialled_and_an_invalid_file_is_78(tmp_path):
    plain = check_connect(tmp_path, mqtt_sink(free_port()))
    path = tmp_path / "agent.toml"
    assert run_cli("check", "-c", str(path)).returncode == 0
    assert plain.returncode == 1  # with --connect
    invalid = check_connect(tmp_path, mqtt_sink(free_port(), extra="qos = 7"))
    assert invalid.returncode == 78
    assert "sinks.mqtt" in invalid.stderr and "connect" not in invalid.stdout


def test_credentials_are_used_and_a_wrong_password_is_named(tmp_path):
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "gw-01", "right"], check=True)
    os.chmod(passwords, 0o644)
    broker = Mosquitto(str(tmp_path / "b"), extra_config=f"password_file {passwords}")
    broker.write_config()
    with open(broker.config_path) as handle:  # allow_anonymous is global: the last one wins
        text = handle.read().replace("allow_anonymous true\n", "allow_anonymous false\n")
    with open(broker.config_path, "w") as handle:
        handle.write(text)
    broker.write_config = lambda: None
    broker.start()
    try:
        (tmp_path / "secret").write_text("right\n")
        ok = check_connect(
            tmp_path,
            mqtt_sink(
                broker.port, extra=f'username = "gw-01"\npassword_file = "{tmp_path}/secret"'
            ),
        )
        assert ok.returncode == 0, ok.stdout + ok.stderr
        wrong = check_connect(
            tmp_path, mqtt_sink(broker.port, extra='username = "gw-01"\npassword = "wrong"')
        )
        assert wrong.returncode == 1
        assert "sink cloud" in wrong.stdout and "refused" in wrong.stdout, wrong.stdout
        assert "wrong" not in wrong.stdout + wrong.stderr  # the secret is never printed
    finally:
        broker.stop()


def test_tls_is_used_and_an_unknown_ca_is_named(tmp_path):
    ca = make_ca(tmp_path, "ca")
    server = make_cert(tmp_path, "server", ca, "IP:127.0.0.1")
    stranger = make_ca(tmp_path, "stranger")
    tls_port = free_port()
    extra = (
        f"listener {tls_port} 127.0.0.1\ncafile {ca[1]}\ncertfile {server[1]}\nkeyfile {server[0]}"
    )
    broker = Mosquitto(str(tmp_path / "b"), extra_config=extra).start()
    try:
        ok = check_connect(tmp_path, mqtt_sink(tls_port, extra=f'tls = {{ ca_file = "{ca[1]}" }}'))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        bad = check_connect(
            tmp_path, mqtt_sink(tls_port, extra=f'tls = {{ ca_file = "{stranger[1]}" }}')
        )
        assert bad.returncode == 1
        assert "sink cloud" in bad.stdout and "certificate" in bad.stdout, bad.stdout
    finally:
        broker.stop()


def test_a_destination_that_never_answers_is_reported_at_the_timeout(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts TCP, never says a word
    try:
        started = time.monotonic()
        result = check_connect(
            tmp_path,
            mqtt_sink(silent.getsockname()[1]).replace('"5s"', '"30s"'),
            "--timeout",
            "1",
        )
        assert result.returncode == 1
        assert "sink cloud" in result.stdout and "no answer within 1s" in result.stdout
        assert time.monotonic() - started < 10
    finally:
        silent.close()


@pytest.mark.timeout(60)
def test_a_check_beside_the_running_agent_leaves_its_session_alone(
    tmp_path, running_broker, agent_process
):
    agent = agent_process(
        mqtt_agent_config(tmp_path, running_broker.port, sink='status_topic = "edge/{agent}/up"')
    )
    agent.start()
    agent.wait_started(15)
    with Subscriber(running_broker.port, "edge/#") as sub:
        wait_for(lambda: b"online" in [m.payload for m in sub.messages], 10, "online status")
        result = run_cli("check", "-c", str(agent.config_path), "--connect")
        assert result.returncode == 0, result.stdout + result.stderr
        (tmp_path / "inbox" / "after.csv").write_text("1")
        wait_for(lambda: any(b"after.csv" in m.payload for m in sub.messages), 10, "the next event")
        statuses = [m.payload for m in sub.messages if m.topic.endswith("/up")]
    assert b"offline" not in statuses  # the check published no status of the agent's
    assert "session taken over" not in agent.run_log().lower()
    assert "connection lost" not in agent.run_log().lower(), agent.run_log()
