"""The host source in the real agent: each collector's event at the broker, with the
values the kernel shows elsewhere (/proc, statvfs), collector selection, validation."""

from __future__ import annotations

import glob
import itertools
import os
import subprocess
import sys
from datetime import datetime

import pytest
from conftest import run_cli

from edge_agent.plugins.host import COLLECTORS, HostSource
from edge_agent.testing import SourceHarness, wait_for

pytestmark = pytest.mark.timeout(60)


def host_config(tmp_path, port: int, options: str) -> str:
    return f"""
        [agent]
        id = "test-gw"
        state_dir = "{tmp_path / "state"}"

        [[sources.host]]
        name = "host"
        {options}

        [[sinks.mqtt]]
        name = "cloud"
        port = {port}
        reconnect_min = "0.05s"
        """


def by_type(subscriber) -> dict[str, dict]:
    """The data of the latest event of each type at the broker."""
    return {e["type"]: e["data"] for e in subscriber.events()}


def meminfo(key: str) -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            name, value = line.split(":", 1)
            if name == key:
                number, unit = value.split()
                assert unit == "kB"
                return int(number) * 1024
    raise KeyError(key)


def has_temperatures() -> bool:
    return bool(
        glob.glob("/sys/class/hwmon/hwmon*/temp*_input")
        or glob.glob("/sys/class/thermal/thermal_zone*/temp")
    )


def test_every_collector_sends_sane_values(tmp_path, subscriber, running_broker, agent_process):
    agent = agent_process(
        host_config(tmp_path, running_broker.port, f'filesystems = ["{tmp_path}"]')
    )
    agent.start()
    agent.wait_started()
    expected = {f"host.{name}" for name in COLLECTORS if name not in ("temperature", "fans")}
    if has_temperatures():
        expected.add("host.temperature")
    wait_for(lambda: expected <= set(by_type(subscriber)), 15, f"{sorted(expected)}")
    got = by_type(subscriber)
    assert {e["source"] for e in subscriber.events()} == {"edge-agent://test-gw/host"}

    assert got["host.memory"]["total_bytes"] == meminfo("MemTotal")
    assert 0 < got["host.memory"]["available_bytes"] <= got["host.memory"]["total_bytes"]
    assert got["host.swap"]["total_bytes"] == meminfo("SwapTotal")

    [disk] = got["host.disk"]["filesystems"]
    stat = os.statvfs(tmp_path)
    assert disk["path"] == str(tmp_path)
    assert disk["total_bytes"] == stat.f_blocks * stat.f_frsize
    assert abs(disk["free_bytes"] - stat.f_bavail * stat.f_frsize) < 256 * 1024 * 1024
    assert 0 <= disk["used_percent"] <= 100 and disk["mountpoint"]

    cpu = got["host.cpu"]
    assert 0 <= cpu["percent"] <= 100 and cpu["cores"] == len(cpu["per_core"]) >= 1
    assert cpu["user_seconds"] > 0 and cpu["window_seconds"] > 0
    assert all(0 <= core["percent"] <= 100 for core in cpu["per_core"])

    assert got["host.load"]["load1"] >= 0 and got["host.load"]["cores"] == os.cpu_count()

    with open("/proc/uptime") as handle:
        uptime = float(handle.read().split()[0])
    system = got["host.system"]
    assert abs(system["uptime_seconds"] - uptime) < 30
    assert datetime.fromisoformat(system["boot_time"].replace("Z", "+00:00"))
    assert system["processes"] >= 3  # this test, the broker, the agent

    names = {i["name"] for i in got["host.network"]["interfaces"]}
    assert "lo" in names and names <= set(os.listdir("/sys/class/net")) | {"lo"}
    with open("/proc/diskstats") as handle:
        kernel_disks = {line.split()[2] for line in handle}
    assert {d["name"] for d in got["host.disk_io"]["disks"]} <= kernel_disks

    if not has_temperatures():
        assert "host.temperature" not in got
        assert agent.log().count("no temperature sensors") == 1
    assert agent.terminate() == 0


def test_collectors_selects_the_events_and_interval_paces_them(
    tmp_path, subscriber, running_broker, agent_process
):
    agent = agent_process(
        host_config(
            tmp_path, running_broker.port, 'collectors = ["memory", "load"]\ninterval = "1s"'
        )
    )
    agent.start()
    agent.wait_started()
    wait_for(lambda: len(subscriber.events()) >= 6, 15, "three rounds")
    events = subscriber.events()
    assert {e["type"] for e in events} == {"host.memory", "host.load"}
    times = [
        datetime.fromisoformat(e["time"].replace("Z", "+00:00"))
        for e in events
        if e["type"] == "host.memory"
    ]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(0.5 < gap < 3 for gap in gaps), gaps
    assert agent.terminate() == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ('interval = "0.5s"', "interval: must be at least 1, got 0.5"),
        ('collectors = ["cpu", "gpu"]', "collectors"),
        ("collectors = []", "collectors is empty"),
    ],
)
def test_bad_options_are_config_errors(tmp_path, options, message):
    config = tmp_path / "agent.toml"
    config.write_text(host_config(tmp_path, 1883, options))
    done = run_cli("check", "-c", str(config))
    assert done.returncode == 78, done.stderr
    assert message in done.stderr and "sources.host" in done.stderr


def test_a_filesystem_that_cannot_be_looked_at_is_left_out_with_one_warning(tmp_path, caplog):
    gone = tmp_path / "gone"
    options = {"collectors": ["disk"], "filesystems": [str(gone), str(tmp_path)], "interval": 1}
    with SourceHarness(HostSource, options) as harness:
        harness.wait_for_events(2)
    for event in harness.events[:2]:
        assert [fs["path"] for fs in event.data["filesystems"]] == [str(tmp_path)]
    assert caplog.text.count(f"cannot look at {gone}") == 1


def test_psutil_is_imported_only_when_a_host_source_runs(tmp_path):
    """--version, plugins and check stay fast: psutil is not imported by them."""
    config = tmp_path / "agent.toml"
    config.write_text(host_config(tmp_path, 1883, "") + "\n[[sources.journald]]\n")
    for args in (["--version"], ["plugins"], ["check", "-c", str(config)]):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "edge_agent", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
        assert "psutil" not in imported, args
        assert "pika" not in imported, args  # nor the AMQP sink's library (about 3 MiB)
