"""The ``host`` source: how the device itself is doing, as events every ``interval``.

Like Telegraf's cpu/mem/disk/net inputs or Vector's ``host_metrics``: each
selected collector sends one event per interval (``host.cpu``,
``host.memory``...), values in base units with the unit in the key
(``total_bytes``, ``user_seconds``, ``current_celsius``). It reads through
psutil, imported only when a host source is configured, so that ``edge-agent
--version``, ``check`` and ``plugins`` do not pay for it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from edge_agent import Duration, Source, hookimpl, option

COLLECTORS = (
    "cpu",
    "load",
    "memory",
    "swap",
    "disk",
    "disk_io",
    "network",
    "temperature",
    "fans",
    "system",
)
Collector = Literal[
    "cpu", "load", "memory", "swap", "disk", "disk_io", "network", "temperature", "fans", "system"
]
#: Block devices left out of disk_io: they are memory or files, not disks.
NOT_DISKS = ("loop", "ram")
CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _percent(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 2) if whole > 0 else 0.0


class HostSource(Source):
    """Emits ``host.<collector>`` for each selected collector every ``interval``."""

    @dataclass(kw_only=True)
    class Config:
        interval: Duration = option(
            60.0, min=1, doc="Time between two rounds of events (at least 1 s)."
        )
        collectors: list[Collector] = option(
            list(COLLECTORS),
            doc="Which to send: " + ", ".join(COLLECTORS) + " (default: all of them).",
        )
        filesystems: list[str] = option(
            [],
            doc="Paths whose filesystems the disk collector reports, whatever their type;"
            " empty: every real (device-backed) filesystem.",
        )

        def __post_init__(self) -> None:
            if not self.collectors:
                raise ValueError(
                    "collectors is empty: name at least one of " + ", ".join(COLLECTORS)
                )

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        try:
            import psutil
        except ImportError:
            raise RuntimeError(
                f"source {self.name}: the host source needs psutil, which is not installed:"
                " pip install psutil (in the agent's environment)"
            ) from None
        self.psutil = psutil
        self._cpu_before: tuple[float, Any, list[Any]] | None = None
        self._said: set[str] = set()

    def run(self) -> None:
        failing_since: float | None = None
        next_round = time.monotonic()
        while not self.stopping.is_set():
            events = []
            for name in dict.fromkeys(self.config.collectors):
                data = self.collect(name)
                if data is not None:
                    events.append(self.event(f"host.{name}", data))
            # A round that cannot be queued now (a full disk) is skipped: the next
            # one says the same, newer.
            try:
                if events:
                    self.emit_many(events)
            except Exception as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    self.log.warning(
                        "could not queue the host metrics: %s; skipping rounds until it works"
                        " again",
                        exc,
                    )
            else:
                if failing_since is not None:
                    self.log.info(
                        "host metrics are queued again, after %.0fs without",
                        time.monotonic() - failing_since,
                    )
                    failing_since = None
            next_round += self.config.interval
            now = time.monotonic()
            if next_round < now:  # late (a suspended machine): no burst of rounds
                next_round = now + self.config.interval
            self.stopping.wait(next_round - now)

    def collect(self, name: str) -> dict[str, Any] | None:
        """One collector's ``data``, or None when it has nothing to say (no sensors)."""
        try:
            return getattr(self, f"_{name}")()
        except Exception as exc:
            self.count("collector_errors")
            self._say_once(
                f"error:{name}:{type(exc).__name__}",
                "the %s collector failed: %s; trying again next round",
                name,
                exc,
            )
            return None

    def _say_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            self.log.warning(message, *args)

    # -- the collectors ---------------------------------------------------------

    def _cpu(self) -> dict[str, Any]:
        psutil = self.psutil
        now = time.monotonic()
        total, cores = psutil.cpu_times(), psutil.cpu_times(percpu=True)
        if self._cpu_before is None:  # first round: since boot
            window = time.time() - psutil.boot_time()
            before_total, before_cores = None, [None] * len(cores)
        else:
            then, before_total, before_cores = self._cpu_before
            window = now - then
        self._cpu_before = (now, total, cores)

        def busy_percent(times: Any, before: Any) -> float:
            spent = {f: getattr(times, f, 0.0) - getattr(before, f, 0.0) for f in CPU_FIELDS}
            whole = sum(spent.values())
            return _percent(whole - spent["idle"] - spent["iowait"], whole)

        def seconds(times: Any) -> dict[str, float]:
            return {f"{f}_seconds": round(getattr(times, f, 0.0), 2) for f in CPU_FIELDS}

        before_cores = list(before_cores) + [None] * (len(cores) - len(before_cores))
        return {
            "percent": busy_percent(total, before_total),
            "window_seconds": round(window, 3),
            "cores": len(cores),
            **seconds(total),
            "per_core": [
                {"core": i, "percent": busy_percent(times, before_cores[i]), **seconds(times)}
                for i, times in enumerate(cores)
            ],
        }

    def _load(self) -> dict[str, Any]:
        one, five, fifteen = os.getloadavg()
        return {"load1": one, "load5": five, "load15": fifteen, "cores": os.cpu_count()}

    def _memory(self) -> dict[str, Any]:
        memory = self.psutil.virtual_memory()
        data = {
            f"{key}_bytes": getattr(memory, key)
            for key in ("total", "available", "used", "free", "buffers", "cached", "shared")
            if hasattr(memory, key)
        }
        data["used_percent"] = memory.percent
        return data

    def _swap(self) -> dict[str, Any]:
        swap = self.psutil.swap_memory()
        return {
            "total_bytes": swap.total,
            "used_bytes": swap.used,
            "free_bytes": swap.free,
            "used_percent": swap.percent,
            "swapped_in_bytes": swap.sin,
            "swapped_out_bytes": swap.sout,
        }

    def _disk(self) -> dict[str, Any]:
        mounts = self.psutil.disk_partitions(all=bool(self.config.filesystems))
        chosen: list[tuple[str | None, Any]] = []
        if self.config.filesystems:
            by_length = sorted(mounts, key=lambda m: len(m.mountpoint), reverse=True)
            for path in self.config.filesystems:
                real = os.path.realpath(path)
                mount = next(
                    (
                        m
                        for m in by_length
                        if real == m.mountpoint or real.startswith(m.mountpoint.rstrip("/") + "/")
                    ),
                    None,
                )
                chosen.append((path, mount))
        else:
            devices: set[str] = set()
            for mount in mounts:  # a device mounted twice (a bind mount) counts once
                if mount.device not in devices:
                    devices.add(mount.device)
                    chosen.append((None, mount))
        filesystems = []
        for path, mount in chosen:
            where = path or mount.mountpoint
            try:
                stat = os.statvfs(where)
            except OSError as exc:
                self._say_once(
                    f"disk:{where}",
                    "disk: cannot look at %s: %s; it is left out until it can",
                    where,
                    exc.strerror,
                )
                continue
            total = stat.f_blocks * stat.f_frsize
            free = stat.f_bavail * stat.f_frsize
            used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
            entry: dict[str, Any] = {"path": path} if path else {}
            entry.update(
                mountpoint=mount.mountpoint if mount else None,
                device=mount.device if mount else None,
                fstype=mount.fstype if mount else None,
                total_bytes=total,
                used_bytes=used,
                free_bytes=free,
                used_percent=_percent(used, used + free),
                inodes_total=stat.f_files,
                inodes_used=stat.f_files - stat.f_ffree,
                inodes_free=stat.f_favail,
            )
            filesystems.append(entry)
        return {"filesystems": filesystems}

    def _disk_io(self) -> dict[str, Any]:
        counters = self.psutil.disk_io_counters(perdisk=True, nowrap=True) or {}
        return {
            "disks": [
                {
                    "name": name,
                    "read_bytes": io.read_bytes,
                    "written_bytes": io.write_bytes,
                    "reads": io.read_count,
                    "writes": io.write_count,
                    "read_time_seconds": io.read_time / 1000,
                    "write_time_seconds": io.write_time / 1000,
                    "busy_time_seconds": getattr(io, "busy_time", 0) / 1000,
                }
                for name, io in sorted(counters.items())
                if not name.startswith(NOT_DISKS)
            ]
        }

    def _network(self) -> dict[str, Any]:
        counters = self.psutil.net_io_counters(pernic=True, nowrap=True) or {}
        return {
            "interfaces": [
                {
                    "name": name,
                    "sent_bytes": io.bytes_sent,
                    "received_bytes": io.bytes_recv,
                    "sent_packets": io.packets_sent,
                    "received_packets": io.packets_recv,
                    "errors_in": io.errin,
                    "errors_out": io.errout,
                    "drops_in": io.dropin,
                    "drops_out": io.dropout,
                }
                for name, io in sorted(counters.items())
            ]
        }

    def _sensors(self, kind: str, read: Any, unit: str, fields: tuple[str, ...]) -> Any:
        found = read() if read is not None else {}
        sensors = [
            {
                "chip": chip,
                "label": reading.label or None,
                **{f"{field}_{unit}": getattr(reading, field) for field in fields},
            }
            for chip, readings in sorted(found.items())
            for reading in readings
        ]
        if not sensors:
            if f"none:{kind}" not in self._said:
                self._said.add(f"none:{kind}")
                self.log.info(
                    "no %s sensors: the kernel shows none (/sys/class/hwmon,"
                    " /sys/class/thermal); host.%s is not sent while there are none",
                    "fan" if kind == "fans" else kind,
                    kind,
                )
            return None
        self._said.discard(f"none:{kind}")
        return {"sensors": sensors}

    def _temperature(self) -> dict[str, Any] | None:
        read = getattr(self.psutil, "sensors_temperatures", None)
        return self._sensors("temperature", read, "celsius", ("current", "high", "critical"))

    def _fans(self) -> dict[str, Any] | None:
        read = getattr(self.psutil, "sensors_fans", None)
        return self._sensors("fans", read, "rpm", ("current",))

    def _system(self) -> dict[str, Any]:
        boot = self.psutil.boot_time()
        return {
            "uptime_seconds": round(time.time() - boot, 3),
            "boot_time": rfc3339(boot),
            "processes": len(self.psutil.pids()),
            "cores": os.cpu_count(),
        }


@hookimpl
def register_sources(register):
    register("host", HostSource)
