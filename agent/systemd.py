"""sd_notify, spoken directly: a datagram to ``$NOTIFY_SOCKET``, no libsystemd needed.

``READY=1`` once the queue is open and sources run, ``STATUS=`` with a one-line
summary, ``WATCHDOG=1`` only while the writer and every forwarder show
progress (so a hung agent is restarted), ``STOPPING=1`` on the way out.
Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("edge_agent.systemd")


class Notifier:
    """Sends sd_notify messages; quiet when not run by systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        environ = dict(os.environ if environ is None else environ)
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and (not pid or pid == str(os.getpid()))
        #: Seconds between watchdog pings (half of WatchdogSec), or None.
        self.watchdog_interval = int(usec) / 2e6 if watched and int(usec) > 0 else None
        self._sock: socket.socket | None = None
        if self.address:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError as exc:
                log.warning("cannot talk to systemd at %s: %s", address, exc)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        """Send ``KEY=value`` fields in one datagram."""
        if self._sock is None:
            return
        try:
            # Never block the main thread on a listener that stopped reading.
            message = "\n".join(fields).encode("utf-8")
            self._sock.sendto(message, socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            # A lost READY=1 fails a Type=notify start: worth a line in the journal.
            important = any(f in ("READY=1", "STOPPING=1") for f in fields)
            log.log(logging.WARNING if important else logging.DEBUG, "sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
