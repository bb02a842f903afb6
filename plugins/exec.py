"""The ``exec`` source: the output of commands, for anything written in any language.

Two modes. ``interval``: run the command every ``interval`` and emit one
event with its exit code, output and duration. ``stream``: run a long-lived
command and emit one event per line it prints, starting it again with backoff
when it exits. Output that is valid JSON is sent parsed, anything else as
text. Commands are argument lists, never passed to a shell unless
``shell = true`` says so.

A run ends at ``timeout`` plus ``kill_grace`` whatever its processes do: the
command starts in a session (process group) of its own and, where the agent
may create cgroups (cgroup v2), in a cgroup of its own, so that at the end of
a run every process it started is killed, also one that called ``setsid``.
Without a cgroup, such an escaped process is found by the output pipe it
holds and killed; one that holds nothing of the run is out of reach.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from edge_agent import ByteSize, Duration, Event, Source, hookimpl, option
from edge_agent.backoff import Backoff
from edge_agent.errors import QueueError

#: How often a read looks at whether the source must stop.
TICK = 0.2
READ_CHUNK = 65536
#: A command that cannot start is logged at most this often.
WARN_EVERY = 60.0
#: How long what is left in the pipes is read once a run's processes are gone.
DRAIN_TIME = 1.0
_WHY = {
    "eof": "the command exited",
    "timeout": "its timeout",
    "stopped": "the source stopped",
    "failed": "an error",
}


def parse_output(text: str) -> tuple[str, Any]:
    """("json", value) when ``text`` is JSON, else ("text", text)."""
    stripped = text.strip()
    if stripped:
        try:
            return "json", json.loads(stripped)
        except ValueError:
            pass
    return "text", text


class StartError(Exception):
    """The command could not be started; the message says why, for an operator."""


class ExecSource(Source):
    """Emits ``exec.output``: one per run (interval) or one per line (stream)."""

    @dataclass(kw_only=True)
    class Config:
        command: list[str] | str = option(
            example=["/bin/uptime"],
            doc='["/usr/bin/sensors", "-j"]; a single string only with shell = true.',
        )
        shell: bool = option(False, doc="Run command through /bin/sh -c. Off unless you must.")
        mode: Literal["interval", "stream"] = option(
            "interval", doc='"interval": run every interval; "stream": run once, read lines.'
        )
        interval: Duration = option(60.0, above=0, doc="Time between runs (interval mode).")
        timeout: Duration = option(
            10.0, above=0, doc="Kill a run that takes longer (interval mode)."
        )
        kill_grace: Duration = option(
            2.0, min=0, doc="Time between SIGTERM and SIGKILL when a run is ended."
        )
        env: dict[str, str] = option({}, doc="Extra environment variables.")
        cwd: str = option("", doc="Working directory. Default: the agent's.")
        max_output_bytes: ByteSize = option(
            ByteSize(1024 * 1024),
            min=1,
            doc="Most stdout kept per run (per line in stream mode); the rest is cut.",
        )
        stderr_tail_bytes: int = option(2048, min=0, doc="How much of the end of stderr to send.")
        restart_min: Duration = option(
            1.0, above=0, doc="Shortest wait before restarting (stream mode)."
        )
        restart_max: Duration = option(
            60.0, above=0, doc="Longest wait before restarting (stream mode)."
        )

        def __post_init__(self) -> None:
            if isinstance(self.command, str) and not self.shell:
                raise ValueError(
                    "command is a string but shell is false: write it as a list of arguments"
                    ' (["ls", "-l"]), or set shell = true to run it through /bin/sh'
                )
            if isinstance(self.command, list) and not self.command:
                raise ValueError("command is empty")
            if self.interval <= 0 or self.timeout <= 0:
                raise ValueError("interval and timeout must be more than 0")
            if self.kill_grace < 0 or self.max_output_bytes < 1:
                raise ValueError("kill_grace must be 0 or more and max_output_bytes at least 1")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cgroups: _Cgroups | None = None
        self._start_failures_unsaid = 0
        self._last_start_warning = -WARN_EVERY

    @property
    def argv(self) -> list[str]:
        command = self.config.command
        if self.config.shell:
            return ["/bin/sh", "-c", command if isinstance(command, str) else " ".join(command)]
        return list(command)

    @property
    def command_text(self) -> str:
        command = self.config.command
        return command if isinstance(command, str) else " ".join(command)

    def run(self) -> None:
        if self._cgroups is None:
            self._cgroups = _Cgroups.find(self.name, self.log)
            self._cgroups.reap_earlier(self.command_text)
        if self.config.mode == "stream":
            self._stream()
        else:
            self._interval()

    # -- starting and ending a run ------------------------------------------------

    def _start(self) -> _Run:
        """Start the command, or raise StartError saying why it cannot start."""
        env = {**os.environ, **self.config.env}
        cwd = self.config.cwd or None
        if cwd is not None and not os.path.isdir(cwd):
            raise StartError(f"cwd {cwd} does not exist or is not a directory")
        argv = self.argv
        program = argv[0]
        if os.sep in program:
            if not os.path.isfile(os.path.join(cwd or "", program)):
                raise StartError(f"{program} does not exist")
            if not os.access(os.path.join(cwd or "", program), os.X_OK):
                raise StartError(f"{program} is not executable (chmod +x?)")
        elif shutil.which(program, path=env.get("PATH", os.defpath)) is None:
            raise StartError(f"{program} is not found in PATH ({env.get('PATH', os.defpath)})")
        assert self._cgroups is not None
        cgroup = self._cgroups.make()
        if cgroup is not None:
            # The command joins its cgroup before exec, so nothing it starts can escape it.
            argv = ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup, *argv]
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=env,
                start_new_session=True,  # its own process group, killed as one
            )
        except OSError as exc:
            self._cgroups.remove(cgroup)
            raise StartError(exc.strerror or str(exc)) from exc
        return _Run(process, cgroup, self._cgroups)

    def _start_failed(self, error: StartError, retry: float) -> None:
        """Count a failed start; say so at most once a minute."""
        self.count("start_failures")
        self._start_failures_unsaid += 1
        now = time.monotonic()
        if now - self._last_start_warning < WARN_EVERY:
            return
        self.log.warning(
            "cannot start %s: %s%s; trying again in %.1fs (said at most once a minute)",
            self.command_text,
            error,
            f" ({self._start_failures_unsaid} failures since last said)"
            if self._start_failures_unsaid > 1
            else "",
            retry,
        )
        self._last_start_warning = now
        self._start_failures_unsaid = 0

    def _end(self, run: _Run, why: str) -> None:
        """Kill what is left of a run and say what could not be killed."""
        left = run.end(self.config.kill_grace)
        if left:
            self.log.warning(
                "%s: processes %s left its process group and still hold its output after %s;"
                " they are left running and their output is no longer read (without a cgroup"
                " they cannot all be reached: see docs/sources/exec.md)",
                self.command_text,
                ", ".join(map(str, left)),
                why,
            )

    # -- interval -----------------------------------------------------------------

    def _interval(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                event = self._run_once()
            except StartError as error:
                self._start_failed(error, self.config.interval)
                event = self._result(None, b"", 0, f"cannot start: {error}", 0.0, False)
            if event is not None:
                self.emit_until_accepted([event])
            self.stopping.wait(max(0.0, self.config.interval - (time.monotonic() - started)))

    def _run_once(self) -> Event | None:
        """One run: its event, or None if the source was stopped during it."""
        started = time.monotonic()
        deadline = started + self.config.timeout
        limit = self.config.max_output_bytes
        kept = bytearray()
        seen = 0

        def take(chunk: bytes) -> None:
            nonlocal seen
            seen += len(chunk)
            if len(kept) < limit:
                kept.extend(chunk[: limit - len(kept)])

        run = self._start()
        ended = "failed"
        try:
            ended = run.read(take, self.config.stderr_tail_bytes, deadline, self.stopping)
            if ended == "eof":
                ended = run.wait_exit(deadline, self.stopping)
        finally:
            self._end(run, _WHY[ended])
            run.drain(take)
            run.close()
        if ended == "stopped":
            return None
        timed_out = ended == "timeout"
        if timed_out:
            self.count("timeouts")
            self.log.warning(
                "%s ran longer than %gs and was killed", self.command_text, self.config.timeout
            )
        if seen > limit:
            self.count("truncated")
            self.count("dropped_bytes", seen - limit)
        return self._result(
            run.process.returncode,
            bytes(kept),
            seen,
            run.stderr_text(),
            time.monotonic() - started,
            timed_out,
        )

    def _result(
        self,
        code: int | None,
        stdout: bytes,
        seen: int,
        stderr: str,
        duration: float,
        timed_out: bool,
    ) -> Event:
        output_format, output = parse_output(stdout.decode("utf-8", errors="replace"))
        return self.event(
            "exec.output",
            {
                "command": self.command_text,
                "exit_code": code,
                "format": output_format,
                "output": output,
                "stderr": stderr,
                "duration": round(duration, 3),
                "timed_out": timed_out,
                "truncated": seen > len(stdout),
                "output_bytes": seen,
            },
            subject=self.command_text,
        )

    # -- stream -------------------------------------------------------------------

    def _stream(self) -> None:
        backoff = Backoff(self.config.restart_min, self.config.restart_max)
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                run = self._start()
            except StartError as error:
                delay = backoff.next()
                self._start_failed(error, delay)
                self.stopping.wait(delay)
                continue
            lines = _Lines(self.config.max_output_bytes, self._emit_line)
            ended = "failed"
            try:
                ended = run.read(lines.feed, self.config.stderr_tail_bytes, None, self.stopping)
                if ended == "eof":
                    ended = run.wait_exit(None, self.stopping)
            finally:
                self._end(run, _WHY[ended])
                run.drain(lines.feed)  # what it printed before it was killed
                run.close()
                lines.finish()
            if self.stopping.is_set():
                return
            if time.monotonic() - started > self.config.restart_max:
                backoff.reset()
            delay = backoff.next()
            stderr_text = run.stderr_text().strip()
            self.log.warning(
                "%s exited with %s%s; starting it again in %.1fs",
                self.command_text,
                run.process.returncode,
                f" ({stderr_text[-200:]})" if stderr_text else "",
                delay,
            )
            self.stopping.wait(delay)

    def _emit_line(self, raw: bytes, length: int) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        output_format, output = parse_output(line)
        data: dict[str, Any] = {"command": self.command_text, "format": output_format}
        data["output"] = output
        if length > len(raw):
            self.count("truncated")
            self.count("dropped_bytes", length - len(raw))
            data.update(truncated=True, output_bytes=length)
        event = self.event("exec.output", data, subject=self.command_text)
        if self.emit_until_accepted([event]):
            return
        try:  # stopping: one more try, the writer still takes events while sources stop
            self.emit_many([event])
        except QueueError as exc:
            self.log.warning("the last line of %s was not committed: %s", self.command_text, exc)


class _Lines:
    """Splits a stream's bytes into lines of at most ``limit`` bytes, in bounded memory."""

    def __init__(self, limit: int, emit: Callable[[bytes, int], None]) -> None:
        self.limit = limit
        self.emit = emit
        self.partial = bytearray()
        self.length = 0  # bytes of the current line, also those cut off

    def feed(self, chunk: bytes) -> None:
        start = 0
        while start < len(chunk):
            end = chunk.find(b"\n", start)
            piece = chunk[start : len(chunk) if end < 0 else end]
            self.length += len(piece)
            room = self.limit - len(self.partial)
            if room > 0:
                self.partial.extend(piece[:room])
            if end < 0:
                return
            self._flush()
            start = end + 1

    def finish(self) -> None:
        """The stream ended: a last line without a newline is a line too."""
        if self.length:
            self._flush()

    def _flush(self) -> None:
        raw, length = bytes(self.partial), self.length
        self.partial.clear()
        self.length = 0
        self.emit(raw, length)


class _Run:
    """One start of the command: its processes, its pipes, and how to end all of them."""

    def __init__(self, process: subprocess.Popen, cgroup: str | None, cgroups: _Cgroups) -> None:
        assert process.stdout is not None and process.stderr is not None
        self.process = process
        self.cgroup = cgroup
        self.cgroups = cgroups
        self.fds = {process.stdout.fileno(): "stdout", process.stderr.fileno(): "stderr"}
        self.inodes = {os.fstat(fd).st_ino for fd in self.fds}
        self.stderr = b""
        self.stderr_keep = 0
        self._open = set(self.fds)

    def read(
        self,
        on_stdout: Callable[[bytes], None],
        stderr_keep: int,
        deadline: float | None,
        stopping: Any,
    ) -> str:
        """Read both pipes until they close ("eof"), the ``deadline`` ("timeout") or a stop
        ("stopped"), keeping the last ``stderr_keep`` bytes of stderr."""
        self.stderr_keep = stderr_keep
        poller = select.poll()
        for fd in self._open:
            poller.register(fd, select.POLLIN)
        while self._open:
            if stopping.is_set():
                return "stopped"
            wait = TICK
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return "timeout"
            for fd, _flags in poller.poll(wait * 1000):
                if not self._read_one(fd, on_stdout):
                    poller.unregister(fd)
        return "eof"

    def _read_one(self, fd: int, on_stdout: Callable[[bytes], None]) -> bool:
        """Read what is there; False once the pipe is closed."""
        chunk = os.read(fd, READ_CHUNK)
        if not chunk:
            self._open.discard(fd)
            return False
        if self.fds[fd] == "stdout":
            on_stdout(chunk)
        elif self.stderr_keep:
            self.stderr = (self.stderr + chunk)[-self.stderr_keep :]
        return True

    def drain(self, on_stdout: Callable[[bytes], None]) -> None:
        """Read what is already in the pipes once the run's processes are ended."""
        deadline = time.monotonic() + DRAIN_TIME
        for fd in list(self._open):
            os.set_blocking(fd, False)
            with contextlib.suppress(OSError):  # BlockingIOError: nothing more there
                while self._read_one(fd, on_stdout) and time.monotonic() < deadline:
                    pass

    def wait_exit(self, deadline: float | None, stopping: Any) -> str:
        """Wait for the command itself to exit once its output closed."""
        while not stopping.is_set():
            wait = TICK if deadline is None else min(TICK, deadline - time.monotonic())
            if wait <= 0:
                return "timeout"
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(wait)
                return "eof"
        return "stopped"

    def end(self, grace: float) -> list[int]:
        """Kill every process of the run: SIGTERM, then SIGKILL after ``grace``.

        Returns the processes left holding its output (only without a cgroup).
        """
        if self._alive():
            self._signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self._alive() and time.monotonic() < deadline:
                time.sleep(0.05)  # bounded by the grace
            if self._alive():
                self._signal(signal.SIGKILL)
                if self.cgroup is None:
                    for pid in _pipe_holders(self.inodes):
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5.0)  # SIGKILLed: gone at once, unless in the kernel
        left = _pipe_holders(self.inodes) if self.cgroup is None and self._open else []
        self.cgroups.remove(self.cgroup)
        return left

    def close(self) -> None:
        """Stop reading: close the pipes (a process still holding one gets EPIPE)."""
        self._open.clear()
        for pipe in (self.process.stdout, self.process.stderr):
            with contextlib.suppress(OSError):
                pipe.close()

    def _alive(self) -> bool:
        if self.process.poll() is None:
            return True
        if self.cgroup is not None:
            return _populated(self.cgroup)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, 0)
            return True
        return bool(self._open) and bool(_pipe_holders(self.inodes))

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)
        if self.cgroup is not None:
            if signum == signal.SIGKILL and os.path.exists(f"{self.cgroup}/cgroup.kill"):
                with contextlib.suppress(OSError), open(f"{self.cgroup}/cgroup.kill", "w") as f:
                    f.write("1")
            else:
                for pid in _cgroup_pids(self.cgroup):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signum)
        elif signum == signal.SIGTERM:
            for pid in _pipe_holders(self.inodes):
                with contextlib.suppress(OSError):
                    os.kill(pid, signum)

    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")


def _pipe_holders(inodes: set[int]) -> list[int]:
    """Processes other than the agent that hold one of these pipes open."""
    wanted = {f"pipe:[{inode}]" for inode in inodes}
    me = os.getpid()
    holders = []
    with os.scandir("/proc") as processes:
        for entry in processes:
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            with contextlib.suppress(OSError), os.scandir(f"{entry.path}/fd") as fds:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        if os.readlink(fd.path) in wanted:
                            holders.append(int(entry.name))
                            break
    return holders


def _cgroup_pids(cgroup: str) -> list[int]:
    with contextlib.suppress(OSError), open(f"{cgroup}/cgroup.procs") as handle:
        return [int(line) for line in handle if line.strip()]
    return []


def _populated(cgroup: str) -> bool:
    with contextlib.suppress(OSError), open(f"{cgroup}/cgroup.events") as handle:
        return "populated 1" in handle.read()
    return False


class _Cgroups:
    """The cgroups (v2) the runs of one source are put in, if the agent may create them.

    Each run gets ``exec-<source>-<agent pid>-<n>`` under the agent's own
    cgroup (under systemd: with ``Delegate=yes`` and without
    ``ProtectControlGroups``), removed once its processes are gone.
    """

    def __init__(self, base: str | None, source: str, log: Any) -> None:
        self.base = base
        self.prefix = f"exec-{source}-"  # names are [A-Za-z0-9_.-]: safe in a path
        self.log = log
        self.runs = 0

    @classmethod
    def find(cls, source: str, log: Any) -> _Cgroups:
        """Find the agent's cgroup and try to make one under it (logged if it cannot)."""
        cgroups = cls(_own_cgroup(), source, log)
        if cgroups.base is None:
            log.info(
                "no cgroup v2 here: a run's processes that leave its process group"
                " are found by its output pipes only"
            )
        cgroups.remove(cgroups.make())
        return cgroups

    def make(self) -> str | None:
        if self.base is None:
            return None
        self.runs += 1
        path = os.path.join(self.base, f"{self.prefix}{os.getpid()}-{self.runs}")
        try:
            os.mkdir(path)
        except OSError as exc:
            self.log.info(
                "cannot create cgroup %s (%s): a run's processes that leave its process group"
                " are found by its output pipes only (under systemd: Delegate=yes and no"
                " ProtectControlGroups lets the agent make one per run)",
                path,
                exc.strerror or exc,
            )
            self.base = None
            return None
        return path

    def remove(self, path: str | None) -> None:
        if path is None:
            return
        deadline = time.monotonic() + 1.0
        while True:
            try:
                os.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:  # EBUSY while the last process is being reaped
                if time.monotonic() > deadline:
                    self.log.warning("cannot remove cgroup %s: %s", path, exc.strerror or exc)
                    return
                time.sleep(0.02)  # bounded by the deadline above

    def reap_earlier(self, command: str) -> None:
        """Kill what runs of an earlier agent (killed, or crashed) left behind."""
        if self.base is None:
            return
        pattern = re.compile(re.escape(self.prefix) + r"(\d+)-\d+")
        with contextlib.suppress(OSError), os.scandir(self.base) as entries:
            for entry in entries:
                match = pattern.fullmatch(entry.name)
                if match is None or _exists(int(match[1])):
                    continue  # not this source's, or its agent still runs
                pids = _cgroup_pids(entry.path)
                if pids:
                    self.log.warning(
                        "killing processes %s of %s, left running by an earlier agent",
                        ", ".join(map(str, pids)),
                        command,
                    )
                    with contextlib.suppress(OSError), open(f"{entry.path}/cgroup.kill", "w") as f:
                        f.write("1")
                self.remove(entry.path)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _own_cgroup() -> str | None:
    """The agent's own cgroup v2 directory, or None without cgroup v2."""
    try:
        with open("/proc/self/cgroup") as handle:
            own = next((line[3:].strip() for line in handle if line.startswith("0::")), None)
        with open("/proc/self/mountinfo") as handle:
            mounts = [line.split() for line in handle if " - cgroup2 " in line]
    except OSError:
        return None
    if own is None or not mounts:
        return None
    path = mounts[0][4] + (own if own != "/" else "")
    return path if os.path.isdir(path) else None


@hookimpl
def register_sources(register):
    register("exec", ExecSource)
