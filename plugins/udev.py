"""The ``udev`` source: devices plugged in, removed, changed, bound or unbound.

Listens on the netlink socket through pyudev: to the udev daemon's events
where one runs (they carry the properties udev adds, such as vendor and model
names), to the kernel's otherwise. Needs AF_NETLINK, which the systemd unit
allows.

The kernel drops device events when the socket's receive buffer is full (a
burst while the agent is busy): the socket then reports ENOBUFS once. The
source keeps the socket, reads what is still queued, enumerates the devices
again and reports the difference with what it last reported, after a
``device.gap`` event for the window in which events were lost.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from edge_agent import ByteSize, Duration, Event, Source, hookimpl, option

TYPES = {
    "add": "device.added",
    "remove": "device.removed",
    "change": "device.changed",
    "bind": "device.bound",
    "unbind": "device.unbound",
    "move": "device.moved",
}
#: Properties worth a name of their own in ``data``.
USEFUL = {
    "ID_VENDOR_ID": "vendor_id",
    "ID_MODEL_ID": "model_id",
    "ID_VENDOR_FROM_DATABASE": "vendor",
    "ID_MODEL_FROM_DATABASE": "model",
    "ID_SERIAL_SHORT": "serial",
}
BATCH_MAX = 200
#: The udev daemon's control socket: where it is missing, no udev daemon runs.
UDEV_CONTROL = "/run/udev/control"
OVERFLOW_REASON = "netlink receive buffer overflowed"
RESTART_REASON = "device events were not read while the source restarted after an error"


class NetlinkOverflow(Exception):
    """The kernel dropped device events: the socket's receive buffer was full."""


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _rmem_max() -> int | None:
    try:
        with open("/proc/sys/net/core/rmem_max") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return None


class UdevSource(Source):
    """Emits ``device.added|removed|changed|bound|unbound|moved`` (and ``device.present``),
    and ``device.gap`` when the kernel dropped events (see the module docstring)."""

    announces_listening = True

    @dataclass(kw_only=True)
    class Config:
        subsystems: list[str] = option([], doc='Only these subsystems, e.g. ["usb", "tty"].')
        device_types: list[str] = option([], doc='Only these device types, e.g. ["usb_device"].')
        match: dict[str, str] = option(
            {}, doc='Property globs every device must match: { ID_VENDOR_ID = "0781" }.'
        )
        enumerate_on_start: bool = option(
            False, doc="At start, emit device.present once for each matching device already there."
        )
        netlink: Literal["auto", "udev", "kernel"] = option(
            "auto",
            doc='"udev" for the udev daemon\'s events, "kernel" for the kernel\'s;'
            ' "auto" takes udev\'s where the daemon runs.',
        )
        retry: Duration = option(
            60.0, above=0, doc="How often to try again when netlink is refused."
        )
        receive_buffer: ByteSize = option(
            ByteSize(128 * 1024 * 1024),
            doc="The netlink socket's receive buffer: how many events wait while the agent is"
            " busy. Without CAP_NET_ADMIN the kernel caps it at net.core.rmem_max.",
        )

        def __post_init__(self) -> None:
            if not 4096 <= self.receive_buffer <= 1 << 30:
                raise ValueError("receive_buffer must be between 4KiB and 1GiB")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: Device path -> the data last reported for it (as JSON, to keep it small), for
        #: every matching device present as far as the source knows: the baseline
        #: enumeration at start, then every event. Compared with a new enumeration
        #: after an overflow.
        self.known: dict[str, str] = {}
        #: When the last device event was received (time.time()); None before the
        #: first run has its baseline. A run after a failed one starts from it.
        self.last_received: float | None = None
        self._told_no_udev = False  # said once, not at every retry

    # -- filtering and building events -----------------------------------------

    def wanted(self, device: Any) -> bool:
        config = self.config
        if config.subsystems and device.subsystem not in config.subsystems:
            return False
        if config.device_types and device.device_type not in config.device_types:
            return False
        for key, pattern in config.match.items():
            value = device.properties.get(key)
            if value is None or not fnmatch.fnmatchcase(value, pattern):
                return False
        return True

    def to_event(self, device: Any, action: str | None, *, enumerated: bool = False) -> Event:
        properties = {str(k): str(v) for k, v in device.properties.items()}
        data: dict[str, Any] = {
            "action": action or "present",
            "subsystem": device.subsystem,
            "devtype": device.device_type,
            "devnode": device.device_node,
            "driver": device.driver,
            "sys_name": device.sys_name,
        }
        for key, name in USEFUL.items():
            if key in properties:
                data[name] = properties[key]
        data["vendor"] = data.get("vendor") or properties.get("ID_VENDOR")
        data["model"] = data.get("model") or properties.get("ID_MODEL")
        data["properties"] = properties
        if enumerated:
            data["enumerated"] = True
        kind = TYPES.get(action, "device.changed") if action else "device.present"
        return self.event(kind, data, subject=device.device_path)

    def remember(self, event: Event) -> None:
        """Keep the known devices up to date with an event about to be reported."""
        path = event.subject
        assert path is not None
        if event.type == "device.removed":
            self.known.pop(path, None)
            return
        if event.type == "device.moved":
            self.known.pop(event.data["properties"].get("DEVPATH_OLD", ""), None)
        data = {key: value for key, value in event.data.items() if key != "enumerated"}
        self.known[path] = json.dumps(data, separators=(",", ":"))

    # -- the socket ---------------------------------------------------------------

    def _monitor(self) -> Any:
        import pyudev

        context = pyudev.Context()
        source = self.config.netlink
        if source == "auto":
            source = "udev" if os.path.exists(UDEV_CONTROL) else "kernel"
        elif source == "udev" and not os.path.exists(UDEV_CONTROL) and not self._told_no_udev:
            self._told_no_udev = True
            self.log.warning(
                'netlink = "udev", but no udev daemon runs here (%s is missing): its events'
                ' never come, and this source sees no device. Set netlink = "kernel" (or'
                ' "auto") for the kernel\'s own events, or start the udev daemon'
                " (systemd-udevd).",
                UDEV_CONTROL,
            )
        monitor = pyudev.Monitor.from_netlink(context, source=source)
        for subsystem in self.config.subsystems:
            # The kernel filters by subsystem (and device type) before we wake up.
            device_types = self.config.device_types or [None]
            for device_type in device_types:
                monitor.filter_by(subsystem, device_type)
        monitor.start()
        self.log.info("listening to %s device events", source)
        return context, monitor

    def _size_buffer(self, monitor: Any, sock: socket.socket) -> None:
        asked = int(self.config.receive_buffer)
        try:
            monitor.set_receive_buffer_size(asked)  # SO_RCVBUFFORCE: needs CAP_NET_ADMIN
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, asked)  # capped at rmem_max
        # The kernel doubles the value it was given, for its own bookkeeping.
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
        if got >= asked:
            self.log.info("netlink receive buffer: %d bytes", got)
        else:
            self.log.info(
                "netlink receive buffer: %d bytes, not the %d of receive_buffer: without"
                " CAP_NET_ADMIN the kernel caps it at net.core.rmem_max (%s); raise that"
                " (sysctl net.core.rmem_max=%d) to let bursts wait in the socket",
                got,
                asked,
                _rmem_max(),
                asked,
            )

    def _receive(self, monitor: Any, sock: socket.socket) -> Any:
        """The next device event, None if none is waiting; NetlinkOverflow on ENOBUFS.

        The kernel signals an overflow once, as a socket error: pyudev's poll
        reports it as "Error while polling fd" (POLLERR, no errno), and reading
        the socket as ENOBUFS. Reading SO_ERROR clears it; the socket stays usable.
        """
        try:
            return monitor.poll(timeout=0)
        except OSError as exc:
            error = exc.errno or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error == errno.ENOBUFS:
                raise NetlinkOverflow from None
            raise

    # -- the loop ---------------------------------------------------------------

    def _open(self) -> Any:
        """The started monitor (and its context), retrying while netlink is refused."""
        try:
            return self._monitor()
        except (OSError, ImportError) as exc:
            self.listening()  # tried: READY is not held while netlink is refused
            self.log.warning(
                "cannot listen to device events: %s. Is AF_NETLINK allowed (systemd"
                " RestrictAddressFamilies)? Trying again every %gs; the rest of the agent runs.",
                exc,
                self.config.retry,
            )
        while not self.stopping.wait(self.config.retry):
            with contextlib.suppress(OSError, ImportError):
                return self._monitor()
        return None

    def run(self) -> None:
        opened = self._open()
        if opened is None:
            return
        context, monitor = opened
        # A socket object on a duplicate of the monitor's descriptor, for socket options.
        sock = socket.socket(fileno=os.dup(monitor.fileno()))
        try:
            self._size_buffer(monitor, sock)
            self.listening()
            if self.last_received is None:
                self._baseline(context)
            else:  # run again after an error: what happened in between is not known
                self._resync(context, self.last_received, RESTART_REASON)
            self._loop(context, monitor, sock)
        finally:
            sock.close()
            with contextlib.suppress(Exception):
                monitor.stop()

    def _loop(self, context: Any, monitor: Any, sock: socket.socket) -> None:
        self.last_received = time.time()
        lost_since: float | None = None  # set from an overflow until the re-enumeration
        while not self.stopping.is_set():
            ready, _, _ = select.select([monitor], [], [], 0.5)
            if not ready and lost_since is None:
                continue
            events = []
            drained = False
            while len(events) < BATCH_MAX:
                try:
                    device = self._receive(monitor, sock)
                except NetlinkOverflow:
                    self.count("overflows")
                    if lost_since is None:
                        lost_since = self.last_received
                    continue
                if device is None:
                    drained = True
                    break
                self.last_received = time.time()
                if self.wanted(device):
                    event = self.to_event(device, device.action)
                    self.remember(event)
                    events.append(event)
                else:  # no longer matches (or never did): no longer known either
                    self.known.pop(device.device_path, None)
            if events:
                self.emit_until_accepted(events)
            # What was queued before the loss is read first, so the enumeration
            # is compared with everything the socket still had to say.
            if lost_since is not None and drained:
                self._resync(context, lost_since, OVERFLOW_REASON)
                lost_since = None
                self.last_received = time.time()

    def _enumerate(self, context: Any) -> Iterator[Any]:
        """The matching devices there now, one at a time (thousands of them are big)."""
        devices = context.list_devices()
        for subsystem in self.config.subsystems:
            devices = devices.match_subsystem(subsystem)
        return (device for device in devices if self.wanted(device))

    def _baseline(self, context: Any) -> None:
        """Learn which devices are there, reporting them as device.present if configured."""
        present = []
        for device in self._enumerate(context):
            event = self.to_event(device, None)
            self.remember(event)
            if self.config.enumerate_on_start:
                present.append(event)
        if present:
            self.emit_until_accepted(present)
        self.log.debug("%d matching devices present at start", len(self.known))

    def _resync(self, context: Any, lost_since: float, reason: str) -> None:
        """After an overflow (or a failed run): report the difference between the devices
        there now and those last reported, after a device.gap for the window."""
        present: set[str] = set()
        added = []
        for device in self._enumerate(context):
            present.add(device.device_path)
            if device.device_path not in self.known:
                added.append(self.to_event(device, "add", enumerated=True))
        removed = []
        for path in [path for path in self.known if path not in present]:
            data = json.loads(self.known.pop(path))
            data.update(action="remove", enumerated=True)
            removed.append(self.event("device.removed", data, subject=path))
        for event in added:
            self.remember(event)
        gap = {
            "reason": reason,
            "from": _rfc3339(lost_since),
            "to": _rfc3339(time.time()),
            "added": len(added),
            "removed": len(removed),
        }
        if self.report_gap("device.gap", gap):
            self.emit_until_accepted(added + removed)


@hookimpl
def register_sources(register):
    register("udev", UdevSource)
