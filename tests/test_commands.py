"""Remote commands: a real agent process, a real Mosquitto, MQTT 5 request/response."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import installed_plugin, mqtt_agent_config, run_cli
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.testing import Mosquitto, Subscriber, wait_for

pytestmark = pytest.mark.timeout(90)

AGENT = "test-gw"
LISTENING = "commands listen on edge/test-gw/cmd/+"


class Requester:
    """The cloud's side: publishes requests with a response topic and correlation data,
    and collects the answers by correlation."""

    def __init__(
        self,
        port: int,
        client_id: str | None = None,
        reply_topic: str | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.client_id = client_id or f"cloud-{uuid.uuid4().hex[:8]}"
        self.reply_topic = reply_topic or f"cloud/{self.client_id}/replies"
        self.acks: dict[int, object] = {}
        self.answers: dict[bytes, tuple[dict, object]] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_connect = lambda c, *a: c.subscribe(self.reply_topic, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.on_publish = lambda c, u, mid, reason, p: self.acks.__setitem__(mid, reason)
        if username:
            self.client.username_pw_set(username, password)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_for(self._subscribed.is_set, 10, "the requester's subscription")

    def _on_message(self, client, userdata, message) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        with self._lock:
            self.answers[correlation] = (json.loads(message.payload), message.properties)

    def send(
        self,
        command: str,
        payload: bytes = b"",
        *,
        response: bool = True,
        requester: str | None = None,
        reply_topic: str | None = None,
        agent: str = AGENT,
    ) -> bytes:
        correlation = uuid.uuid4().bytes
        properties = Properties(PacketTypes.PUBLISH)
        if response:
            properties.ResponseTopic = reply_topic or self.reply_topic
        properties.CorrelationData = correlation
        if requester:
            properties.UserProperty = ("client_id", requester)
        info = self.client.publish(
            f"edge/{agent}/cmd/{command}", payload, qos=1, properties=properties
        )
        wait_for(lambda: info.mid in self.acks, 10, "the broker's PUBACK")
        self.last_ack = self.acks[info.mid]
        return correlation

    def ask(self, command: str, payload: bytes = b"", timeout: float = 20.0) -> dict:
        correlation = self.send(command, payload, requester=self.client_id)
        answer, _properties = wait_for(
            lambda: self.answers.get(correlation), timeout, f"an answer to {command}"
        )
        return answer

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def requester(running_broker):
    made = Requester(running_broker.port)
    yield made
    made.close()


def commands_config(tmp_path: Path, port: int, table: str) -> str:
    return mqtt_agent_config(tmp_path, port, sink=table)


def started(agent_process, config: str):
    agent = agent_process(config).start()
    agent.wait_ready(30)
    return agent


def test_ping_and_status_are_answered_with_the_correlation_data(
    tmp_path, running_broker, requester, agent_process
):
    table = """
        [sinks.mqtt.commands]
        allow = ["ping", "status", "queue-stats"]
    """
    agent = started(agent_process, commands_config(tmp_path, running_broker.port, table))
    agent.wait_log(LISTENING, 30)

    correlation = requester.send("ping", requester=requester.client_id)
    answer, properties = wait_for(lambda: requester.answers.get(correlation), 20, "the pong")
    assert properties.CorrelationData == correlation
    assert properties.ContentType == "application/json"
    assert answer["ok"] is True and answer["command"] == "ping" and answer["agent"] == AGENT
    assert answer["result"]["agent"] == AGENT and answer["result"]["version"]

    status = requester.ask("status")
    assert status["ok"] is True
    snapshot = status["result"]
    assert snapshot["running"] is True and snapshot["problem"] is None
    assert snapshot["status"]["agent"] == AGENT and "cloud" in snapshot["status"]["sinks"]
    assert snapshot["status"]["pid"] == agent.pid

    stats = requester.ask("queue-stats")
    assert stats["ok"] is True
    assert set(stats["result"]) == {
        "path",
        "events",
        "bytes",
        "oldest",
        "newest",
        "sinks",
        "dead_letters",
    }
    cli = run_cli("queue", "stats", "--json", "-c", str(agent.config_path))
    assert set(json.loads(cli.stdout)) == set(stats["result"])

    log = agent.log()
    assert f"command 'ping' from client {requester.client_id!r}" in log
    assert "answered on cloud/" in log


def test_unknown_and_malformed_commands_are_refused_with_a_reason(
    tmp_path, running_broker, requester, agent_process
):
    table = """
        [sinks.mqtt.commands]
        max_request_bytes = 64
    """
    agent = started(agent_process, commands_config(tmp_path, running_broker.port, table))
    agent.wait_log(LISTENING, 30)

    unknown = requester.ask("format-disk")
    assert unknown["ok"] is False and unknown["code"] == "unknown"
    assert "no command 'format-disk'" in unknown["error"] and "ping" in unknown["error"]

    bad = requester.ask("ping", b"{not json")
    assert bad["ok"] is False and bad["code"] == "bad_request" and "not JSON" in bad["error"]
    not_object = requester.ask("ping", b"[1, 2]")
    assert not_object["code"] == "bad_request" and "JSON object" in not_object["error"]
    large = requester.ask("ping", json.dumps({"x": "y" * 100}).encode())
    assert large["code"] == "too_large" and "64" in large["error"]

    # No response topic: nothing can be answered, nothing is run, the log says why.
    requester.send("status", response=False)
    agent.wait_log("refused: it has no response topic", 20)
    assert "command 'format-disk'" in agent.log() and "refused (unknown)" in agent.log()


def test_an_action_not_in_allow_is_never_run(tmp_path, running_broker, requester, agent_process):
    table = """
        [sinks.mqtt.commands]
        allow = ["ping", "status"]
    """
    config = commands_config(tmp_path, running_broker.port, table)
    agent = started(agent_process, config)
    agent.wait_log(LISTENING, 30)
    # A change that a reload would apply: a second sink.
    agent.config_path.write_text(agent.config_path.read_text() + "\n[[sinks.stdout]]\n")

    refused = requester.ask("reload")
    assert refused["ok"] is False and refused["code"] == "not_allowed"
    assert "'reload' is not allowed" in refused["error"]
    # Answered after the refusal, in order: the agent still runs the old configuration.
    status = requester.ask("status")
    assert set(status["result"]["status"]["sinks"]) == {"cloud"}
    assert "configuration reloaded" not in agent.log()
    assert "command 'reload' from" in agent.log() and "refused (not_allowed)" in agent.log()


def test_reload_when_allowed_applies_the_file(tmp_path, running_broker, requester, agent_process):
    table = """
        [sinks.mqtt.commands]
        allow = ["status", "reload"]
    """
    agent = started(agent_process, commands_config(tmp_path, running_broker.port, table))
    agent.wait_log(LISTENING, 30)
    agent.config_path.write_text(agent.config_path.read_text() + "\n[[sinks.stdout]]\n")

    done = requester.ask("reload", timeout=30)
    assert done["ok"] is True and done["result"]["applied"] is True
    status = requester.ask("status")
    assert set(status["result"]["status"]["sinks"]) == {"cloud", "stdout"}
    assert "SIGHUP: configuration reloaded" in agent.log()

    agent.config_path.write_text(agent.config_path.read_text() + "\nunknown_table = 1\n")
    invalid = requester.ask("reload", timeout=30)
    assert invalid["ok"] is False and invalid["code"] == "failed"
    assert "invalid" in invalid["error"]


def test_commands_are_off_by_default(tmp_path, running_broker, requester, agent_process):
    broker_log_path = Path(running_broker.log_path)
    earlier = len(broker_log_path.read_text())  # the module's broker: other tests' clients
    agent = agent_process(mqtt_agent_config(tmp_path, running_broker.port)).start()
    agent.wait_started(30)
    with Subscriber(running_broker.port, f"edge/{AGENT}/cmd/#", protocol="5") as watcher:
        correlation = requester.send("ping", requester=requester.client_id)
        # The request reached the broker and anyone subscribed to it ...
        wait_for(lambda: watcher.messages, 20, "the request at another subscriber")
    # ... and within a deadline nobody answered it.
    with pytest.raises(AssertionError, match="timed out"):
        wait_for(lambda: requester.answers.get(correlation), 3, "an answer")
    broker_log = broker_log_path.read_text()[earlier:]
    assert "as edge-agent-test-gw-cloud " in broker_log  # the sink's connection
    assert "edge-agent-test-gw-cloud-cmd" not in broker_log  # no command connection
    assert "commands listen" not in agent.log() and "command '" not in agent.log()


def test_mqtt_3_1_1_refuses_commands_with_a_config_error(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(
        commands_config(tmp_path, 1883, 'protocol = "3.1.1"\n[sinks.mqtt.commands]\n')
    )
    checked = run_cli("check", "-c", str(config))
    assert checked.returncode == 78
    assert "sinks.mqtt.commands: remote commands need" in checked.stderr
    assert 'protocol = "5"' in checked.stderr


PLUGIN = """
import time

from edge_agent import hookimpl


def echo(arguments):
    return {"echoed": arguments}


def slow(arguments):
    time.sleep(arguments.get("seconds", 5))
    return "late"


def broken(arguments):
    raise RuntimeError("the sensor is unplugged")


@hookimpl
def register_remote_commands(register):
    register("echo", echo)
    register("slow", slow)
    register("broken", broken)
    register("ping", echo)  # a built-in's name: refused, the built-in stays
"""


@pytest.fixture
def command_plugin_env(tmp_path):
    """A pip-installed plugin registering remote commands (its dist-info on PYTHONPATH)."""
    return installed_plugin(tmp_path / "site", "fleet-tools", "fleet_tools", PLUGIN)


def test_a_plugin_registered_command_works(
    tmp_path, running_broker, requester, agent_process, command_plugin_env
):
    table = """
        [sinks.mqtt.commands]
        allow = ["ping", "echo", "slow", "broken"]
        timeout = "1s"
    """
    agent = agent_process(commands_config(tmp_path, running_broker.port, table))
    agent.start(env=command_plugin_env)
    agent.wait_ready(30)
    agent.wait_log(LISTENING, 30)

    echoed = requester.ask("echo", b'{"path": "/var/spool", "n": 3}')
    assert echoed["ok"] is True
    assert echoed["result"] == {"echoed": {"path": "/var/spool", "n": 3}}
    pong = requester.ask("ping")
    assert pong["ok"] is True and "echoed" not in pong["result"], "the built-in ping stays"
    assert "registers remote command 'ping', a built-in command's name" in agent.log()

    late = requester.ask("slow", b'{"seconds": 30}')
    assert late["ok"] is False and late["code"] == "timeout"
    assert "1s" in late["error"]
    # The slow one keeps running in its own thread; the next request is served.
    failed = requester.ask("broken")
    assert failed["ok"] is False and failed["code"] == "failed"
    assert "plugin fleet_tools's command 'broken' raised RuntimeError" in failed["error"]
    assert requester.ask("echo")["result"] == {"echoed": {}}


def docs_acl() -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "commands.md").read_text()
    [block] = [b for b in text.split("```") if b.startswith("\n# /etc/mosquitto/acl")]
    return block


@pytest.fixture
def acl_broker(tmp_path):
    """A Mosquitto with per-device passwords and the ACL of docs/commands.md."""
    passwords = tmp_path / "passwd"
    for index, user in enumerate(("ops", AGENT, "gw-02")):
        command = ["mosquitto_passwd", "-b", *(["-c"] if index == 0 else [])]
        subprocess.run([*command, str(passwords), user, f"{user}-secret"], check=True)
    os.chmod(passwords, 0o644)
    acl = tmp_path / "acl"
    acl.write_text(docs_acl())
    broker = Mosquitto(
        str(tmp_path / "acl-broker"), extra_config=f"password_file {passwords}\nacl_file {acl}"
    )
    broker.write_config()
    with open(broker.config_path) as handle:  # allow_anonymous is global: the last one wins
        text = handle.read().replace("allow_anonymous true\n", "allow_anonymous false\n")
    with open(broker.config_path, "w") as handle:
        handle.write(text)
    broker.write_config = lambda: None
    broker.start()
    yield broker
    broker.stop()


def test_the_docs_acl_lets_operators_command_and_confines_devices(
    tmp_path, acl_broker, agent_process
):
    (tmp_path / "secret").write_text(f"{AGENT}-secret\n")
    table = f"""
        username = "{AGENT}"
        password_file = "{tmp_path / "secret"}"
        [sinks.mqtt.commands]
    """
    agent = started(agent_process, commands_config(tmp_path, acl_broker.port, table))
    agent.wait_log(LISTENING, 30)

    ops = Requester(acl_broker.port, "ops-1", f"reply/{AGENT}/ops-1", "ops", "ops-secret")
    other = Requester(acl_broker.port, "gw-02", f"reply/{AGENT}/gw-02", "gw-02", "gw-02-secret")
    try:
        answer = ops.ask("status")
        assert answer["ok"] is True and answer["result"]["status"]["agent"] == AGENT

        # Another device may not command this one: the broker refuses the request.
        correlation = other.send("ping", requester="gw-02")
        assert other.last_ack.is_failure and other.last_ack.value == 0x87
        # Nor may it read the operator's answers (it never sees the next one).
        other._subscribed.clear()
        other.client.subscribe(f"reply/{AGENT}/ops-1", qos=1)
        wait_for(other._subscribed.is_set, 10, "the other device's SUBACK")
        answered = ops.send("ping", requester="ops-1")
        wait_for(lambda: ops.answers.get(answered), 20, "the operator's answer")
        assert correlation not in other.answers and answered not in other.answers

        # An answer outside the device's own reply/{agent}/... is refused by the broker,
        # and the agent says so.
        ops.send("ping", reply_topic="reply/gw-02/ops-1", requester="ops-1")
        agent.wait_log("the broker refused the answer on reply/gw-02/ops-1", 20)
        assert "command 'ping' from client 'gw-02'" not in agent.log()
    finally:
        ops.close()
        other.close()


def test_commands_that_overrun_are_answered_timeout_then_busy(tmp_path):
    """In process: two handlers that never return hold both places; the third is 'busy'."""
    import tomllib

    from edge_agent import hookimpl
    from edge_agent.commands import MAX_RUNNING, Dispatcher
    from edge_agent.config import parse_config
    from edge_agent.plugin_host import load_plugins
    from edge_agent.runtime import Agent

    release = threading.Event()

    class Stuck:
        @hookimpl
        def register_remote_commands(self, register):
            register("stuck", lambda arguments: release.wait(60))

    host = load_plugins(extra=[(Stuck(), "stuck")])
    data = tomllib.loads(f'[agent]\nid = "gw"\nstate_dir = "{tmp_path / "s"}"\n[[sinks.stdout]]\n')
    agent = Agent(parse_config(data, "test.toml", host), host)
    dispatcher = Dispatcher(agent)
    ask = {"allow": ["stuck", "ping"], "timeout": 0.2, "max_bytes": 100}
    try:
        answers = [dispatcher.answer("stuck", b"", **ask) for _ in range(MAX_RUNNING + 1)]
        assert [a["code"] for a in answers] == ["timeout"] * MAX_RUNNING + ["busy"]
        assert dispatcher.answer("ping", b"", **ask)["code"] == "busy"
    finally:
        release.set()
    wait_for(lambda: dispatcher.answer("ping", b"", **ask)["ok"], 10, "a free place again")
