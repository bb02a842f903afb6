"""The ``http`` sink: events POSTed to a URL, confirmed by a 2xx answer.

Batches go as one ``application/cloudevents-batch+json`` array (optionally
gzip-compressed); with ``batch_max_events = 1``, each event goes alone as
``application/cloudevents+json``. Standard library only (``http.client``,
``ssl``, ``gzip``), imported when the sink opens; one connection is kept open
and reused for every request (HTTP/1.1 keep-alive).

What an answer means:

- 2xx: every event of the request is confirmed.
- 429, or 503 with ``Retry-After``: the server is busy; nothing is sent again
  before the time it asked for (at most ``max_retry_after``), and then with the
  forwarder's backoff.
- 5xx, 408, a timeout or a lost connection: sent again after a backoff
  (``retry_min`` to ``retry_max``).
- 401, 403, 404, 405, 3xx: the destination as configured refuses everything (a
  wrong token, URL or method); nothing is set aside, the events wait, and the
  log says what to fix.
- Any other 4xx (400, 413, 422...): some event of the request is refused. A
  batch is split in halves and each half sent again, until the event refused
  alone is found; the others are delivered. That event is rejected
  (:meth:`edge_agent.Sink.reject`): as invalid for a 413 (set aside at once), as
  permanent otherwise (set aside after ``[queue] dead_letter_after`` refusals).
  Each such refusal is counted (``refused``, in ``edge-agent status``) and logged
  as a warning naming the answer, so that a server refusing every event is seen.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from edge_agent import (
    ByteSize,
    Duration,
    OptionError,
    QueuedEvent,
    Sink,
    SinkUnavailable,
    hookimpl,
    option,
)

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
#: Answers that refuse every request as configured: no event is to blame.
CONFIG_REFUSALS = {401, 403, 404, 405, 407}
#: 4xx answers that ask for the same request again later.
RETRY_LATER = {408, 425, 429}
#: Bytes of an error answer quoted in a log line.
QUOTED = 200


@dataclass(kw_only=True)
class HttpTlsConfig:
    """The ``tls`` table: how an https:// server is trusted, and a client certificate."""

    ca_file: str = option("", doc="CA certificate(s) to trust for the server. Empty: the system's.")
    cert_file: str = option("", doc="Client certificate, for mutual TLS.")
    key_file: str = option("", doc="Client private key, for mutual TLS.")

    def __post_init__(self) -> None:
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise OptionError(name, f"cannot read {path}; check the path and permissions")
        if bool(self.cert_file) != bool(self.key_file):
            missing = "key_file" if self.cert_file else "cert_file"
            raise OptionError(missing, "give cert_file and key_file together, for mutual TLS")


@dataclass(kw_only=True)
class HttpSinkConfig:
    """The ``[[sinks.http]]`` table."""

    url: str = option(
        doc="Where events are POSTed: http:// or https://, with the path.",
        example="https://collector.example.net/events",
    )
    batch_max_events: int = option(
        100,
        min=1,
        max=10_000,
        doc=f"Events per request, as {BATCH}; 1: each alone, as {STRUCTURED}.",
    )
    batch_max_bytes: ByteSize = option(
        ByteSize(1024**2),
        min=1024,
        doc="Largest body before compression (one event alone may be larger).",
    )
    gzip: bool = option(False, doc="Compress bodies (Content-Encoding: gzip).")
    headers: dict[str, str] = option({}, doc="Extra request headers.")
    token: str = option(
        "", secret=True, doc="Sent as Authorization: Bearer TOKEN; or token_file = PATH."
    )
    tls: HttpTlsConfig | None = option(
        None,
        example={"ca_file": "/etc/edge-agent/ca.pem"},
        doc="TLS settings for an https:// URL.",
    )
    timeout: Duration = option(
        30.0, above=0, doc="How long connecting, or waiting for an answer, may take."
    )
    retry_min: Duration = option(1.0, above=0, doc="Backoff floor between failed attempts.")
    retry_max: Duration = option(60.0, above=0, doc="Backoff cap between failed attempts.")
    max_retry_after: Duration = option(
        600.0, above=0, doc="A server's Retry-After is honoured up to this long."
    )

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"url must be http://HOST[:PORT]/PATH or https://..., got {self.url!r}"
            )
        if parts.username or parts.password:
            raise ValueError("url: put credentials in token (or headers), not in the URL")
        if self.tls is not None and parts.scheme != "https":
            raise ValueError("tls is set but the url is not https://")
        for name, value in self.headers.items():
            if not name or any(c in name + value for c in "\r\n"):
                raise ValueError(f"headers: {name!r} is not a valid header")


class HttpSink(Sink):
    """POSTs events to a URL; a 2xx confirms them (see docs/sinks/http.md)."""

    Config = HttpSinkConfig

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        config = self.config
        self.max_batch = config.batch_max_events
        self.retry_min = config.retry_min
        self.retry_max = config.retry_max
        parts = urlsplit(config.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._conn: Any = None
        #: Nothing is sent before this (time.monotonic()): a server's Retry-After.
        self._not_before = 0.0
        self.requests = 0
        self.reused = 0  # requests sent on a connection already used
        #: Events the server refused alone (a 4xx blaming the event), since start.
        self.refused = 0

    @property
    def target(self) -> str:
        scheme = "https" if self._https else "http"
        return f"{scheme}://{self._host}:{self._port}{self._path.split('?')[0]}"

    def open(self) -> None:
        import http.client

        config = self.config
        if self._https:
            import ssl

            context = ssl.create_default_context(
                cafile=(config.tls.ca_file or None) if config.tls else None
            )
            if config.tls and config.tls.cert_file:
                context.load_cert_chain(config.tls.cert_file, config.tls.key_file)
            self._conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=config.timeout, context=context
            )
        else:
            self._conn = http.client.HTTPConnection(self._host, self._port, timeout=config.timeout)
        self._used = False
        try:
            self._conn.connect()
        except Exception as exc:
            self.close()
            raise SinkUnavailable(self._why(exc)) from exc

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def publish(self, events: list[QueuedEvent]) -> list[QueuedEvent]:
        wait = self._not_before - time.monotonic()
        if wait > 0 and self.stopping.wait(wait):
            return []
        if self._conn is None:
            self.open()
        batch, size = [], 0
        for event in events:
            text = event.to_cloudevent_json()
            if batch and size + len(text) + 1 > self.config.batch_max_bytes:
                break  # the rest goes in the next request
            batch.append((event, text))
            size += len(text) + 1
        return self._deliver(batch)

    def _deliver(self, batch: list[tuple[QueuedEvent, str]]) -> list[QueuedEvent]:
        """Send ``batch``; on a refusal that blames an event, split it to find which."""
        status, reason, answer, retry_after = self._post(batch)
        if 200 <= status < 300:
            return [event for event, _ in batch]
        said = f"{status} {reason}" + (f": {answer}" if answer else "")
        if status == 429 or status in RETRY_LATER or status >= 500:
            later = ""
            if retry_after is not None:
                retry_after = min(retry_after, self.config.max_retry_after)
                self._not_before = time.monotonic() + retry_after
                later = f"; nothing is sent for {retry_after:g}s (Retry-After)"
            raise SinkUnavailable(f"{self.target} answered {said}{later}")
        if status in CONFIG_REFUSALS or 300 <= status < 400:
            hint = {
                401: "check token (or token_file)",
                403: "check the token's rights on the server",
                407: "a proxy wants credentials",
            }.get(status, "check url")
            raise SinkUnavailable(f"{self.target} refuses every request: {said}; {hint}")
        if len(batch) == 1:
            event = batch[0][0]
            self.refused += 1
            self.reject(event, f"{self.target} answered {said}", invalid=status == 413)
            # The same line for each event refused with this status (the body, which often
            # names the event, is left out), so that the log folds the repeats into a count;
            # which events, and the whole answer, are in the dead letters.
            self.log.debug("%s refused event %s: %s", self.target, event.id, said)
            self.log.warning(
                "%s refused an event: %s %s; %s",
                self.target,
                status,
                reason,
                "it is too large for the server and is set aside as a dead letter"
                if status == 413
                else "it is sent again, and set aside as a dead letter after [queue]"
                " dead_letter_after refusals once events behind it get through (while the"
                " server refuses every event, they all stay queued: check what it expects)",
            )
            return []
        half = len(batch) // 2
        return self._deliver(batch[:half]) + self._deliver(batch[half:])

    def _post(self, batch: list[tuple[QueuedEvent, str]]) -> tuple[int, str, str, float | None]:
        """One request on the kept connection (again on a fresh one if a kept one was
        closed by the server meanwhile): (status, reason, start of the answer, Retry-After)."""
        import http.client

        if len(batch) == 1 and self.config.batch_max_events == 1:
            body, kind = batch[0][1].encode(), STRUCTURED
        else:
            body, kind = ("[" + ",".join(text for _, text in batch) + "]").encode(), BATCH
        headers = {"Content-Type": kind, "User-Agent": "edge-agent", **self.config.headers}
        if self.config.gzip:
            import gzip

            body = gzip.compress(body, compresslevel=1, mtime=0)
            headers["Content-Encoding"] = "gzip"
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        for attempt in (1, 2):
            if self._conn is None:
                self.open()
            reused = self._used
            try:
                self._conn.request("POST", self._path, body, headers)
                self._used = True
                response = self._conn.getresponse()
                answer = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if reused and attempt == 1:
                    continue  # the server closed an idle kept connection: once more, fresh
                raise SinkUnavailable(self._why(exc)) from exc
            except Exception as exc:
                self.close()
                raise SinkUnavailable(self._why(exc)) from exc
            self.requests += 1
            self.reused += reused
            if response.will_close:
                self.close()
            text = answer[:QUOTED].decode("utf-8", "replace").strip()
            return response.status, response.reason, text, _retry_after(response)
        raise AssertionError("unreachable")

    def _why(self, exc: BaseException) -> str:
        from edge_agent.tls import describe_tls_error, find_verify_error

        if find_verify_error(exc) is not None or type(exc).__name__.startswith("SSL"):
            return f"{self.target}: {describe_tls_error(exc, self._host, 'tls.ca_file')}"
        if isinstance(exc, TimeoutError):
            return f"{self.target}: no answer within {self.config.timeout:g}s (timeout)"
        return (
            f"{self.target}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc!r}"
        )


def _retry_after(response: Any) -> float | None:
    """A Retry-After header in seconds (delay-seconds or an HTTP date), or None."""
    value = response.getheader("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


@hookimpl
def register_sinks(register):
    register("http", HttpSink)
