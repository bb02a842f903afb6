"""Start-up of the short commands: ``edge-agent --version``, ``check`` and ``plugins``.

Each command runs ``--runs`` times as a child process, the commands (and, with
``--baseline REV``, this checkout and the baseline's) taking turns, so that a
busy machine weighs on them alike. Printed per command: the median wall time,
the median CPU time (user + system, from ``wait4``, which the machine's load
hardly changes), and the libraries of other plugins that the command imported
(read from ``sys.modules`` at its exit; ``-X importtime`` cannot see the modules
that entry points load).

    .venv/bin/python bench/startup.py
    .venv/bin/python bench/startup.py --runs 40 --baseline 0f10bb8

Bytecode is written and used as after a wheel's install (``PYTHONDONTWRITEBYTECODE``
is taken off the children's environment, and one run per variant comes first):
with it set, every run compiles the project's modules again, some 40 ms more.
A baseline is REV's files (``git archive``) in a temporary folder, put ahead of the
installed (editable) checkout on ``PYTHONPATH``; the entry points are this
checkout's (a baseline with other plugin modules is not comparable).
"""

from __future__ import annotations

import os
import sys

# This folder holds queue.py, which would shadow the standard library's queue:
# take the folder off sys.path, and put the checkout's root on it for bench.common.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402

from bench.common import Row, machine, print_machine, write_results  # noqa: E402

#: Libraries that only some plugins need: a short command should import none of them.
HEAVY = (
    "pika",
    "psutil",
    "pyudev",
    "serial",
    "prometheus_client",
    "watchdog",
    "paho.mqtt.client",
    "ssl",
    "urllib.request",
    "http.server",
    "sqlite_utils",
)

#: Runs the command as the ``edge-agent`` script does, and lists the heavy modules it
#: imported into the file named by argv[1] when it exits.
PROBE = """
import atexit, sys
out = sys.argv.pop(1)
heavy = {heavy!r}
def report():
    with open(out, "w") as f:
        f.write(" ".join(m for m in heavy if m in sys.modules))
atexit.register(report)
sys.argv[0] = "edge-agent"
from edge_agent.cli import main
main()
"""

CONFIG = """\
[agent]
id = "bench"
state_dir = "{state}"

[[sources.file]]
name = "inbox"
paths = ["{inbox}"]

[[sinks.mqtt]]
name = "local"
host = "127.0.0.1"
port = 1883
"""


def run_once(args: list[str], env: dict[str, str], probe_out: str) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, exit status) of one run of the command, in the probe's
    folder (``-c`` puts the working directory first on ``sys.path``)."""
    code = PROBE.format(heavy=HEAVY)
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", code, probe_out, *args],
        env=env,
        cwd=os.path.dirname(probe_out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _pid, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, child.returncode


@contextlib.contextmanager
def baseline_tree(rev: str | None, folder: str) -> Iterator[str | None]:
    """The files of ``rev`` (``git archive``) in ``folder``, or None without a baseline."""
    if rev is None:
        yield None
        return
    path = os.path.join(folder, "baseline")
    os.mkdir(path)
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", rev], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", path], input=archive, check=True)
    yield path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each command (default 20)")
    parser.add_argument("--baseline", metavar="REV", help="also time this git revision")
    parser.add_argument("--json", metavar="FILE", help="also write the rows, for run_all.py")
    args = parser.parse_args()

    print_machine(machine())
    with tempfile.TemporaryDirectory(prefix="edge-agent-startup-") as folder:
        inbox = os.path.join(folder, "inbox")
        os.mkdir(inbox)
        config = os.path.join(folder, "agent.toml")
        with open(config, "w") as f:
            f.write(CONFIG.format(state=os.path.join(folder, "state"), inbox=inbox))
        commands = {
            "--version": ["--version"],
            "check": ["check", "-c", config],
            "plugins": ["plugins"],
        }
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env.pop("EDGE_AGENT_LOAD_PLUGINS", None)
        with baseline_tree(args.baseline, folder) as base:
            variants = {"this checkout": env}
            if base is not None:
                variants[f"baseline {args.baseline}"] = {**env, "PYTHONPATH": base}
            probe = os.path.join(folder, "probe")
            wall: dict[tuple[str, str], list[float]] = {}
            cpu: dict[tuple[str, str], list[float]] = {}
            imported: dict[tuple[str, str], str] = {}
            for variant_env in variants.values():  # write the bytecode first
                for command in commands.values():
                    run_once(command, variant_env, probe)
            for _ in range(args.runs):
                for name, command in commands.items():
                    for variant, variant_env in variants.items():
                        seconds, cpu_seconds, status = run_once(command, variant_env, probe)
                        if status != 0:
                            sys.exit(f"edge-agent {' '.join(command)} exited with {status}")
                        wall.setdefault((name, variant), []).append(seconds)
                        cpu.setdefault((name, variant), []).append(cpu_seconds)
                        with open(probe) as f:
                            imported[(name, variant)] = f.read() or "-"

    print(f"\nmedians of {args.runs} runs each (ms); imported: libraries of other plugins")
    print(f"{'command':<12} {'variant':<24} {'wall':>7} {'cpu':>7}  imported")
    rows = []
    for name in commands:
        for variant in variants:
            key = (name, variant)
            w = statistics.median(wall[key]) * 1000
            c = statistics.median(cpu[key]) * 1000
            print(f"{name:<12} {variant:<24} {w:7.0f} {c:7.0f}  {imported[key]}")
            if variant == "this checkout":
                rows.append(
                    Row(
                        what=f"edge-agent {name}: start to exit",
                        agent=f"{w:.0f} ms wall, {c:.0f} ms CPU",
                        values={"wall_ms": w, "cpu_ms": c, "imported": imported[key]},
                    )
                )
    write_results(args.json, "startup", rows)


if __name__ == "__main__":
    main()
