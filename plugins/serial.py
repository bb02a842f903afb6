"""The ``serial`` source: lines or fixed-size frames from a serial port.

Uses pyserial. When the port goes away (a USB adapter pulled out) the source
says so once, waits, and opens it again when it is back.

A line longer than ``max_line_bytes`` is cut as tail cuts it: the first
``max_line_bytes`` are sent, the rest is dropped up to the next delimiter,
counted, and reported as ``serial.gap`` (one event a minute at most).
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import serial  # pyserial, imported when the source runs: `check` and `plugins` skip it

from edge_agent import Duration, Event, Source, hookimpl, option
from edge_agent.errors import QueueError

#: Seconds between serial.gap events (and warnings) about lines cut at max_line_bytes.
GAP_EVERY = 60.0


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _unescape(text: str) -> bytes:
    """``"\\r\\n"`` written in TOML as an escape arrives as itself; also accept ``\\\\n``."""
    return (
        codecs.decode(text, "unicode_escape").encode("latin-1") if "\\" in text else text.encode()
    )


class SerialSource(Source):
    """Emits ``serial.line`` for each line (or frame) read from ``port``, and ``serial.gap``
    for the bytes of over-long lines it dropped."""

    announces_listening = True

    @dataclass(kw_only=True)
    class Config:
        port: str = option(
            doc='The device, e.g. "/dev/ttyUSB0" or "/dev/serial/by-id/...".',
            example="/dev/ttyUSB0",
        )
        baudrate: int = option(9600, min=1, doc="Line speed.")
        bytesize: Literal[5, 6, 7, 8] = option(8, doc="Data bits.")
        parity: Literal["none", "even", "odd", "mark", "space"] = option("none", doc="Parity.")
        stopbits: Literal[1, 1.5, 2] = option(1, doc="Stop bits.")
        delimiter: str = option("\n", doc='What ends a line, e.g. "\\r\\n". Kept out of the line.')
        frame_bytes: int = option(
            0, min=0, doc="Read fixed-size frames of this many bytes instead of lines; 0: lines."
        )
        encoding: str = option(
            "utf-8", doc='Text encoding; invalid bytes become U+FFFD. "raw": base64 bytes.'
        )
        max_line_bytes: int = option(
            4096,
            min=1,
            doc="Longer lines are cut to this; the rest, up to the next delimiter, is dropped,"
            " counted and reported as serial.gap.",
        )
        reopen_interval: Duration = option(
            2.0, above=0, doc="How often to look for a port that went away."
        )

        def __post_init__(self) -> None:
            if not self.frame_bytes and not self.delimiter:
                raise ValueError("give a delimiter, or frame_bytes for fixed-size frames")
            if self.frame_bytes < 0 or self.max_line_bytes < 1:
                raise ValueError("frame_bytes must be 0 or more and max_line_bytes at least 1")
            if self.encoding != "raw":
                try:
                    codecs.lookup(self.encoding)
                except LookupError:
                    raise ValueError(f"unknown encoding {self.encoding!r}") from None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delimiter = _unescape(self.config.delimiter)
        #: True while the rest of an over-long line is dropped, up to the next delimiter.
        self.skipping = False
        #: Bytes dropped since the last serial.gap event: [first, last (wall-clock times),
        #: bytes, lines cut]; None when there are none.
        self.unreported: list[Any] | None = None
        self.last_gap = -GAP_EVERY  # time.monotonic() of the last serial.gap event

    def _open(self) -> serial.Serial:
        import serial

        config = self.config
        return serial.Serial(
            config.port,
            baudrate=config.baudrate,
            bytesize=config.bytesize,
            parity=config.parity[0].upper(),
            stopbits=config.stopbits,
            timeout=0.2,
        )

    def run(self) -> None:
        import serial

        gone_since: float | None = None
        while not self.stopping.is_set():
            try:
                port = self._open()
            except (serial.SerialException, OSError) as exc:
                self.listening()  # tried: it is looked for again
                if gone_since is None:
                    gone_since = time.monotonic()
                    self.log.warning(
                        "cannot open %s: %s; looking for it every %gs",
                        self.config.port,
                        exc,
                        self.config.reopen_interval,
                    )
                self.stopping.wait(self.config.reopen_interval)
                continue
            self.log.debug("reading %s", self.config.port)
            self.listening()
            if gone_since is not None:
                self.log.info(
                    "%s is back after %.0fs", self.config.port, time.monotonic() - gone_since
                )
                gone_since = None
            try:
                self._read(port)
            except (serial.SerialException, OSError) as exc:
                gone_since = time.monotonic()
                self.log.warning(
                    "lost %s: %s; looking for it every %gs",
                    self.config.port,
                    exc,
                    self.config.reopen_interval,
                )
            finally:
                with contextlib.suppress(Exception):
                    port.close()

    def _read(self, port: serial.Serial) -> None:
        buffer = b""
        self.skipping = False  # the port was opened again: a new stream
        try:
            while not self.stopping.is_set():
                chunk = port.read(max(1, port.in_waiting))
                if chunk:
                    buffer += chunk
                    pieces, buffer = self._split(buffer)
                    if pieces:
                        self.emit_until_accepted([self._event(piece) for piece in pieces])
                self._report_dropped()
        finally:
            self._flush(buffer)

    def _split(self, buffer: bytes) -> tuple[list[bytes], bytes]:
        size = self.config.frame_bytes
        if size:
            count = len(buffer) // size
            return [buffer[i * size : (i + 1) * size] for i in range(count)], buffer[count * size :]
        return self._split_lines(buffer)

    def _split_lines(self, buffer: bytes) -> tuple[list[bytes], bytes]:
        """Complete lines, and what is left for the next read.

        As tail does, a line longer than ``max_line_bytes`` is cut to it and sent;
        the rest is dropped up to the next delimiter (counted, and reported as
        serial.gap).
        """
        delimiter, limit = self.delimiter, self.config.max_line_bytes
        lines: list[bytes] = []
        start = 0
        while True:
            end = buffer.find(delimiter, start)
            if self.skipping:
                if end < 0:
                    # Keep what may be the first bytes of a delimiter cut in two by the read.
                    keep = max(start, len(buffer) - len(delimiter) + 1)
                    self._dropped(keep - start, 0)
                    start = keep
                    break
                self._dropped(end - start, 0)
                start = end + len(delimiter)
                self.skipping = False
                continue
            if end < 0:
                # Without a delimiter in limit + len(delimiter) bytes, the line is longer.
                if len(buffer) - start >= limit + len(delimiter):
                    lines.append(buffer[start : start + limit])
                    self._dropped(0, 1)
                    start += limit
                    self.skipping = True
                    continue
                break
            if end - start > limit:
                lines.append(buffer[start : start + limit])
                self._dropped(end - start - limit, 1)
            else:
                lines.append(buffer[start:end])
            start = end + len(delimiter)
        return lines, buffer[start:]

    def _dropped(self, size: int, lines: int) -> None:
        """Count bytes dropped and lines cut, for the next serial.gap event."""
        if size:
            self.count("dropped_bytes", size)
        if lines:
            self.count("truncated_lines", lines)
        if size or lines:
            now = time.time()
            if self.unreported is None:
                self.unreported = [now, now, 0, 0]
            self.unreported[1:] = [now, self.unreported[2] + size, self.unreported[3] + lines]

    def _gap_data(self) -> dict[str, Any]:
        assert self.unreported is not None
        first, last, size, lines = self.unreported
        self.unreported = None
        self.last_gap = time.monotonic()
        return {
            "port": self.config.port,
            "reason": f"lines longer than max_line_bytes ({self.config.max_line_bytes}) were cut",
            "from": _rfc3339(first),
            "to": _rfc3339(last),
            "dropped_bytes": size,
            "truncated_lines": lines,
        }

    def _report_dropped(self) -> None:
        """Report what was dropped as one serial.gap event a minute at most."""
        if self.unreported is not None and time.monotonic() - self.last_gap >= GAP_EVERY:
            self.report_gap("serial.gap", self._gap_data(), subject=self.config.port)

    def _flush(self, buffer: bytes) -> None:
        """At a port error or a stop: send what was read and not yet sent.

        The bytes of a line not ended yet go out as a ``partial`` line (the rest
        of it, if it ever comes, starts the next line); dropped bytes not yet
        reported go out as a serial.gap event.
        """
        if self.skipping:
            self._dropped(len(buffer), 0)
            buffer = b""
        events = []
        if self.unreported is not None:
            data = self._gap_data()
            self.log.warning(
                "%d bytes of lines longer than max_line_bytes were dropped on %s from %s to %s",
                data["dropped_bytes"],
                self.config.port,
                data["from"],
                data["to"],
            )
            events.append(self.event("serial.gap", data, subject=self.config.port))
        if buffer:
            events.append(self._event(buffer, partial=True))
        if not events:
            return
        if not self.stopping.is_set():
            self.emit_until_accepted(events)
            return
        try:  # stopping: once, without waiting for a queue that cannot take it
            self.emit_many(events)
        except QueueError as exc:
            self.log.warning(
                "could not commit the last %d events read from %s at stop: %s",
                len(events),
                self.config.port,
                exc,
            )

    def _event(self, piece: bytes, *, partial: bool = False) -> Event:
        data: dict[str, Any] = {"port": self.config.port}
        if self.config.encoding == "raw":
            data["data_base64"] = base64.b64encode(piece).decode("ascii")
        else:
            data["line"] = piece.decode(self.config.encoding, errors="replace")
        if partial:
            data["partial"] = True
        return self.event("serial.line", data, subject=self.config.port)


@hookimpl
def register_sources(register):
    register("serial", SerialSource)
