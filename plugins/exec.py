"""The ``exec`` source: the output of commands, for anything written in any language.

Two modes. ``interval``: run the command every ``interval`` and emit one
event with its exit code, output and duration, killing it at ``timeout``.
``stream``: run a long-lived command and emit one event per line it prints,
starting it again with backoff when it exits. Output that is valid JSON is
sent parsed, anything else as text. Commands are argument lists, never
passed to a shell unless ``shell = true`` says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from agent import Duration, Event, Source, hookimpl, option
from agent.backoff import Backoff

KILL_GRACE = 2.0


def parse_output(text: str) -> tuple[str, Any]:
    """("json", value) when ``text`` is JSON, else ("text", text)."""
    stripped = text.strip()
    if stripped:
        try:
            return "json", json.loads(stripped)
        except ValueError:
            pass
    return "text", text


class ExecSource(Source):
    """Emits ``exec.output``: one per run (interval) or one per line (stream)."""

    @dataclass(kw_only=True)
    class Config:
        command: list[str] | str = option(
            doc='["/usr/bin/sensors", "-j"]; a single string only with shell = true.'
        )
        shell: bool = option(False, doc="Run command through /bin/sh -c. Off unless you must.")
        mode: Literal["interval", "stream"] = option(
            "interval", doc='"interval": run every interval; "stream": run once, read lines.'
        )
        interval: Duration = option(60.0, doc="Time between runs (interval mode).")
        timeout: Duration = option(10.0, doc="Kill a run that takes longer (interval mode).")
        env: dict[str, str] = option({}, doc="Extra environment variables.")
        cwd: str = option("", doc="Working directory. Default: the agent's.")
        max_output_bytes: int = option(
            1024 * 1024, doc="Most stdout kept per run; the rest is cut."
        )
        stderr_tail_bytes: int = option(2048, doc="How much of the end of stderr to send.")
        restart_min: Duration = option(1.0, doc="Shortest wait before restarting (stream mode).")
        restart_max: Duration = option(60.0, doc="Longest wait before restarting (stream mode).")

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

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

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

    def _start(self, stdout: Any) -> subprocess.Popen:
        return subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            cwd=self.config.cwd or None,
            env={**os.environ, **self.config.env},
            start_new_session=True,  # its own process group, so a timeout kills all of it
        )

    def stop(self) -> None:
        super().stop()
        with self._lock:
            process = self._process
        if process is not None:
            _kill(process)

    def run(self) -> None:
        if self.config.mode == "stream":
            self._stream()
        else:
            self._interval()

    # -- interval -----------------------------------------------------------------

    def _interval(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            self.emit_until_accepted([self._run_once()])
            self.stopping.wait(max(0.0, self.config.interval - (time.monotonic() - started)))

    def _run_once(self) -> Event:
        started = time.monotonic()
        try:
            process = self._start(subprocess.PIPE)
        except OSError as exc:
            return self._result(None, "", f"cannot start: {exc.strerror or exc}", 0.0, False)
        with self._lock:
            self._process = process
        timed_out = False
        try:
            stdout, stderr = process.communicate(timeout=self.config.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(process)
            stdout, stderr = process.communicate()
            self.log.warning(
                "%s ran longer than %gs and was killed", self.command_text, self.config.timeout
            )
        finally:
            with self._lock:
                self._process = None
        text = stdout[: self.config.max_output_bytes].decode("utf-8", errors="replace")
        tail = stderr[-self.config.stderr_tail_bytes :].decode("utf-8", errors="replace")
        return self._result(process.returncode, text, tail, time.monotonic() - started, timed_out)

    def _result(
        self, code: int | None, stdout: str, stderr: str, duration: float, timed_out: bool
    ) -> Event:
        output_format, output = parse_output(stdout)
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
            },
            subject=self.command_text,
        )

    # -- stream -------------------------------------------------------------------

    def _stream(self) -> None:
        backoff = Backoff(self.config.restart_min, self.config.restart_max)
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                process = self._start(subprocess.PIPE)
            except OSError as exc:
                delay = backoff.next()
                self.log.warning(
                    "cannot start %s: %s; trying again in %.1fs", self.command_text, exc, delay
                )
                self.stopping.wait(delay)
                continue
            with self._lock:
                self._process = process
            with process:  # closes its pipes when done
                stderr_tail = _TailReader(process.stderr, self.config.stderr_tail_bytes)
                assert process.stdout is not None
                for raw in process.stdout:
                    line = raw[: self.config.max_output_bytes].decode("utf-8", errors="replace")
                    output_format, output = parse_output(line.rstrip("\r\n"))
                    data = {"command": self.command_text, "format": output_format, "output": output}
                    self.emit_until_accepted(
                        [self.event("exec.output", data, subject=self.command_text)]
                    )
                code = process.wait()
                stderr_text = stderr_tail.text().strip()
            with self._lock:
                self._process = None
            if self.stopping.is_set():
                return
            if time.monotonic() - started > self.config.restart_max:
                backoff.reset()
            delay = backoff.next()
            self.log.warning(
                "%s exited with %s%s; starting it again in %.1fs",
                self.command_text,
                code,
                f" ({stderr_text[-200:]})" if stderr_text else "",
                delay,
            )
            self.stopping.wait(delay)


class _TailReader:
    """Keeps the last bytes of a pipe, read in a thread so the command never blocks on it."""

    def __init__(self, pipe: Any, keep: int) -> None:
        self.keep = keep
        self.data = b""
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: Any) -> None:
        for chunk in iter(lambda: pipe.read(4096), b""):
            self.data = (self.data + chunk)[-self.keep :]

    def text(self) -> str:
        self._thread.join(1.0)
        return self.data.decode("utf-8", errors="replace")


def _kill(process: subprocess.Popen) -> None:
    """SIGTERM the command's process group, SIGKILL it if still there after a grace."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(KILL_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


@hookimpl
def register_sources(register):
    register("exec", ExecSource)
