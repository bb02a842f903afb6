"""docs/fleet.md works as it stands: its ACL, passwords and private CA against a real Mosquitto.

The page's own blocks are taken out of it (as tests/test_tutorial.py does with
the tutorial), with only the paths and ports changed to this test's: the
``mosquitto_passwd`` commands, the broker's fleet config and ACL, the
``openssl`` commands of the private CA and the TLS listener. Then real agents
connect as devices.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import AgentProcess, run_cli

from edge_agent.testing import Mosquitto, Subscriber, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "fleet.md"

pytestmark = pytest.mark.timeout(90)


def block(language: str, first_line: str) -> str:
    """The page's one ``language`` code block that starts with ``first_line``."""
    text = PAGE.read_text()
    found = [
        m.group(1)
        for m in re.finditer(rf"^```{language}\n(.*?)^```", text, re.S | re.M)
        if m.group(1).startswith(first_line)
    ]
    assert len(found) == 1, f"{len(found)} {language} blocks start with {first_line!r}"
    return found[0]


def passwords() -> dict[str, str]:
    """User -> password, from the page's ``mosquitto_passwd -b`` lines."""
    users = {}
    for line in block("sh", "# per-device passwords").splitlines():
        if line.startswith("mosquitto_passwd"):
            *_, user, password = shlex.split(line)
            users[user] = password
    return users


class FleetBroker(Mosquitto):
    """Mosquitto with the page's fleet config and ACL (and more config after them)."""

    def __init__(self, directory: Path, listeners: str = "") -> None:
        super().__init__(str(directory))
        self.etc = directory / "etc"
        self.listeners = listeners

    def write_config(self) -> None:
        fleet = block("conf", "# /etc/mosquitto/conf.d/fleet.conf")
        lines = [
            fleet.replace("/etc/mosquitto/", f"{self.etc}/"),
            f"listener {self.port} 127.0.0.1",
            self.listeners,
            f"log_dest file {self.log_path}",
            "log_type all",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto' and cannot read tmp dirs
        Path(self.config_path).write_text("\n".join(lines) + "\n")


@pytest.fixture
def fleet_broker(tmp_path):
    """The page's broker: its passwords, made by its commands, and its ACL."""
    folder = tmp_path / "broker"
    broker = FleetBroker(folder)
    broker.etc.mkdir(parents=True)
    script = block("sh", "# per-device passwords").replace("/etc/mosquitto/", f"{broker.etc}/")
    made = subprocess.run(["bash", "-e"], input=script, text=True, capture_output=True, timeout=30)
    assert made.returncode == 0, made.stderr
    acl = block("conf", "# /etc/mosquitto/acl")
    (broker.etc / "acl").write_text(acl)
    broker.start()
    yield broker
    broker.stop()


def device(tmp_path: Path, name: str, sink: str) -> AgentProcess:
    """An agent called ``name`` with a file source on its inbox and the given sink table."""
    folder = tmp_path / name
    (folder / "inbox").mkdir(parents=True)
    return AgentProcess(
        folder,
        f"""
        [agent]
        id = "{name}"
        state_dir = "{folder / "state"}"
        shutdown_grace = "1s"

        [[sources.file]]
        name = "inbox"
        paths = ["{folder / "inbox"}"]
        """
        + "\n".join(line.strip() for line in sink.strip().splitlines())
        + "\n",
    )


def password_sink(port: int, user: str, password: str, topic: str) -> str:
    return f"""
        [[sinks.mqtt]]
        name = "cloud"
        host = "127.0.0.1"
        port = {port}
        protocol = "5"
        client_id = "{user}"
        username = "{user}"
        password = "{password}"
        topic = "{topic}"
        status_topic = "edge/{{agent}}/status"
        reconnect_min = "0.05s"
        reconnect_max = "0.5s"
        """


def consumer(broker: Mosquitto) -> Subscriber:
    """The page's consumer user, on a shared subscription to the whole fleet."""
    return Subscriber(
        broker.port,
        "$share/cloud/edge/#",
        protocol="5",
        username="cloud-consumer",
        password=passwords()["cloud-consumer"],
    )


def test_the_page_shows_per_user_patterns_not_client_ids():
    acl = block("conf", "# /etc/mosquitto/acl")
    assert "pattern write edge/%u/#" in acl
    assert "%c" not in acl


def test_the_pages_fleet_config_is_valid(tmp_path):
    """The one file for every device, with the device's name from the environment."""
    config = block("toml", '[agent]\nid = "${DEVICE_ID}"')
    for name in ("ca.crt", "mqtt.pass"):
        (tmp_path / name).write_text("x\n")
    config = config.replace("/etc/edge-agent/", f"{tmp_path}/")
    config = config.replace("[agent]\n", f'[agent]\nstate_dir = "{tmp_path / "state"}"\n')
    path = tmp_path / "agent.toml"
    path.write_text(config + '\n[[sources.exec]]\ncommand = ["true"]\n')
    env = {**os.environ, "DEVICE_ID": "gw-01"}
    checked = run_cli("check", "-c", str(path), env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "agent id 'gw-01'" in checked.stdout + checked.stderr


def test_a_device_delivers_into_its_own_topics(fleet_broker, tmp_path):
    users = passwords()
    agent = device(
        tmp_path,
        "gw-01",
        password_sink(fleet_broker.port, "gw-01", users["gw-01"], "edge/{agent}/{source}/{type}"),
    )
    with consumer(fleet_broker) as sub:
        agent.start()
        try:
            agent.wait_started(30)
            (agent.workdir / "inbox" / "a.csv").write_text("1\n")
            wait_for(
                lambda: any(m.topic.startswith("edge/gw-01/inbox/") for m in sub.messages),
                30,
                "gw-01's event at the consumer",
            )
            wait_for(lambda: agent.queued() == 0, 30, "gw-01's queue to empty")
        finally:
            assert agent.terminate() == 0, agent.log()
    topics = {m.topic for m in sub.messages}
    assert "edge/gw-01/status" in topics  # the status topic is under the device too
    assert "refused" not in agent.log()


def test_a_device_cannot_write_into_another_devices_topics(fleet_broker, tmp_path):
    users = passwords()
    # gw-01, with its own password, tries to publish as if it were gw-02.
    agent = device(
        tmp_path,
        "gw-01",
        password_sink(fleet_broker.port, "gw-01", users["gw-01"], "edge/gw-02/{source}/{type}"),
    )
    with consumer(fleet_broker) as sub:
        agent.start()
        try:
            agent.wait_started(30)
            (agent.workdir / "inbox" / "a.csv").write_text("1\n")
            agent.wait_log("broker refused", 30)
            assert "Not authorized" in agent.log()
            assert agent.queued() >= 1  # kept: a refusal is not a delivery
        finally:
            assert agent.terminate() == 0, agent.log()
    assert not [m for m in sub.messages if m.topic.startswith("edge/gw-02/")]
    assert agent.queued() >= 1


def test_a_wrong_password_is_refused_and_the_events_wait(fleet_broker, tmp_path):
    agent = device(
        tmp_path,
        "gw-02",
        password_sink(
            fleet_broker.port, "gw-02", "not-the-password", "edge/{agent}/{source}/{type}"
        ),
    )
    with consumer(fleet_broker) as sub:
        agent.start()
        try:
            agent.wait_ready(30)
            (agent.workdir / "inbox" / "a.csv").write_text("1\n")
            agent.wait_log("Not authorized", 30)
            wait_for(lambda: agent.queued() >= 1, 30, "the event in gw-02's queue")
        finally:
            assert agent.terminate() == 0, agent.log()
    assert not sub.messages
    assert "connected to" not in agent.log()


def test_the_private_ca_makes_certificates_the_broker_and_the_agent_accept(tmp_path):
    """The page's openssl commands, run as they stand (the broker's name: localhost); then
    a device that has only its certificate delivers into its own topics."""
    certs = tmp_path / "certs"
    certs.mkdir()
    script = block("sh", "# private CA").replace("BROKER=mqtt.example.net", "BROKER=localhost")
    made = subprocess.run(
        ["bash", "-e"], input=script, cwd=certs, text=True, capture_output=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    assert "broker.crt: OK" in made.stdout and "gw-01.crt: OK" in made.stdout

    tls_port = free_port()
    tls = block("conf", "# /etc/mosquitto/conf.d/fleet-tls.conf")
    tls = tls.replace("listener 8883", f"listener {tls_port} 127.0.0.1")
    tls = tls.replace("/etc/mosquitto/certs/", f"{certs}/")
    broker = FleetBroker(tmp_path / "broker", listeners=tls)
    broker.etc.mkdir(parents=True)
    script = block("sh", "# per-device passwords").replace("/etc/mosquitto/", f"{broker.etc}/")
    subprocess.run(
        ["bash", "-e"], input=script, text=True, check=True, capture_output=True, timeout=30
    )
    (broker.etc / "acl").write_text(block("conf", "# /etc/mosquitto/acl"))

    sink = block("toml", '[[sinks.mqtt]]\nname = "cloud"\nhost = "mqtt.example.net"')
    sink = sink.replace('"mqtt.example.net"', '"localhost"').replace("8883", str(tls_port))
    sink = sink.replace("/etc/edge-agent/", f"{certs}/")
    sink += 'reconnect_min = "0.05s"\nreconnect_max = "0.5s"\n'
    agent = device(tmp_path, "gw-01", sink)
    with broker, consumer(broker) as sub:
        agent.start()
        try:
            agent.wait_started(30)
            (agent.workdir / "inbox" / "a.csv").write_text("1\n")
            wait_for(
                lambda: any(m.topic.startswith("edge/gw-01/inbox/") for m in sub.messages),
                30,
                "the event of the device with a certificate",
            )
        finally:
            assert agent.terminate() == 0, agent.log()
