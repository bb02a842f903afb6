"""``--profile`` for the benchmark scripts: sample a running process with py-spy and say
where its time went.

py-spy (``pip install py-spy``) attaches to a process by its pid, samples every
thread's Python stack a few hundred times a second, and writes the stacks it saw
("collapsed" text: ``frame;frame;frame count``). :func:`summary` folds them into two
short tables: the functions the samples were in (self), and the functions the
samples were under (inclusive), each as a share of all samples. Idle threads
are left out (``--idle`` is not given), so the shares are of the time spent
working; ``--gil`` would count only the thread holding the interpreter lock.

    with Profile(agent.pid, "endtoend-single.txt") as profile:
        ...  # the measurement
    print(profile.summary())
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import time

#: Samples a second: enough for a run of a few seconds, little enough to cost little.
RATE = 250
#: ``name (path:line)`` → ``name (file)``: lines of one function counted together.
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<path>[^:()]*)(?::\d+)?\)$")


def profile_path(name: str) -> str:
    """Where a profile called ``name`` is written: ``.bench-profiles/NAME.txt`` here
    (kept after the run; git ignores ``.bench-*`` folders)."""
    folder = os.path.abspath(".bench-profiles")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{name}.txt")


def py_spy() -> str:
    """The py-spy next to this interpreter (the venv's), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    found = here if os.access(here, os.X_OK) else shutil.which("py-spy")
    if not found:
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


class Profile:
    """py-spy recording the process ``pid`` into ``path`` until :meth:`stop`."""

    def __init__(self, pid: int, path: str, *, gil: bool = False) -> None:
        self.pid = pid
        self.path = path
        command = [py_spy(), "record", "--pid", str(pid), "--rate", str(RATE)]
        command += ["--format", "raw", "--output", path, "--nonblocking"]
        if gil:
            command.append("--gil")
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        time.sleep(0.3)  # ok: py-spy needs a moment to attach; sampling starts then

    def stop(self) -> None:
        """End the recording (py-spy writes its file on SIGINT)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Profile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def summary(self, top: int = 12) -> str:
        return summary(self.path, top)


def _frame(text: str) -> str:
    match = _FRAME.match(text.strip())
    if not match:
        return text.strip()
    return f"{match['name']} ({os.path.basename(match['path'])})"


def summary(path: str, top: int = 12) -> str:
    """The top functions of a py-spy raw file, by self and by inclusive samples."""
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        return f"  (no profile: {exc})"
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else ""
        frames = [_frame(f) for f in frames if not f.startswith(("thread", "process"))]
        if not frames:
            continue
        total += count
        threads[thread or "?"] += count
        own[frames[-1]] += count
        for name in set(frames):
            under[name] += count
    if not total:
        return "  (no samples)"
    out = [f"  {total:,} samples of working threads ({path})"]
    out.append("  self:")
    out += [f"    {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    out.append("  inclusive:")
    out += [f"    {100 * n / total:5.1f}%  {name}" for name, n in under.most_common(top)]
    return "\n".join(out)
