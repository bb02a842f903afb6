"""A fleet on one machine: a hundred real agents against a three-node RabbitMQ cluster.

The script starts a RabbitMQ cluster of its own (three nodes with their own
node names, ports and data folders, the ``rabbitmq_mqtt`` plugin on, started
through ``RABBITMQ_*`` variables; the installed service and its ports are
left alone), one user per device with the topic permissions docs/fleet.md
shows, and a durable quorum queue bound to ``amq.topic`` with ``edge.#``.
Then N agents (real ``edge-agent run`` processes, each with a state folder of
its own), each with an ``exec`` source printing serial numbers and an MQTT
sink (MQTT 3.1.1: RabbitMQ 3.10 speaks no MQTT 5) to the cluster's nodes, in
a rotated order, through one counting TCP proxy per node: the proxies note
every connection attempt, also while a node is down. A consumer reads the
quorum queue over AMQP (pika) and counts per agent.

With ``--sink amqp`` each agent has the ``amqp`` sink instead (publisher
confirms) to the same nodes' AMQP listeners, through counting proxies too,
with the same user: it publishes into ``amq.topic`` with the routing key the
MQTT plugin makes of the MQTT topic (``edge.{agent}.{source}.{type}``), so
the same quorum queue and consumer count both. ``--sink both`` runs every
scenario once per sink, each against a fresh cluster, and prints one table
with a column per sink.

Scenarios, in order: steady load; one node killed (SIGKILL) and started
again; the whole cluster killed for ``--outage`` seconds (2 minutes by
default) while the agents buffer, then started again: connection attempts per
second at the proxies, and the time until every backlog has drained. The
sink options of the ``drain`` work (``reconnect_jitter``, ``max_rate``) are
used only where the installed agent has them: the outage then runs once per
variant. At the end the serial numbers stop, and the accounting says whether
every event arrived, which arrived twice (with their ids, and whether after a
fault), and whether any agent's ``sequence`` has a gap.

    .venv/bin/python bench/fleet.py                       # 100 agents, a 2-minute outage
    .venv/bin/python bench/fleet.py --agents 20 --outage 20 --steady 20   # a trial run
    .venv/bin/python bench/fleet.py --json fleet.json
    .venv/bin/python bench/fleet.py --sink both --agents 30 --steady 30 --node-outage 20 --outage 60

Every port is loopback. Only the processes the script started are stopped.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.common import (  # noqa: E402
    AgentProcess,
    Row,
    add_output_arguments,
    agent_command,
    agent_toml,
    machine,
    plugin_table,
    print_machine,
    workdir,
    write_results,
)
from edge_agent.testing import CuttableProxy, free_port, wait_for  # noqa: E402

QUEUE = "fleet-events"
COOKIE = "EDGEAGENTFLEETBENCHCOOKIE"
#: The topic permissions of docs/fleet.md ("RabbitMQ (MQTT plugin)").
SUBSCRIPTION_QUEUES = "^mqtt-subscription-.*"
EXCHANGE_OR_QUEUES = "^(amq\\.topic|mqtt-subscription-.*)$"


def rabbitmq_sbin() -> str | None:
    """The folder of RabbitMQ's own scripts (not Debian's wrapper, which switches user)."""
    found = shutil.which("rabbitmq-server")
    if found is None:
        return None
    base = "/usr/lib/rabbitmq/lib"
    if os.path.isdir(base):
        for name in sorted(os.listdir(base), reverse=True):
            sbin = os.path.join(base, name, "sbin")
            if os.path.exists(os.path.join(sbin, "rabbitmq-server")):
                return sbin
    return os.path.dirname(os.path.realpath(found))


def children(pid: int) -> list[int]:
    """Every descendant of ``pid``."""
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    kids = [int(k) for k in handle.read().split()]
                found += kids
                todo += kids
    return found


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def cpu_of(pids: list[int]) -> float:
    """User plus system CPU seconds of these processes so far (0 for those gone)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def memory_of(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB, from /proc/PID/smaps_rollup."""
    values = {"Rss": 0.0, "Pss": 0.0}
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0]) / 1024
    return values["Rss"], values["Pss"]


# -- the cluster -----------------------------------------------------------------------


class RabbitNode:
    """One RabbitMQ node of the cluster, started from RABBITMQ_* variables."""

    def __init__(self, cluster: RabbitCluster, index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"edgefleet{index}@localhost"
        self.folder = os.path.join(cluster.folder, f"node{index}")
        self.amqp_port = free_port()
        self.mqtt_port = free_port()
        self.dist_port = free_port()
        self.process: subprocess.Popen | None = None
        os.makedirs(self.folder, exist_ok=True)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOME=self.cluster.folder,  # its .erlang.cookie: the nodes' and rabbitmqctl's
            RABBITMQ_CONF_ENV_FILE=os.path.join(self.folder, "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONFIG_FILE=os.path.join(self.folder, "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(self.folder, "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=os.path.join(self.folder, "mnesia"),
            RABBITMQ_LOG_BASE=os.path.join(self.folder, "log"),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def write_config(self) -> None:
        peers = "".join(
            f"cluster_formation.classic_config.nodes.{n.index} = {n.name}\n"
            for n in self.cluster.nodes
        )
        with open(os.path.join(self.folder, "rabbitmq.conf"), "w") as handle:
            handle.write(
                f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
                f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}\n"
                "mqtt.allow_anonymous = false\n"
                "loopback_users = none\n"
                "cluster_formation.peer_discovery_backend = classic_config\n" + peers
            )
        with open(os.path.join(self.folder, "enabled_plugins"), "w") as handle:
            handle.write("[rabbitmq_mqtt].\n")
        open(os.path.join(self.folder, "rabbitmq-env.conf"), "w").close()

    def start(self) -> None:
        self.write_config()
        log = open(os.path.join(self.folder, "server.out"), "a")  # noqa: SIM115
        self.process = subprocess.Popen(
            [os.path.join(self.cluster.sbin, "rabbitmq-server")],
            env=self.env(),
            cwd=self.folder,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def beam(self) -> list[int]:
        """The node's Erlang VM (and whatever else runs under our launcher)."""
        if self.process is None or self.process.poll() is not None:
            return []
        return [self.process.pid, *children(self.process.pid)]

    def listening(self) -> bool:
        for port in (self.amqp_port, self.mqtt_port):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    pass
            except OSError:
                return False
        return True

    def kill(self) -> None:
        """SIGKILL the node's processes (ours only: the launcher's process group)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        self.process = None

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [os.path.join(self.cluster.sbin, "rabbitmqctl"), "-n", self.name, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self) -> None:
        """rabbitmqctl stop, then SIGKILL what is left of ours."""
        if self.process is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.ctl("stop", timeout=60)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)
        self.kill()


class RabbitCluster:
    """Three RabbitMQ nodes in a cluster of their own, in ``folder``."""

    def __init__(self, folder: str, size: int = 3) -> None:
        self.folder = folder
        self.sbin = rabbitmq_sbin()
        if self.sbin is None:
            raise RuntimeError("rabbitmq-server is not installed (Debian: rabbitmq-server)")
        cookie = os.path.join(folder, ".erlang.cookie")
        with open(cookie, "w") as handle:
            handle.write(COOKIE)
        os.chmod(cookie, 0o400)
        self.nodes: list[RabbitNode] = []
        self.nodes = [RabbitNode(self, i) for i in range(1, size + 1)]

    def start(self, nodes: list[RabbitNode] | None = None, timeout: float = 300) -> float:
        """Start the nodes (all by default) at once; the seconds until each listens."""
        nodes = nodes or self.nodes
        began = time.monotonic()
        for node in nodes:
            node.start()

        def up() -> bool:
            for node in nodes:
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(f"RabbitMQ node {node.name} exited; see {node.folder}")
            return all(node.listening() for node in nodes)

        wait_for(up, timeout, "the RabbitMQ nodes to listen")
        return time.monotonic() - began

    def wait_clustered(self, timeout: float = 300) -> None:
        def clustered() -> bool:
            out = self.nodes[0].ctl("cluster_status", "--formatter", "json", timeout=60)
            if out.returncode != 0:
                return False
            return len(json.loads(out.stdout).get("running_nodes", [])) == len(self.nodes)

        wait_for(clustered, timeout, "all RabbitMQ nodes running in one cluster")

    def pids(self) -> list[int]:
        return [pid for node in self.nodes for pid in node.beam()]

    def stop(self) -> None:
        threads = [threading.Thread(target=node.stop) for node in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for node in self.nodes:
            node.kill()


def password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def device_definitions(names: list[str]) -> dict[str, Any]:
    """One user per device with docs/fleet.md's permissions, for ``import_definitions``."""
    users, permissions, topics = [], [], []
    for name in names:
        users.append(
            {
                "name": name,
                "password_hash": password_hash(f"pw-{name}"),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
        )
        permissions.append(
            {
                "user": name,
                "vhost": "/",
                "configure": SUBSCRIPTION_QUEUES,
                "write": EXCHANGE_OR_QUEUES,
                "read": EXCHANGE_OR_QUEUES,
            }
        )
        topics.append(
            {
                "user": name,
                "vhost": "/",
                "exchange": "amq.topic",
                "write": "^edge\\.{username}\\.",
                "read": "^edge\\.{username}\\.cmd\\.",
            }
        )
    return {"users": users, "permissions": permissions, "topic_permissions": topics}


# -- what arrives ----------------------------------------------------------------------


class CountingProxy(CuttableProxy):
    """A CuttableProxy that notes the time of every connection attempt, also those it
    cannot pass on because the node behind it is down."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.attempts: list[float] = []
        self.down = False

    def _handle(self, client: socket.socket) -> None:
        self.attempts.append(time.monotonic())
        if self.down:  # a broker that is not there: the connection ends at once
            client.close()
            return
        super()._handle(client)

    def go_down(self) -> None:
        """From now on the node is unreachable: connections end, attempts are counted."""
        self.down = True
        self.cut()
        self.restore()

    def come_back(self) -> None:
        self.down = False


@dataclasses.dataclass
class Seen:
    """What the consumer got from one agent."""

    serials: set[int] = dataclasses.field(default_factory=set)
    sequences: set[int] = dataclasses.field(default_factory=set)
    ids: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    duplicates: list[tuple[str, float, bool]] = dataclasses.field(default_factory=list)


class Consumer:
    """Reads the quorum queue over AMQP (pika), from any node that is up; counts per agent."""

    def __init__(self, cluster: RabbitCluster) -> None:
        self.cluster = cluster
        self.lock = threading.Lock()
        self.agents: dict[str, Seen] = collections.defaultdict(Seen)
        self.arrivals: list[float] = []
        self.total = 0
        self.redelivered = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="consumer", daemon=True)

    def start(self) -> Consumer:
        self.thread.start()
        return self

    def _run(self) -> None:
        import pika

        turn = 0
        while not self.stopping.is_set():
            node = self.cluster.nodes[turn % len(self.cluster.nodes)]
            turn += 1
            params = pika.ConnectionParameters(
                "127.0.0.1", node.amqp_port, heartbeat=10, blocked_connection_timeout=30
            )
            try:
                connection = pika.BlockingConnection(params)
                channel = connection.channel()
                channel.basic_qos(prefetch_count=2000)
                for method, _properties, body in channel.consume(QUEUE, inactivity_timeout=0.5):
                    if self.stopping.is_set():
                        break
                    if method is None:
                        continue
                    self._note(body, method.redelivered)
                    channel.basic_ack(method.delivery_tag)
                with contextlib.suppress(Exception):
                    connection.close()
            except Exception:  # a node that is down or went away: the next one
                time.sleep(0.5)

    def _note(self, body: bytes, redelivered: bool) -> None:
        event = json.loads(body)
        agent = event["source"].split("/")[2]
        now = time.monotonic()
        with self.lock:
            seen = self.agents[agent]
            self.total += 1
            self.arrivals.append(now)
            self.redelivered += redelivered
            seen.ids[event["id"]] += 1
            if seen.ids[event["id"]] > 1:
                seen.duplicates.append((event["id"], now, redelivered))
            seen.sequences.add(int(event["sequence"]))
            output = event.get("data", {}).get("output")
            with contextlib.suppress(TypeError, ValueError):
                seen.serials.add(int(str(output).strip()))

    def count_between(self, start: float, end: float) -> int:
        with self.lock:
            return sum(1 for t in self.arrivals if start <= t < end)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)


# -- the fleet -------------------------------------------------------------------------


#: Serial numbers from 1 on, carried on across restarts of the agent (the file ``last``).
GENERATOR = (
    'i=$(cat last 2>/dev/null || echo 0); while [ ! -e STOP ]; do i=$((i+1)); echo "$i";'
    ' echo "$i" > last.new; mv last.new last; sleep {pause}; done; exec sleep 1000000'
)


class Device:
    """One agent process and its serial number generator."""

    def __init__(
        self, folder: str, name: str, ports: list[int], args: Any, extra: dict, sink: str = "mqtt"
    ) -> None:
        self.name = name
        self.folder = os.path.join(folder, name)
        os.makedirs(self.folder, exist_ok=True)
        source = plugin_table(
            "sources.exec",
            name="serial",
            mode="stream",
            command=GENERATOR.format(pause=1 / args.rate),
            shell=True,
            cwd=self.folder,
        )
        if sink == "amqp":
            # amq.topic, with the routing key RabbitMQ's MQTT plugin makes of the MQTT
            # topic ("/" becomes "."): the same binding, permissions and consumer.
            table = plugin_table(
                "sinks.amqp",
                name="cloud",
                url=f"amqp://{name}:pw-{name}@127.0.0.1:{ports[0]}/%2F",
                hosts=[f"127.0.0.1:{port}" for port in ports],
                exchange="amq.topic",
                declare_exchange=False,
                routing_key="edge.{agent}.{source}.{type}",
                reconnect_min="1s",
                reconnect_max=args.reconnect_max,
                **extra,
            )
        else:
            table = plugin_table(
                "sinks.mqtt",
                name="cloud",
                hosts=[f"127.0.0.1:{port}" for port in ports],
                protocol="3.1.1",
                qos=1,
                client_id=name,
                username=name,
                password=f"pw-{name}",
                topic="edge/{agent}/{source}/{type}",
                reconnect_min="1s",
                reconnect_max=args.reconnect_max,
                **extra,
            )
        config = agent_toml(name, os.path.join(self.folder, "state"), source + table)
        config = config.replace('shutdown_grace = "2s"', 'shutdown_grace = "5s"')
        self.agent = AgentProcess(self.folder, config)

    def set_sink(self, extra: dict) -> None:
        """Rewrite the sink's drain options (the agent reads them at its next start)."""
        with open(self.agent.config_path) as handle:
            lines = [
                line
                for line in handle.read().splitlines()
                if line.split(" = ")[0] not in ("reconnect_jitter", "max_rate", "max_bytes_rate")
            ]
        lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
        with open(self.agent.config_path, "w") as handle:
            handle.write("\n".join(lines) + "\n")

    def queued(self) -> int:
        path = os.path.join(self.folder, "state", "queue.db")
        try:
            import sqlite3

            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                db.execute("PRAGMA busy_timeout = 2000")
                return db.execute("SELECT count(*) FROM events").fetchone()[0]
        except Exception:
            return -1

    def last_serial(self) -> int:
        try:
            with open(os.path.join(self.folder, "last")) as handle:
                return int(handle.read().strip() or 0)
        except (OSError, ValueError):
            return 0


def stop_agents(devices: list[Device]) -> None:
    """SIGTERM every agent at once, then wait for each (SIGKILL after 30 s)."""
    for device in devices:
        process = device.agent.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for device in devices:
        with contextlib.suppress(Exception):
            device.agent.stop()


def sink_options(sink: str = "mqtt") -> set[str]:
    """The sink's options the installed agent knows (the drain options may be missing)."""
    from edge_agent.plugin_host import load_plugins

    known = {f.name for f in dataclasses.fields(load_plugins().sinks[sink].cls.Config)}
    try:  # the options the agent handles for every sink
        from edge_agent.drain import DRAIN_KEYS
    except ImportError:
        return known
    return known | set(DRAIN_KEYS)


def attempts_per_second(proxies: list[CountingProxy], start: float, end: float) -> list[int]:
    counts = [0] * max(1, int(end - start) + 1)
    for proxy in proxies:
        for t in proxy.attempts:
            if start <= t < end:
                counts[int(t - start)] += 1
    return counts


def wait_drained(devices: list[Device], threshold: int, timeout: float) -> float | None:
    """Seconds until every agent's queue holds at most ``threshold`` events; None at timeout."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if all(0 <= d.queued() <= threshold for d in devices):
            return time.monotonic() - began
        time.sleep(1)
    return None


def load() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def run(
    args: argparse.Namespace, folder: str, sink: str = "mqtt"
) -> tuple[list[Row], dict[str, Any]]:
    rows: list[Row] = []
    notes: dict[str, Any] = {"faults": []}
    known = sink_options(sink)
    variants: list[tuple[str, dict]] = []
    jitter = "reconnect_jitter" in known
    rate = "max_rate" in known
    if jitter:
        variants.append(("jitter on", {"reconnect_jitter": True}))
        variants.append(("jitter off", {"reconnect_jitter": False}))
    elif sink == "amqp":  # full jitter always: it has no switch
        variants.append(("full jitter, always on", {}))
    else:
        variants.append(("the agent's own backoff", {}))
    if rate:
        variants.append(
            (f"max_rate {args.max_rate}/s", {"reconnect_jitter": True, "max_rate": args.max_rate})
            if jitter
            else (f"max_rate {args.max_rate}/s", {"max_rate": args.max_rate})
        )
    if (not jitter and sink == "mqtt") or not rate:
        missing = [n for n, ok in (("reconnect_jitter", jitter), ("max_rate", rate)) if not ok]
        print(f"this agent has no {', '.join(missing)} (branch drain): those runs are left out")

    cluster = RabbitCluster(folder)
    devices: list[Device] = []
    proxies: list[CountingProxy] = []
    consumer: Consumer | None = None
    try:
        print(f"starting a RabbitMQ cluster of {len(cluster.nodes)} nodes ...", flush=True)
        took = cluster.start()
        cluster.wait_clustered()
        print(f"  listening after {took:.0f}s; clustered; load {load()}", flush=True)
        names = [f"gw-{i:03d}" for i in range(args.agents)]
        definitions = os.path.join(folder, "devices.json")
        with open(definitions, "w") as handle:
            json.dump(device_definitions([*names, "gw-rogue"]), handle)
        imported = cluster.nodes[0].ctl("import_definitions", definitions)
        if imported.returncode != 0:
            raise RuntimeError(f"import_definitions failed: {imported.stderr}")
        import pika

        with contextlib.closing(
            pika.BlockingConnection(
                pika.ConnectionParameters("127.0.0.1", cluster.nodes[0].amqp_port)
            )
        ) as connection:
            channel = connection.channel()
            channel.queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_bind(QUEUE, "amq.topic", routing_key="edge.#")
        consumer = Consumer(cluster).start()
        proxies = [
            CountingProxy(node.amqp_port if sink == "amqp" else node.mqtt_port).start()
            for node in cluster.nodes
        ]
        ports = [p.port for p in proxies]
        first = variants[0][1]
        for i, name in enumerate(names):
            turn = i % len(ports)
            devices.append(Device(folder, name, ports[turn:] + ports[:turn], args, first, sink))

        print(f"starting {len(devices)} agents ...", flush=True)
        began = time.monotonic()
        for device in devices:
            device.agent.start()
        for device in devices:
            device.agent.wait_ready(timeout=600)
        for device in devices:
            device.agent.wait(
                lambda d=device: "connected to" in d.agent.log(), 600, f"{device.name} to connect"
            )
        started = time.monotonic() - began
        print(f"  all ready and connected after {started:.0f}s; load {load()}", flush=True)
        rows.append(Row("agents started, ready and connected", f"{started:.0f} s", values={}))

        # -- steady load
        settle = time.monotonic()
        time.sleep(min(10, args.steady))  # let the start-up backlog go first
        cpu0, t0 = cpu_of(cluster.pids()), time.monotonic()
        agent_cpu0 = cpu_of([d.agent.pid for d in devices])
        time.sleep(args.steady)
        t1 = time.monotonic()
        broker_cpu = (cpu_of(cluster.pids()) - cpu0) / (t1 - t0)
        agent_cpu = (cpu_of([d.agent.pid for d in devices]) - agent_cpu0) / (t1 - t0)
        delivered = consumer.count_between(t0, t1) / (t1 - t0)
        offered = args.agents * args.rate
        print(f"steady: {delivered:.0f} events/s delivered of {offered:.0f} offered", flush=True)
        rows.append(
            Row(
                "steady load: events/s delivered (all agents)",
                f"{delivered:,.0f}",
                beside=f"offered {offered:,.0f}/s ({args.agents} x {args.rate:g}/s)",
                values={"delivered": delivered, "offered": offered, "seconds": t1 - t0},
            )
        )
        rows.append(
            Row(
                "steady load: broker CPU (3 nodes)",
                f"{broker_cpu * 100:.0f} % of a core",
                beside=f"agents: {agent_cpu * 100:.0f} % of a core in all; load {load()}",
                values={"broker_cores": broker_cpu, "agent_cores": agent_cpu},
            )
        )
        memory = [memory_of(d.agent.pid) for d in devices]
        rss = statistics.median(m[0] for m in memory)
        pss = statistics.median(m[1] for m in memory)
        rows.append(
            Row(
                "memory per agent (median RSS / PSS)",
                f"{rss:.1f} / {pss:.1f} MiB",
                beside=f"{1024 / rss:.0f} agents per GiB by RSS, {1024 / pss:.0f} by PSS",
                values={"rss_mib": rss, "pss_mib": pss, "max_rss_mib": max(m[0] for m in memory)},
            )
        )
        del settle

        if args.rogue > 0:
            rows.append(rogue_device(folder, ports, args, consumer, sink))

        threshold = max(2, int(args.rate * 2))
        # -- one node killed and started again
        victim = cluster.nodes[1]
        print(f"killing node {victim.name} for {args.node_outage:g}s ...", flush=True)
        fault = time.monotonic()
        victim.kill()
        time.sleep(args.node_outage)
        waiting = sum(max(0, d.queued()) for d in devices)
        back = cluster.start([victim])
        cluster.wait_clustered()
        drained = wait_drained(devices, threshold, args.drain_timeout)
        end = time.monotonic()
        notes["faults"].append((fault, end))
        peak = max(attempts_per_second(proxies, fault, end))
        text = "not within the timeout" if drained is None else f"{drained:.0f} s"
        print(f"  node back after {back:.0f}s; backlogs drained {text}", flush=True)
        rows.append(
            Row(
                f"one node killed for {args.node_outage:g} s: backlogs drained after it is back",
                text,
                beside=f"{waiting} events queued in all at the end of the outage; peak {peak}"
                " connection attempts/s at the brokers",
                values={
                    "drain_s": drained,
                    "peak_attempts": peak,
                    "restart_s": back,
                    "queued": waiting,
                },
            )
        )

        # -- the whole cluster down
        for label, extra in variants:
            if extra != first:
                print(f"restarting the agents with {extra} ...", flush=True)
                stop_agents(devices)
                for device in devices:
                    device.set_sink(extra)
                for device in devices:
                    device.agent.start()
                for device in devices:
                    device.agent.wait_ready(timeout=600)
                wait_drained(devices, threshold, args.drain_timeout)
                first = extra
            how = {"kill": "killed", "stop": "stopped", "cut": "cut off"}[args.outage_mode]
            print(f"whole cluster {how} for {args.outage:g}s ({label}) ...", flush=True)
            fault = time.monotonic()
            if args.outage_mode == "cut":
                for proxy in proxies:
                    proxy.go_down()
            elif args.outage_mode == "kill":
                for node in cluster.nodes:
                    node.kill()
            else:
                cluster.stop()
            time.sleep(max(0.0, args.outage - (time.monotonic() - fault)))
            if args.outage_mode == "cut":
                took = 0.0
                for proxy in proxies:
                    proxy.come_back()
            else:
                took = cluster.start()
                cluster.wait_clustered(args.drain_timeout)
            listening = time.monotonic()
            backlog = sum(max(0, d.queued()) for d in devices)
            drained = wait_drained(devices, threshold, args.drain_timeout)
            end = time.monotonic()
            notes["faults"].append((fault, end))
            during = attempts_per_second(proxies, fault, listening)
            after = attempts_per_second(proxies, listening, end)
            rate_during = sum(during) / max(1, len(during))
            drain_text = "not within the timeout" if drained is None else f"{drained:.0f} s"
            print(
                f"  backlog {backlog:,}; cluster listening after {took:.0f}s; drained"
                f" {drain_text}; attempts/s while down {rate_during:.1f} (peak {max(during)}),"
                f" after: peak {max(after)}",
                flush=True,
            )
            rows.append(
                Row(
                    f"cluster {how} for {args.outage:g} s ({label}): connection attempts/s",
                    f"{rate_during:.1f} mean, {max(during)} peak until it listens again;"
                    f" {max(after)} peak once back",
                    beside=f"{args.agents} agents, reconnect_min 1s, reconnect_max"
                    f" {args.reconnect_max}",
                    values={"during": during, "after": after},
                )
            )
            rows.append(
                Row(
                    f"cluster {how} for {args.outage:g} s ({label}): backlog drained",
                    drain_text,
                    beside=f"{backlog:,} events buffered when it listened again,"
                    f" {took:.0f} s after the restart began",
                    values={"drain_s": drained, "backlog": backlog, "restart_s": took},
                )
            )

        # -- the accounting
        print("stopping the serial numbers; accounting ...", flush=True)
        for device in devices:
            open(os.path.join(device.folder, "STOP"), "w").close()
        time.sleep(2 / args.rate + 1)
        last = {d.name: d.last_serial() for d in devices}

        def complete() -> bool:
            with consumer.lock:
                return all(
                    len(consumer.agents[name].serials) >= last[name] for name in last
                ) and all(d.queued() == 0 for d in devices)

        with contextlib.suppress(AssertionError):
            wait_for(complete, args.drain_timeout, "every serial number at the consumer")
        time.sleep(2)
        rows += account(consumer, last, notes["faults"])
    finally:
        stop_agents(devices)
        if consumer is not None:
            consumer.stop()
        for proxy in proxies:
            proxy.stop()
        cluster.stop()
    return rows, notes


def rogue_device(
    folder: str, ports: list[int], args: Any, consumer: Consumer, sink: str = "mqtt"
) -> Row:
    """An agent with its own user that publishes into another device's topics: what the
    broker and the agent make of it (MQTT 3.1.1, or AMQP with publisher confirms)."""
    rogue = Device(folder, "gw-rogue", ports, args, {}, sink)
    with open(rogue.agent.config_path) as handle:
        text = (
            handle.read()
            .replace("edge/{agent}/{source}/{type}", "edge/gw-000/{source}/{type}")
            .replace("edge.{agent}.{source}.{type}", "edge.gw-000.{source}.{type}")
        )
    with open(rogue.agent.config_path, "w") as handle:
        handle.write(text)
    print(f"a device writing into another's topics, for {args.rogue:g}s ...", flush=True)
    rogue.agent.start()
    try:
        rogue.agent.wait_ready(timeout=300)
        time.sleep(args.rogue)
    finally:
        stop_agents([rogue])
    log = rogue.agent.log()
    refused = sum("refused" in line.lower() for line in log.splitlines())
    lost = sum("connection lost" in line or ": lost " in line for line in log.splitlines())
    connects = sum("connected to" in line for line in log.splitlines())
    dead = subprocess.run(
        [*agent_command(), "queue", "dead", "list", "-c", rogue.agent.config_path, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        listed = json.loads(dead.stdout)
        if isinstance(listed, dict):
            listed = next((v for v in listed.values() if isinstance(v, list)), [])
        set_aside = len(listed)
    except ValueError:
        set_aside = -1
    with consumer.lock:
        arrived = len(consumer.agents["gw-rogue"].ids)
    made = rogue.last_serial()
    print(
        f"  {made} events made, {arrived} arrived, {connects} connections made, {lost} lost,"
        f" {refused} refusals,"
        f" {set_aside} dead letters, {rogue.queued()} still queued",
        flush=True,
    )
    for line in [ln for ln in log.splitlines() if "refused" in ln.lower() or "lost" in ln][:3]:
        print(f"    {line[:200]}")
    return Row(
        "a device publishing into another's topics"
        + (" (AMQP, confirms)" if sink == "amqp" else " (3.1.1)"),
        f"{arrived} of {made} arrived",
        beside=f"{connects} connections made in {args.rogue:g} s, {lost} logged as lost;"
        f" {refused} lines saying refused; {set_aside} set aside, {rogue.queued()} kept queued",
        met=arrived == 0,
        values={
            "made": made,
            "arrived": arrived,
            "refusal_lines": refused,
            "lost": lost,
            "connects": connects,
            "log": [ln for ln in log.splitlines() if "refused" in ln.lower()][:3],
        },
    )


def account(consumer: Consumer, last: dict[str, int], faults: list[tuple]) -> list[Row]:
    missing: dict[str, list[int]] = {}
    gaps: dict[str, list[int]] = {}
    duplicates: list[tuple[str, str, bool, bool]] = []
    made = sum(last.values())
    with consumer.lock:
        for name, top in last.items():
            seen = consumer.agents[name]
            lost = sorted(set(range(1, top + 1)) - seen.serials)
            if lost:
                missing[name] = lost
            if seen.sequences:
                hole = sorted(set(range(1, max(seen.sequences) + 1)) - seen.sequences)
                if hole:
                    gaps[name] = hole
            for event_id, at, redelivered in seen.duplicates:
                after_fault = any(start <= at <= end + 5 for start, end in faults)
                duplicates.append((name, event_id, after_fault, redelivered))
        total = consumer.total
    outside = [d for d in duplicates if not d[2]]
    resent = [d for d in duplicates if not d[3]]  # sent twice by an agent, not by the queue
    with consumer.lock:
        distinct = sum(len(consumer.agents[name].ids) for name in last)
    print(
        f"  {made:,} events made, {total:,} messages received ({distinct:,} distinct),"
        f" {len(duplicates)} duplicates"
    )
    for name, event_id, after_fault, redelivered in duplicates[:10]:
        where = "after a fault" if after_fault else "OUTSIDE any fault"
        print(f"    duplicate {name} {event_id} ({where}; redelivered by the queue: {redelivered})")
    for name, lost in list(missing.items())[:10]:
        print(f"    missing {name}: {len(lost)} serials, first {lost[:5]}")
    for name, hole in list(gaps.items())[:10]:
        print(f"    sequence gap {name}: {hole[:5]}")
    return [
        Row(
            "accounting: every event delivered",
            "yes" if not missing else f"NO: {sum(map(len, missing.values()))} missing",
            beside=f"{made:,} made, {distinct:,} distinct events received ({total:,} messages)",
            met=not missing,
            values={"made": made, "received": total, "missing": missing},
        ),
        Row(
            "accounting: duplicates (all after a fault?)",
            f"{len(duplicates)} ({len(duplicates) - len(outside)} after a fault;"
            f" {len(resent)} re-sent by an agent, {len(duplicates) - len(resent)} redelivered"
            " by the queue)",
            beside="ids: " + ", ".join(d[1] for d in duplicates[:3]) if duplicates else "",
            met=not outside,
            values={"duplicates": duplicates},
        ),
        Row(
            "accounting: per-agent sequence without gaps",
            "yes" if not gaps else f"NO: {len(gaps)} agents with gaps",
            met=not gaps,
            values={"gaps": gaps},
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=100, help="agents (default 100)")
    parser.add_argument("--rate", type=float, default=2.0, help="events/s per agent (default 2)")
    parser.add_argument("--steady", type=float, default=60, help="steady load seconds (60)")
    parser.add_argument("--node-outage", type=float, default=30, help="one node down, s (30)")
    parser.add_argument("--outage", type=float, default=120, help="whole cluster down, s (120)")
    parser.add_argument(
        "--outage-mode",
        choices=["stop", "kill", "cut"],
        default="kill",
        help="the whole cluster down: SIGKILL (default), rabbitmqctl stop, or cut at the proxies",
    )
    parser.add_argument(
        "--rogue", type=float, default=45, help="seconds of the rogue device; 0: none (45)"
    )
    parser.add_argument("--max-rate", type=float, default=5, help="max_rate variant (5/s)")
    parser.add_argument("--reconnect-max", default="60s", help='sinks\' reconnect_max ("60s")')
    parser.add_argument(
        "--sink",
        choices=["mqtt", "amqp", "both"],
        default="mqtt",
        help="the agents' sink: MQTT 3.1.1 (default), AMQP with publisher confirms, or both"
        " (one run each, one table)",
    )
    parser.add_argument("--drain-timeout", type=float, default=900, help="per drain, s (900)")
    add_output_arguments(parser)
    args = parser.parse_args()
    info = machine()
    print_machine(info)
    print(f"command: {' '.join(sys.argv)}")
    started = time.monotonic()
    sinks = ["mqtt", "amqp"] if args.sink == "both" else [args.sink]
    results: dict[str, list[Row]] = {}
    with workdir("fleet", args.dir, args.keep) as folder:
        for sink in sinks:
            print(f"== the agents' sink: {SINK_TITLES[sink]}", flush=True)
            place = os.path.join(folder, sink)
            os.makedirs(place, exist_ok=True)
            results[sink], _ = run(args, place, sink)
    print()
    print(f"RabbitMQ 3-node cluster; {args.agents} agents; sink: {args.sink};")
    print(f"{time.monotonic() - started:.0f} s in all; load at the end {load()}")
    print()
    rows = [r for sink in sinks for r in results[sink]]
    if len(sinks) == 1:
        print("| what | measured | beside it |")
        print("| --- | --- | --- |")
        for row in rows:
            print(f"| {row.what} | {row.agent} | {row.beside} |")
    else:
        print_side_by_side(results)
        for sink in sinks:
            for row in results[sink]:
                row.what = f"[{sink}] {row.what}"
    write_results(args.json, "fleet.py", rows, info)
    return 0 if all(r.met is not False for r in rows) else 1


SINK_TITLES = {"mqtt": "MQTT 3.1.1 (QoS 1)", "amqp": "AMQP 0-9-1 (publisher confirms)"}


def row_key(what: str) -> str:
    """The same measurement under both sinks: AMQP's jitter (always full) beside MQTT's
    ``reconnect_jitter = true``, the rogue device's row without its sink's name."""
    return (
        what.replace("(full jitter, always on)", "(jitter on)")
        .replace(" (AMQP, confirms)", "")
        .replace(" (3.1.1)", "")
    )


def print_side_by_side(results: dict[str, list[Row]]) -> None:
    """One table, a column per sink; a cell holds the figure, then what it is beside."""
    keys: list[str] = []
    cells: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for sink, rows in results.items():
        for row in rows:
            key = row_key(row.what)
            if key not in keys:
                keys.append(key)
            cells[key][sink] = row.agent + (f" ({row.beside})" if row.beside else "")
    print("| what | " + " | ".join(SINK_TITLES[s] for s in results) + " |")
    print("| --- |" + " --- |" * len(results))
    for key in keys:
        print(f"| {key} | " + " | ".join(cells[key].get(s, "-") for s in results) + " |")


if __name__ == "__main__":
    sys.exit(main())
