"""The ``udev`` source: devices plugged in, removed, changed, bound or unbound.

Listens on the netlink socket through pyudev: to the udev daemon's events
where one runs (they carry the properties udev adds, such as vendor and model
names), to the kernel's otherwise. Needs AF_NETLINK, which the systemd unit
allows.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import select
from dataclasses import dataclass
from typing import Any, Literal

from agent import Duration, Event, Source, hookimpl, option

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


class UdevSource(Source):
    """Emits ``device.added|removed|changed|bound|unbound|moved`` (and ``device.present``)."""

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
        retry: Duration = option(60.0, doc="How often to try again when netlink is refused.")

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

    def to_event(self, device: Any, action: str | None) -> Event:
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
        kind = TYPES.get(action, "device.changed") if action else "device.present"
        return self.event(kind, data, subject=device.device_path)

    # -- the loop ---------------------------------------------------------------

    def _monitor(self) -> Any:
        import pyudev

        context = pyudev.Context()
        source = self.config.netlink
        if source == "auto":
            source = "udev" if os.path.exists("/run/udev/control") else "kernel"
        monitor = pyudev.Monitor.from_netlink(context, source=source)
        for subsystem in self.config.subsystems:
            # The kernel filters by subsystem (and device type) before we wake up.
            device_types = self.config.device_types or [None]
            for device_type in device_types:
                monitor.filter_by(subsystem, device_type)
        monitor.start()
        self.log.info("listening to %s device events", source)
        return context, monitor

    def run(self) -> None:
        try:
            context, monitor = self._monitor()
        except (OSError, ImportError) as exc:
            self.listening()  # tried: READY is not held while netlink is refused
            self.log.warning(
                "cannot listen to device events: %s. Is AF_NETLINK allowed (systemd"
                " RestrictAddressFamilies)? Trying again every %gs; the rest of the agent runs.",
                exc,
                self.config.retry,
            )
            while not self.stopping.wait(self.config.retry):
                try:
                    context, monitor = self._monitor()
                    break
                except (OSError, ImportError):
                    continue
            else:
                return
        self.listening()
        if self.config.enumerate_on_start:
            self._emit_present(context)
        try:
            while not self.stopping.is_set():
                ready, _, _ = select.select([monitor], [], [], 0.5)
                if not ready:
                    continue
                events = []
                while len(events) < BATCH_MAX:
                    device = monitor.poll(timeout=0)
                    if device is None:
                        break
                    if self.wanted(device):
                        events.append(self.to_event(device, device.action))
                if events:
                    self.emit_until_accepted(events)
        finally:
            with contextlib.suppress(Exception):
                monitor.stop()

    def _emit_present(self, context: Any) -> None:
        devices = context.list_devices()
        for subsystem in self.config.subsystems:
            devices = devices.match_subsystem(subsystem)
        self.emit_until_accepted([self.to_event(d, None) for d in devices if self.wanted(d)])


@hookimpl
def register_sources(register):
    register("udev", UdevSource)
