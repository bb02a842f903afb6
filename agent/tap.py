"""``edge-agent tap``: a live view of the events a running agent commits.

The agent listens on a Unix socket, ``STATE_DIR/tap.sock`` (mode 0600, only
the agent's own user and root may connect; no network listener). A tapper
connects, sends one JSON line with its selection (``{"sources": [...],
"types": [...]}``: shell-style globs), gets one JSON line back (``{"tap": "ok",
"agent": ID}`` or ``{"error": TEXT}``), then one line per committed event it
selected: the CloudEvents JSON the ``stdout`` sink writes. When it falls behind,
a line ``{"missed": N}`` says how many events it was not shown.

Cost: while nobody taps, the writer checks one attribute (``Writer.tapped``)
per commit and does nothing else. With tappers, the writer hands each one the
events it selected (a list append under a short lock); each tapper has its own
thread that serialises and sends, and a bounded buffer: when it is full, the
events are counted as missed for that tapper, never held back from the queue.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import secrets
import socket
import struct
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, BinaryIO, TextIO

from edge_agent.event import Event, QueuedEvent, encode_attributes

log = logging.getLogger("edge_agent.tap")

SOCKET_NAME = "tap.sock"
#: Events a tapper may have waiting to be sent; beyond it they are counted as missed.
TAPPER_BUFFER = 5000
#: Tappers at once; one more is refused with a message.
MAX_TAPPERS = 16
#: How long a new tapper has to send its selection.
HELLO_TIMEOUT = 5.0
#: How often an idle tapper's thread looks whether its client went away.
IDLE_CHECK = 2.0
#: A tapper's thread gathers what comes within this long into one send (fewer
#: wake-ups and system calls for the agent; a person does not see 50 ms).
GATHER = 0.05
#: Longest path ``bind``/``connect`` take (108 bytes with the final NUL, on Linux).
_MAX_SUN_PATH = 107
MISSED_LINE = "tap: {count} events not shown (the tap could not keep up)"


class TapError(Exception):
    """The tap could not be set up or reached; the message says why and what to do."""


@contextlib.contextmanager
def _address(path: str) -> Iterator[str]:
    """``path`` as bind/connect can take it: through ``/proc/self/fd`` when it is too long."""
    if len(os.fsencode(path)) <= _MAX_SUN_PATH:
        yield path
        return
    folder, name = os.path.split(path)
    fd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def _globs(patterns: Sequence[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class _Tapper:
    """One connected client: its selection, its buffer and the thread that sends."""

    def __init__(
        self, conn: socket.socket, selection: Mapping[str, Any], agent_id: str, limit: int
    ) -> None:
        self.conn = conn
        self.agent_id = agent_id
        self.limit = limit
        self._sources = _globs(selection.get("sources") or ())
        self._types = _globs(selection.get("types") or ())
        self._wanted: dict[tuple[str, str], bool] = {}
        self._cond = threading.Condition()
        self._buffer: list[tuple[Event, str, int]] = []
        self._missed = 0
        self.closed = False
        self.missed_total = 0

    def wants(self, source: str, type_: str) -> bool:
        key = (source, type_)
        wanted = self._wanted.get(key)
        if wanted is None:
            wanted = (self._sources is None or bool(self._sources.match(source))) and (
                self._types is None or bool(self._types.match(type_))
            )
            if len(self._wanted) < 10000:
                self._wanted[key] = wanted
        return wanted

    def offer(self, items: Sequence[tuple[Event, str, int]]) -> None:
        """From the writer: keep what is selected and fits; count the rest as missed."""
        wants = self.wants
        matched = [item for item in items if wants(item[0].source, item[0].type)]
        if not matched:
            return
        with self._cond:
            room = self.limit - len(self._buffer)
            if room >= len(matched):
                self._buffer += matched
            else:
                if room > 0:
                    self._buffer += matched[:room]
                self._missed += len(matched) - max(room, 0)
            if len(self._buffer) == len(matched) or self._missed:
                self._cond.notify()  # the first since the last send: wake the sender

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)  # ends a send that waits for the client

    def _gone(self) -> bool:
        """The client closed its end (checked while nothing is sent)."""
        try:
            return self.conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _line(self, item: tuple[Event, str, int]) -> str:
        event, data_json, sequence = item
        return QueuedEvent(
            0,
            event.id,
            event.source,
            event.type,
            event.time,
            event.subject,
            sequence,
            data_json,
            self.agent_id,
            encode_attributes(event),
        ).to_cloudevent_json()

    def run(self) -> None:
        """Send what the writer offered until the client or the agent goes away."""
        try:
            while True:
                with self._cond:
                    if not (self._buffer or self._missed or self.closed):
                        self._cond.wait(IDLE_CHECK)
                        if self._buffer and not self.closed:
                            self._cond.wait(GATHER)  # woken early only by close()
                    if self.closed:
                        return
                    items, self._buffer = self._buffer, []
                    missed, self._missed = self._missed, 0
                if not items and not missed:
                    if self._gone():
                        return
                    continue
                lines = [self._line(item) for item in items]
                if missed:
                    self.missed_total += missed
                    lines.append(json.dumps({"missed": missed}))
                self.conn.sendall(("\n".join(lines) + "\n").encode())
        except OSError:
            return  # the client went away (or the agent is stopping)
        except Exception as exc:  # a tap must never take more than itself down
            log.warning("a tap ended on an error: %r", exc)
        finally:
            with self._cond:
                self.closed = True
            with contextlib.suppress(OSError):
                self.conn.close()


class TapServer:
    """The agent's end: the socket, its tappers, and the hook into the writer.

    ``writer`` is anything with a ``tapped`` attribute: it is set to
    :meth:`offer` while someone taps and to None otherwise.
    """

    def __init__(self, state_dir: str, agent_id: str, writer: Any) -> None:
        self.path = os.path.join(state_dir, SOCKET_NAME)
        self.agent_id = agent_id
        self.writer = writer
        self.limit = TAPPER_BUFFER
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._tappers: tuple[_Tapper, ...] = ()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen on ``STATE_DIR/tap.sock``, replacing a stale one (the caller holds the
        state directory's lock, so no other agent owns it). Raises TapError."""
        folder = os.path.dirname(self.path)
        temporary = os.path.join(folder, f".tap-{secrets.token_hex(4)}.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with _address(temporary) as address:
                sock.bind(address)
            try:
                os.chmod(temporary, 0o600)  # owner only, before it has its name
                os.replace(temporary, self.path)  # a stale socket of a killed agent goes
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
            sock.listen(MAX_TAPPERS)
            info = os.stat(self.path)
        except OSError as exc:
            sock.close()
            raise TapError(
                f"cannot listen on {self.path} for edge-agent tap: {exc.strerror or exc};"
                " the agent runs without a tap"
            ) from exc
        self._sock = sock
        self._inode = (info.st_dev, info.st_ino)
        # The thread gets the socket itself: stop() clears self._sock, maybe before the
        # thread first runs.
        self._thread = threading.Thread(target=self._accept, args=(sock,), name="tap", daemon=True)
        self._thread.start()

    @property
    def tappers(self) -> int:
        """How many clients tap now."""
        return sum(not t.closed for t in self._tappers)

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # the server was stopped
            threading.Thread(
                target=self._serve, args=(conn,), name="tap-client", daemon=True
            ).start()

    def _refuse(self, conn: socket.socket, message: str) -> None:
        with contextlib.suppress(OSError):
            conn.sendall((json.dumps({"error": message}) + "\n").encode())
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid not in (0, os.getuid()):
                self._refuse(conn, "only the agent's own user and root may tap it")
                return
            conn.settimeout(HELLO_TIMEOUT)
            with conn.makefile("rb") as reader:
                hello = reader.readline(65536)
            selection = json.loads(hello)
            if not isinstance(selection, dict) or not all(
                isinstance(selection.get(key, []), list)
                and all(isinstance(glob, str) for glob in selection.get(key, []))
                for key in ("sources", "types")
            ):
                raise ValueError('not {"sources": [GLOB...], "types": [GLOB...]}')
            conn.settimeout(None)
        except (OSError, ValueError) as exc:
            self._refuse(conn, f"the tap expects one JSON line with the selection: {exc}")
            return
        with self._lock:
            live = tuple(t for t in self._tappers if not t.closed)
            if len(live) >= MAX_TAPPERS:
                self._tappers = live
                self._refuse(conn, f"{MAX_TAPPERS} tappers already; try again once one ends")
                return
            # Taking events from here on; its thread sends them once the answer is out.
            tapper = _Tapper(conn, selection, self.agent_id, self.limit)
            self._tappers = (*live, tapper)
            self.writer.tapped = self.offer
        try:
            conn.sendall((json.dumps({"tap": "ok", "agent": self.agent_id}) + "\n").encode())
        except OSError:
            tapper.close()
        log.info("a tapper connected (%d tapping)", len(self._tappers))
        try:
            tapper.run()
        finally:
            with self._lock:
                self._tappers = tuple(t for t in self._tappers if t is not tapper and not t.closed)
                if not self._tappers:
                    self.writer.tapped = None
            if tapper.missed_total:
                log.info("a tapper left; it missed %d events", tapper.missed_total)

    def offer(self, events: Sequence[tuple[Event, str]], sequences: Mapping[str, int]) -> None:
        """From the writer, right after a commit: ``events`` with their data as stored;
        ``sequences`` is each source's last sequence after it."""
        last = dict(sequences)
        items: list[tuple[Event, str, int]] = []
        for event, data_json in reversed(events):
            sequence = last.get(event.source, 0)
            last[event.source] = sequence - 1
            items.append((event, data_json, sequence))
        items.reverse()
        for tapper in self._tappers:
            if not tapper.closed:
                tapper.offer(items)

    def stop(self) -> None:
        """Stop listening, remove the socket (if it is still ours), end every tap."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self.writer.tapped = None
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        sock.close()
        with contextlib.suppress(OSError):
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == self._inode:
                os.unlink(self.path)
        with self._lock:
            tappers, self._tappers = self._tappers, ()
        for tapper in tappers:
            tapper.close()
        if self._thread is not None:
            self._thread.join(5.0)


# -- the client: ``edge-agent tap`` ------------------------------------------------


def connect(
    state_dir: str, sources: Sequence[str], types: Sequence[str]
) -> tuple[socket.socket, BinaryIO, str]:
    """Connect to the agent of ``state_dir`` and send the selection.

    Returns the socket, a reader of the lines that follow, and the agent's id.

    Raises TapError with a message for a person when no agent listens there.
    """
    path = os.path.join(state_dir, SOCKET_NAME)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with _address(path) as address:
            sock.connect(address)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise TapError(_not_running(state_dir, path)) from exc
    except PermissionError as exc:
        sock.close()
        raise TapError(
            f"cannot connect to {path}: permission denied; run edge-agent tap as the agent's"
            " user or as root"
        ) from exc
    except OSError as exc:
        sock.close()
        raise TapError(f"cannot connect to {path}: {exc.strerror or exc}") from exc
    reader = sock.makefile("rb")
    try:
        sock.sendall((json.dumps({"sources": list(sources), "types": list(types)}) + "\n").encode())
        sock.settimeout(HELLO_TIMEOUT * 2)
        reply = json.loads(reader.readline(65536) or b"null")
        sock.settimeout(None)
    except (OSError, ValueError) as exc:
        reader.close()
        sock.close()
        raise TapError(f"the agent at {path} did not answer the tap: {exc}") from exc
    if not isinstance(reply, dict) or reply.get("tap") != "ok":
        reader.close()
        sock.close()
        error = reply.get("error") if isinstance(reply, dict) else None
        raise TapError(f"the agent at {path} refused the tap: {error or reply!r}")
    return sock, reader, str(reply.get("agent", "?"))


def _not_running(state_dir: str, path: str) -> str:
    from edge_agent.statedir import holder

    try:
        pid = holder(state_dir)
    except OSError:
        pid = None
    if pid is not None:
        return (
            f"the edge-agent running on state dir {state_dir} (pid {pid}) does not answer on"
            f" {path}; its log says why (an older version has no tap: restart it)"
        )
    return (
        f"no edge-agent is running on state dir {state_dir} (nothing listens on {path});"
        " start it (systemctl start edge-agent), or pass -c with the config of the agent"
        " to tap"
    )


def human_line(line: str) -> str:
    """A short line for a person: time, source, type, subject and the data, cut short."""
    try:
        event = json.loads(line)
        source = event.get("source", "").rsplit("/", 1)[-1]
        data = event.get("data", event.get("data_base64"))
        data_text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    except (ValueError, AttributeError):
        return line
    if len(data_text) > 160:
        data_text = data_text[:159] + "…"
    parts = [event.get("time", "")[11:23], source, event.get("type", "")]
    if event.get("subject") is not None:
        parts.append(str(event["subject"]))
    parts.append(data_text)
    return " ".join(parts)


def follow(reader: BinaryIO, as_json: bool, out: TextIO, err: TextIO) -> bool:
    """Print what the agent sends until it closes the tap; True if it did (False: the
    reader of ``out`` went away). Writes what came in one read, then flushes once."""
    rest = b""
    try:
        while chunk := reader.read1(65536):
            *lines, rest = (rest + chunk).split(b"\n")
            shown = []
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                if line.startswith('{"missed"'):
                    note = MISSED_LINE.format(count=json.loads(line).get("missed", 0))
                    if as_json:
                        err.write(note + "\n")
                        err.flush()
                    else:
                        shown.append(note)
                    continue
                shown.append(line if as_json else human_line(line))
            if shown:
                out.write("\n".join(shown) + "\n")
                out.flush()
    except BrokenPipeError:
        return False
    return True


def run(state_dir: str, sources: Sequence[str], types: Sequence[str], as_json: bool) -> int:
    """``edge-agent tap``: the exit code (0, or 1 when no agent runs)."""
    try:
        sock, reader, agent_id = connect(state_dir, sources, types)
    except TapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(
            f"tap: showing events as edge-agent {agent_id} commits them (state dir"
            f" {state_dir}); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        ended = follow(reader, as_json, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        return 0
    finally:
        reader.close()
        sock.close()
    if not ended:
        # The reader went away (`| head`): no "Broken pipe" at exit either.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    print(f"tap: edge-agent {agent_id} stopped; the tap ended", file=sys.stderr)
    return 0
