"""The state directory has one owner: an exclusive lock, and who holds it.

``edge-agent run`` takes an exclusive ``flock`` on ``STATE_DIR/lock`` before it
opens the queue, and writes its pid into the file. The kernel releases the
lock when the process ends, however it ends, so a stale lock file never keeps
an agent from starting. A second agent on the same state directory, or a
command that writes to the queue (``queue purge``, ``queue dead retry|purge``),
finds the lock taken and refuses, naming the pid that holds it.

Read-only commands (``status``, ``queue stats``, ``queue peek``, ``queue dead
list``) take no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os

from edge_agent.errors import AgentError, QueueError

LOCK_FILE = "lock"

log = logging.getLogger("edge_agent")


class StateDirBusy(AgentError):
    """Another process holds the state directory's lock; ``pid`` is that process, if known."""

    def __init__(self, state_dir: str, pid: int | None, doing: str) -> None:
        self.state_dir = state_dir
        self.pid = pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"state dir {state_dir} is in use by {who} (an edge-agent that is running); {doing}"
        )


class StateDirLock:
    """The exclusive lock on one state directory, held for the life of the process."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, LOCK_FILE)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(
        self,
        doing: str = "stop it first (systemctl stop edge-agent), or give this agent its own"
        " [agent] state_dir",
    ) -> None:
        """Take the lock, creating the state directory if needed.

        Raises :class:`StateDirBusy` (``doing`` says what to do about it) when
        another process holds it, and QueueError when the directory or the
        lock file cannot be created.
        """
        if self._fd is not None:
            return
        try:
            os.makedirs(self.state_dir, exist_ok=True)
            # CLOEXEC: a command started by a source (exec) must not inherit the
            # lock and keep holding it after the agent has died.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise QueueError(
                f"cannot create the state directory's lock file {self.path}: {exc.strerror};"
                " set [agent] state_dir to a writable local folder"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise StateDirBusy(self.state_dir, pid, doing) from None
        except OSError as exc:
            os.close(fd)
            raise QueueError(
                f"cannot lock {self.path}: {exc.strerror}; is the state directory on a local"
                " filesystem?"
            ) from exc
        with contextlib.suppress(OSError):  # the pid is for people; the lock is what counts
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def check(self) -> None:
        """Take the lock again if its file was deleted or replaced (a clean-up job, a
        person); raise :class:`StateDirBusy` if another agent took it meanwhile.

        A lock on a file that no longer has its name guards nothing: a second
        agent would make a new file and lock that. Called about once a second.
        """
        if self._fd is None or not os.path.isdir(self.state_dir):
            return  # a state dir that is gone is the queue's check's to report
        try:
            named = os.stat(self.path)
            held = os.fstat(self._fd)
            if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                return
        except FileNotFoundError:
            pass
        except OSError:
            return  # cannot tell now; the next check can
        old, self._fd = self._fd, None
        try:
            self.acquire(
                "another agent started on this state dir after its lock file was deleted;"
                " this one stops so that only one runs"
            )
        except QueueError:
            self._fd = old  # cannot make the file now: keep what we have, try again later
            return
        except StateDirBusy:
            os.close(old)
            raise
        os.close(old)
        log.warning(
            "the state dir's lock file %s was deleted or replaced while the agent ran; it"
            " was made and locked again. Leave it in place: it keeps a second agent off.",
            self.path,
        )

    def release(self) -> None:
        """Let go of the lock (the kernel also does when the process ends)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> StateDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def holder(state_dir: str) -> int | None:
    """The pid of the process that holds ``state_dir``'s lock now, or None if nobody does.

    Reads ``/proc/locks`` rather than trying the lock: a probe would, for an
    instant, hold the lock itself and could make an agent starting just then
    refuse to run. Raises OSError when it cannot tell (no lock file: an agent
    of an older version, or none ever ran; no ``/proc/locks``).
    """
    path = os.path.join(state_dir, LOCK_FILE)
    info = os.stat(path)
    with open("/proc/locks", encoding="ascii") as handle:
        lines = handle.read().splitlines()
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; "->" marks a waiter.
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[2] != "->" and parts[5] == wanted:
            with contextlib.suppress(ValueError):
                return int(parts[4])
    return None
