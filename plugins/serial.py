"""The ``serial`` source: lines or fixed-size frames from a serial port.

Uses pyserial. When the port goes away (a USB adapter pulled out) the source
says so once, waits, and opens it again when it is back.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Literal

import serial

from agent import Duration, Event, Source, hookimpl, option


def _unescape(text: str) -> bytes:
    """``"\\r\\n"`` written in TOML as an escape arrives as itself; also accept ``\\\\n``."""
    return (
        codecs.decode(text, "unicode_escape").encode("latin-1") if "\\" in text else text.encode()
    )


class SerialSource(Source):
    """Emits ``serial.line`` for each line (or frame) read from ``port``."""

    announces_listening = True

    @dataclass(kw_only=True)
    class Config:
        port: str = option(doc='The device, e.g. "/dev/ttyUSB0" or "/dev/serial/by-id/...".')
        baudrate: int = option(9600, doc="Line speed.")
        bytesize: Literal[5, 6, 7, 8] = option(8, doc="Data bits.")
        parity: Literal["none", "even", "odd", "mark", "space"] = option("none", doc="Parity.")
        stopbits: Literal[1, 1.5, 2] = option(1, doc="Stop bits.")
        delimiter: str = option("\n", doc='What ends a line, e.g. "\\r\\n". Kept out of the line.')
        frame_bytes: int = option(
            0, doc="Read fixed-size frames of this many bytes instead of lines; 0: lines."
        )
        encoding: str = option(
            "utf-8", doc='Text encoding; invalid bytes become U+FFFD. "raw": base64 bytes.'
        )
        max_line_bytes: int = option(4096, doc="Longer lines are cut; the rest is dropped.")
        reopen_interval: Duration = option(2.0, doc="How often to look for a port that went away.")

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
        self.truncated_lines = 0

    def _open(self) -> serial.Serial:
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
        while not self.stopping.is_set():
            chunk = port.read(max(1, port.in_waiting))
            if not chunk:
                continue
            buffer += chunk
            pieces, buffer = self._split(buffer)
            if pieces:
                self.emit_until_accepted([self._event(piece) for piece in pieces])

    def _split(self, buffer: bytes) -> tuple[list[bytes], bytes]:
        size = self.config.frame_bytes
        if size:
            count = len(buffer) // size
            return [buffer[i * size : (i + 1) * size] for i in range(count)], buffer[count * size :]
        *lines, rest = buffer.split(self.delimiter)
        limit = self.config.max_line_bytes
        if len(rest) > limit:  # no delimiter in sight: cut, and keep reading
            lines.append(rest[:limit])
            rest = b""
        cut = [line[:limit] for line in lines]
        self.truncated_lines += sum(len(line) > limit for line in lines)
        return cut, rest

    def _event(self, piece: bytes) -> Event:
        data: dict[str, Any] = {"port": self.config.port}
        if self.config.encoding == "raw":
            data["data_base64"] = base64.b64encode(piece).decode("ascii")
        else:
            data["line"] = piece.decode(self.config.encoding, errors="replace")
        return self.event("serial.line", data, subject=self.config.port)


@hookimpl
def register_sources(register):
    register("serial", SerialSource)
