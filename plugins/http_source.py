"""The ``http`` source: local applications POST events, answered once they are committed.

A client gets a 2xx only after its events are on disk (``emit_many`` has
returned), so a client that retries after a timeout or a refused connection
loses nothing; the repeat is recognised by its ``Idempotency-Key`` header (the
key is committed in the same transaction as the events) or, for CloudEvents,
by the ``id`` the event keeps.

Standard library only (``http.server``), imported when the source runs. One
thread accepts connections; ``threads`` workers serve them, so a burst of
connections waits in line instead of starting a thread each. A request must
arrive whole within ``request_timeout`` of its first byte (a client that
trickles its headers is cut off, answered 408), and a kept-alive connection
that sends nothing gives its worker up after ``keepalive_timeout``, or after
half a second when other connections wait for a worker (and while others wait,
an answer closes its connection: ``Connection: close``).

While the queue is full and ``[queue] when_full = "block"``, a request waits
at most ``queue_wait`` for room and is then answered 503 with ``Retry-After``;
its events were not accepted.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any

from edge_agent import ByteSize, Duration, Event, Source, hookimpl, option
from edge_agent.errors import QueueError, TooManyAtOnce
from edge_agent.event import canonical_time, check_event, encode_data

JSON = "application/json"
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
CONTENT_TYPES = (JSON, STRUCTURED, BATCH)
#: Checkpoint keys of idempotency keys: "idem:" + the key; the value is when it was seen.
IDEM_PREFIX = "idem:"
IDEM_MAX_LENGTH = 200
#: How often keys older than idempotency_ttl are forgotten (seconds).
IDEM_PRUNE_EVERY = 600.0
#: After refusing a body unread, drop what the client still sends for this long (seconds).
LINGER = 1.0
#: A kept-alive connection idle this long gives its worker up to connections that wait
#: (seconds). Not at once: a client sending request after request is not cut off
#: between two of them (it would find its connection closed as it sends).
IDLE_YIELD = 0.5


@dataclass(kw_only=True)
class HttpSourceConfig:
    """The ``[[sources.http]]`` table."""

    address: str = option("127.0.0.1", doc="Address to listen on; 0.0.0.0 for every interface.")
    port: int = option(9880, min=0, max=65535, doc="TCP port; 0 picks a free one (tests).")
    path: str = option("/events", doc="The URL path events are posted to.")
    type: str = option("http.event", doc="Event type of posted JSON that is not a CloudEvent.")
    token: str = option(
        "", secret=True, doc="Bearer token clients must send; or token_file = PATH. Empty: none."
    )
    max_body_bytes: ByteSize = option(
        ByteSize(1024**2), min=1, doc="Larger bodies are refused (413) before they are read."
    )
    max_events: int = option(10_000, min=1, doc="Most events in one request (413 beyond).")
    threads: int = option(8, min=1, max=256, doc="Requests served at once.")
    max_connections: int = option(
        256, min=1, doc="Open connections at most; more are answered 503 and closed."
    )
    request_timeout: Duration = option(
        10.0, above=0, doc="A request must arrive whole within this of its first byte (408)."
    )
    keepalive_timeout: Duration = option(
        5.0, min=0, doc="An idle kept-alive connection is closed after this; 0: no keep-alive."
    )
    queue_wait: Duration = option(
        5.0,
        above=0,
        doc='With when_full = "block": how long a request waits for room before its 503.',
    )
    retry_after: int = option(5, min=1, doc="Seconds in the Retry-After header of a 503.")
    idempotency_ttl: Duration = option(
        86400.0, above=0, doc="How long an Idempotency-Key is remembered."
    )

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/', got {self.path!r}")


class _Stopping(threading.Event):
    """The source's ``stopping``, which also reads as set, in one request's thread, once
    that request has waited ``queue_wait`` for room in a full queue, or once the queue
    is known to be full (``full``) and the request is not the one that probes it.

    The agent hands a source's ``stopping`` to the queue's writer as the signal that
    ends a wait for room, and the writer looks at it in the committing thread: so a
    request's wait ends (its events not accepted) without a stop of the whole source.
    """

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()
        #: A request waited queue_wait for room in vain, and nothing was committed since.
        self.full = False

    def is_set(self) -> bool:
        if super().is_set():
            return True
        deadline = getattr(self._local, "deadline", None)
        if deadline is None:
            return False
        return time.monotonic() >= deadline or (self.full and not self._local.probing)

    def limit(self, deadline: float | None, probing: bool = False) -> None:
        """Set (or, with None, clear) this thread's deadline; ``probing``: this thread's
        request is the one that waits while the queue is known to be full."""
        self._local.deadline = deadline
        self._local.probing = probing

    def expired(self) -> bool:
        """True if this thread's wait ended for room (and the source is not stopping)."""
        return not super().is_set() and self.is_set()

    def waited(self) -> bool:
        """True if this thread's deadline passed."""
        deadline = getattr(self._local, "deadline", None)
        return deadline is not None and time.monotonic() >= deadline


class Refused(Exception):
    """A request answered with an error: status, message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class _DeadlineRaw(io.RawIOBase):
    """A socket's reading side that gives up at a deadline (total, not per recv()).

    ``deadline`` is set before each request; bytes that trickle in one by one
    cannot keep a worker past it.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = time.monotonic()
        self.eof = False
        #: Only take what has arrived (None if nothing has): a look, not a wait.
        self.nonblocking = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        if self.nonblocking:
            # A socket with a timeout waits for data (up to that timeout) before any
            # recv(), MSG_DONTWAIT or not: make it non-blocking for this one look.
            timeout = self.sock.gettimeout()
            self.sock.setblocking(False)
            try:
                count = self.sock.recv_into(buffer)
            except BlockingIOError:
                return None
            finally:
                self.sock.settimeout(timeout)
            self.eof = count == 0
            return count
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive within request_timeout")
        self.sock.settimeout(left)
        count = self.sock.recv_into(buffer)
        self.eof = count == 0
        return count


class HttpSource(Source):
    """Accepts events posted as JSON or CloudEvents over HTTP (see docs/sources/http.md)."""

    Config = HttpSourceConfig
    announces_listening = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stopping = _Stopping()
        self._server: Any = None
        self._counts_lock = threading.Lock()
        self._keys_lock = threading.Lock()
        self._keys_in_flight: set[str] = set()
        self._probe = threading.Lock()  # while the queue is known full, one request waits
        self.address: tuple[str, int] | None = None

    # -- life --------------------------------------------------------------

    def run(self) -> None:
        import queue
        import selectors
        from http.server import HTTPServer

        class Server(HTTPServer):
            allow_reuse_address = True
            request_queue_size = 128

        self._connections = 0
        self._work: Any = queue.Queue()
        try:
            server = Server((self.config.address, self.config.port), _make_handler(self))
        except OSError as exc:
            raise OSError(
                f"cannot listen on {self.config.address}:{self.config.port}: {exc.strerror};"
                " is another program using the port? Set port (and address) to a free one"
            ) from exc
        self._server = server
        self.address = server.server_address[:2]
        workers = [
            threading.Thread(
                target=self._worker, args=(server,), name=f"{self.name}:http-{i}", daemon=True
            )
            for i in range(self.config.threads)
        ]
        for worker in workers:
            worker.start()
        # New connections wait here, costing no thread, until their first bytes arrive.
        waiting = selectors.DefaultSelector()
        waiting.register(server.socket, selectors.EVENT_READ, None)
        self.log.info("listening on http://%s:%d%s", *self.address, self.config.path)
        self.listening()
        self._prune_keys()
        pruned = time.monotonic()
        try:
            while not self.stopping.is_set():
                for key, _ in waiting.select(0.5):
                    if key.data is None:
                        self._accept(server, waiting)
                    else:
                        waiting.unregister(key.fileobj)
                        self._work.put((key.fileobj, key.data[0]))
                now = time.monotonic()
                for key in list(waiting.get_map().values()):
                    if key.data is not None and now - key.data[1] > self.config.request_timeout:
                        waiting.unregister(key.fileobj)  # connected, and never sent anything
                        self._done(server, key.fileobj)
                if now - pruned > IDEM_PRUNE_EVERY:
                    self._prune_keys()
                    pruned = now
        finally:
            for key in list(waiting.get_map().values()):
                if key.data is not None:
                    self._done(server, key.fileobj)
            waiting.close()
            for _ in workers:
                self._work.put(None)
            server.server_close()
            deadline = time.monotonic() + self.config.request_timeout + 1
            for worker in workers:  # a request being served ends within request_timeout
                worker.join(max(0.0, deadline - time.monotonic()))

    def _accept(self, server: Any, waiting: Any) -> None:
        import selectors

        try:
            request, client_address = server.socket.accept()
        except OSError:
            return
        with self._counts_lock:
            full = self._connections >= self.config.max_connections
            self._connections += not full
        if full:
            _refuse_at_once(request, self.config.retry_after)
            server.shutdown_request(request)
            return
        waiting.register(request, selectors.EVENT_READ, (client_address, time.monotonic()))

    def _done(self, server: Any, request: Any) -> None:
        server.shutdown_request(request)
        with self._counts_lock:
            self._connections -= 1

    def _worker(self, server: Any) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            request, client_address = item
            try:
                server.finish_request(request, client_address)
            except Exception as exc:
                self.log.debug("connection from %s ended: %r", client_address[0], exc)
            finally:
                self._done(server, request)

    def others_waiting(self) -> bool:
        """Connections wait for a worker (so an idle one should give its worker up)."""
        return not self._work.empty()

    def counted(self, name: str) -> None:
        with self._counts_lock:
            self.count(name)

    # -- requests ------------------------------------------------------------

    def accept(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        """Parse ``body``, commit its events, and say what to answer (or raise Refused)."""
        kind = content_type(headers.get("Content-Type"))
        events = self.parse(kind, body)
        key = headers.get("Idempotency-Key")
        if key is not None and not (
            0 < len(key) <= IDEM_MAX_LENGTH and key.isascii() and key.isprintable()
        ):
            raise Refused(
                400, f"Idempotency-Key must be 1 to {IDEM_MAX_LENGTH} printable ASCII characters"
            )
        if key is None:
            self.commit(events, None)
            return 200, {"accepted": len(events)}
        with self._keys_lock:
            if key in self._keys_in_flight:
                raise Refused(409, "a request with this Idempotency-Key is being served; retry")
            self._keys_in_flight.add(key)
        try:
            seen = self.seen_key(key)
            if seen is not None:
                self.counted("duplicates")
                return 200, {"accepted": 0, "duplicate": True, "first_seen": seen}
            self.commit(events, {IDEM_PREFIX + key: _now_text()})
            return 200, {"accepted": len(events)}
        finally:
            with self._keys_lock:
                self._keys_in_flight.discard(key)

    def parse(self, kind: str, body: bytes) -> list[Event]:
        """The events a body holds, or Refused(400) saying where it is wrong."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Refused(
                400, f"the body is not UTF-8: invalid byte at offset {exc.start}"
            ) from None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise Refused(
                400,
                f"invalid JSON at line {exc.lineno} column {exc.colno} (character {exc.pos}):"
                f" {exc.msg}",
            ) from None
        except RecursionError:
            raise Refused(
                400,
                "the JSON is nested too deep (arrays and objects within each other);"
                " send it flatter",
            ) from None
        except ValueError as exc:  # not a JSONDecodeError: an integer over Python's limit
            raise Refused(
                400,
                f"the JSON cannot be read: {exc} (a number that long is better sent as a string)",
            ) from None
        if kind == JSON:
            items = value if isinstance(value, list) else [value]
            events = [self.event(self.config.type, item) for item in items]
        elif kind == STRUCTURED:
            events = [self.from_cloudevent(value, None)]
        else:
            if not isinstance(value, list):
                raise Refused(400, f"a {BATCH} body is a JSON array of CloudEvents")
            events = [self.from_cloudevent(item, i) for i, item in enumerate(value)]
        if len(events) > self.config.max_events:
            raise Refused(
                413, f"{len(events)} events in one request; at most {self.config.max_events}"
            )
        return events

    def from_cloudevent(self, value: Any, index: int | None) -> Event:
        """An event from a CloudEvent in structured mode: its id, type, time, subject
        and data are kept; its source becomes this source's."""
        where = "" if index is None else f"event {index} (counting from 0): "
        if not isinstance(value, dict):
            raise Refused(400, f"{where}a CloudEvent is a JSON object")
        if value.get("specversion") != "1.0":
            raise Refused(400, f'{where}specversion must be "1.0"')
        for name in ("id", "source", "type"):
            if not isinstance(value.get(name), str) or not value[name]:
                raise Refused(400, f"{where}{name} must be a non-empty string")
        if "data_base64" in value:
            data: Any = {"data_base64": value["data_base64"]}
        else:
            data = value.get("data")
        event = Event(type=value["type"], source=self.name, data=data, subject=value.get("subject"))
        event.id = value["id"]
        if value.get("time") is not None:
            try:
                event.time = canonical_time(value["time"])
            except ValueError as exc:
                raise Refused(400, f"{where}{exc}") from None
        return event

    def commit(self, events: list[Event], checkpoint: dict[str, str | None] | None) -> None:
        """Commit, waiting at most queue_wait for room; Refused(503) if it could not.

        Until a request has waited queue_wait in vain, every request may wait (a full
        queue cannot be told from a slow commit sooner). From then until something is
        committed the queue is known to be full: the requests still waiting are
        answered 503 at once, and so are new ones, but for one at a time (the probe)
        that waits queue_wait to see whether room came.
        """
        probing = False
        if self.stopping.full:
            if not self._probe.acquire(blocking=False):
                self.counted("refused_full")
                raise self._busy("the queue is full and another request waits for room")
            probing = True
        try:
            self.stopping.limit(time.monotonic() + self.config.queue_wait, probing)
            try:
                self.emit_many(events, checkpoint=checkpoint)
            except ValueError as exc:  # an event that cannot be queued: none were accepted
                raise Refused(400, _which_event(events, exc)) from None
            except TooManyAtOnce as exc:  # sent again, it would be refused again
                raise Refused(413, str(exc)) from None
            except QueueError as exc:
                if not self.stopping.expired():
                    raise self._busy(f"the queue cannot take the events now: {exc}") from None
                self.counted("refused_full")
                if not self.stopping.waited():  # another request's wait ran out first
                    raise self._busy(
                        "the queue is full: another request waited"
                        f" {self.config.queue_wait:g}s for room in vain"
                    ) from None
                self.stopping.full = True
                raise self._busy(
                    f"the queue is full and no room came within {self.config.queue_wait:g}s"
                ) from None
            finally:
                self.stopping.limit(None)
            if events:  # room came (a request with no events learnt nothing of it)
                self.stopping.full = False
        finally:
            if probing:
                self._probe.release()

    def _busy(self, message: str) -> Refused:
        return Refused(
            503,
            f"{message}; nothing was accepted, send again later",
            {"Retry-After": str(self.config.retry_after)},
        )

    # -- idempotency keys ------------------------------------------------------

    def seen_key(self, key: str) -> str | None:
        """When the key was first committed, if it is remembered."""
        wanted = IDEM_PREFIX + key
        for found, value in self.checkpoint_range(wanted):
            if found == wanted:
                return value
            break
        return None

    def _prune_keys(self) -> None:
        """Forget idempotency keys older than idempotency_ttl."""
        cutoff = time.time() - self.config.idempotency_ttl
        old: dict[str, str | None] = {}
        for key, value in self.checkpoint_range(IDEM_PREFIX):
            try:
                seen = _parse_time(value)
            except ValueError:
                seen = 0.0
            if seen < cutoff:
                old[key] = None
        if old:
            try:
                self.save_checkpoint(old)
            except QueueError as exc:
                self.log.warning("cannot forget %d old idempotency keys now: %s", len(old), exc)


def _which_event(events: list[Event], error: ValueError) -> str:
    """The refusal of a request with an event that cannot be queued, naming which one."""
    if len(events) > 1:
        for i, event in enumerate(events):
            try:
                check_event(event)
                encode_data(event.data)
            except ValueError as exc:
                return f"event {i} (counting from 0): {exc}"
    return str(error)


def _now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _parse_time(text: str) -> float:
    import calendar

    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


def content_type(header: str | None) -> str:
    """The media type of a Content-Type header, lower case, without parameters."""
    kind = (header or "").split(";", 1)[0].strip().lower()
    if kind not in CONTENT_TYPES:
        shown = repr(header) if header else "none"
        raise Refused(
            415, f"Content-Type {shown} is not accepted; send one of {', '.join(CONTENT_TYPES)}"
        )
    if header and "charset=" in header.lower():
        charset = header.lower().split("charset=", 1)[1].split(";")[0].strip().strip('"')
        if charset not in ("utf-8", "utf8"):
            raise Refused(415, f"charset {charset} is not accepted; send UTF-8")
    return kind


def _error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode()


def _refuse_at_once(request: socket.socket, retry_after: int) -> None:
    """Answer 503 to a connection over max_connections, without reading it."""
    body = _error_body(503, "too many connections; send again later")
    head = (
        f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {JSON}\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: {retry_after}\r\nConnection: close\r\n\r\n"
    )
    try:
        request.settimeout(0.5)
        request.sendall(head.encode() + body)
    except OSError:
        pass


def _make_handler(source: HttpSource) -> type:
    import hmac
    from http.server import BaseHTTPRequestHandler

    config = source.config
    token = config.token.encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "edge-agent"
        sys_version = ""

        def setup(self) -> None:
            self.connection = self.request
            self.raw = _DeadlineRaw(self.connection)
            self.raw.deadline = time.monotonic() + config.request_timeout
            self.rfile = io.BufferedReader(self.raw, 65536)
            self.wfile = self.connection.makefile("wb", 0)

        def handle(self) -> None:
            self.close_connection = True
            self.handle_one_request()  # its first bytes are here (see HttpSource.run)
            while not self.close_connection and config.keepalive_timeout > 0:
                if not self._wait_for_request(config.keepalive_timeout):
                    return
                self.raw.deadline = time.monotonic() + config.request_timeout
                self.handle_one_request()

        def _wait_for_request(self, most: float) -> bool:
            """Wait until a request's first byte is here; False to close instead."""
            import select

            started = time.monotonic()
            while True:
                if self._buffered():
                    return True
                if self.raw.eof or source.stopping.is_set():
                    return False
                waited = time.monotonic() - started
                if waited >= most:
                    return False
                if waited >= IDLE_YIELD and source.others_waiting():
                    return False  # give the worker to a connection that has something
                readable, _, _ = select.select([self.connection], [], [], 0.1)
                if readable:
                    return True

        def _buffered(self) -> bool:
            """Bytes of a next request already received (read ahead, or pipelined)."""
            self.raw.nonblocking = True
            try:
                return bool(self.rfile.peek(1))
            except (BlockingIOError, TimeoutError, OSError):
                return False
            finally:
                self.raw.nonblocking = False

        def handle_one_request(self) -> None:
            self._answered = False
            try:
                super().handle_one_request()  # catches TimeoutError: closes, answers nothing
            except TimeoutError:
                self.close_connection = True
            late = time.monotonic() >= self.raw.deadline
            if late and not self._answered and not self.raw.eof:
                self.close_connection = True
                source.counted("refused_408")
                self._answer(408, "the request did not arrive whole within request_timeout")

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would flood the journal

        def send_error(self, code: int, message: str | None = None, explain=None) -> None:
            # http.server's own refusals (a malformed request line, headers too long).
            self.close_connection = True
            self._answer(code, message or self.responses.get(code, ("error",))[0])

        def do_GET(self) -> None:
            self._not_allowed()

        do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

        def _not_allowed(self) -> None:
            if self._path() != config.path:
                return self._answer(404, f"no such path; events are posted to {config.path}")
            self._drain_body()
            self._answer(405, "events are sent with POST", {"Allow": "POST"})

        def _path(self) -> str:
            return self.path.split("?", 1)[0]

        def handle_expect_100(self) -> bool:
            # "100 Continue" is sent once the request is found acceptable (_read_body),
            # so a client that waits for it never sends a body that is refused anyway.
            self._expects_100 = True
            return True

        def do_POST(self) -> None:
            source.counted("requests")
            self._unread = True
            try:
                if self._path() != config.path:
                    raise Refused(404, f"no such path; events are posted to {config.path}")
                self._authorise()
                content_type(self.headers.get("Content-Type"))
                body = self._read_body()
                status, answer = source.accept(self.headers, body)
            except Refused as refused:
                source.counted(f"refused_{refused.status}")
                if self._unread:
                    self._drain_body()
                self._answer(refused.status, refused.message, refused.headers)
                if self._unread and self.close_connection:
                    self._linger()
                return
            except TimeoutError:  # the body did not come whole within request_timeout
                self.close_connection = True
                source.counted("refused_408")
                self._answer(408, "the request did not arrive whole within request_timeout")
                return
            except Exception as exc:
                source.log.exception("a request failed: %r", exc)
                self._answer(500, f"the agent failed to take the request: {exc!r}")
                return
            self._send(status, json.dumps(answer).encode())

        def _authorise(self) -> None:
            if not token:
                return
            got = self.headers.get("Authorization", "")
            scheme, _, value = got.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token):
                raise Refused(
                    401,
                    "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                    {"WWW-Authenticate": 'Bearer realm="edge-agent"'},
                )

        def _length(self) -> int | None:
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                raise Refused(411, "send the body with a Content-Length, not chunked")
            text = self.headers.get("Content-Length")
            if text is None:
                return None
            if not text.strip().isdigit():
                self.close_connection = True
                raise Refused(400, f"Content-Length {text!r} is not a number")
            return int(text)

        def _drain_body(self) -> None:
            """Read (and drop) a small body, so the connection can be kept; else close it."""
            try:
                length = self._length()
            except Refused:
                return
            if length and length <= 65536 and not getattr(self, "_expects_100", False):
                self.rfile.read(length)
                self._unread = False
            elif length:
                self.close_connection = True
            else:
                self._unread = False

        def _linger(self) -> None:
            """After refusing a body unread: drop what the client still sends, for a moment,
            so that it reads the answer instead of a reset connection (then close)."""
            try:
                self.connection.shutdown(socket.SHUT_WR)
                self.raw.deadline = time.monotonic() + LINGER
                while self.rfile.read1(65536):
                    pass
            except OSError:
                pass

        def _read_body(self) -> bytes:
            length = self._length()
            if length is None:
                self.close_connection = True
                raise Refused(411, "send a Content-Length header")
            if length > config.max_body_bytes:
                self.close_connection = True  # the body is not read
                raise Refused(
                    413,
                    f"the body is {length} bytes; at most {config.max_body_bytes} (max_body_bytes)",
                )
            if getattr(self, "_expects_100", False):
                self._expects_100 = False
                self.send_response_only(100)
                self.end_headers()
            body = self.rfile.read(length)
            self._unread = False
            if len(body) < length:
                self.close_connection = True
                raise Refused(400, f"the body ended after {len(body)} of {length} bytes")
            encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding == "gzip":
                inflate = zlib.decompressobj(wbits=31)
                try:
                    body = inflate.decompress(body, config.max_body_bytes + 1)
                except zlib.error as exc:
                    raise Refused(400, f"the gzip body is damaged: {exc}") from None
                if len(body) > config.max_body_bytes:
                    raise Refused(
                        413, f"the body is over max_body_bytes ({config.max_body_bytes}) unzipped"
                    )
            elif encoding != "identity":
                raise Refused(415, f"Content-Encoding {encoding} is not accepted; gzip or none")
            return body

        def _answer(self, status: int, message: str, headers: dict | None = None) -> None:
            self._send(status, _error_body(status, message), headers)

        def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
            self._answered = True
            try:
                self.connection.settimeout(config.request_timeout)
                self.send_response_only(status)
                self.send_header("Content-Type", JSON)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                if not self.close_connection and source.others_waiting():
                    self.close_connection = True  # others wait: the client reconnects
                if self.close_connection or config.keepalive_timeout == 0:
                    self.close_connection = True
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                self.close_connection = True

    return Handler


@hookimpl
def register_sources(register):
    register("http", HttpSource)
