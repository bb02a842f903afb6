"""Run every benchmark, one after the other, and print one table of the results.

Each script runs with its default settings (or, with ``--quick``, small counts
for a smoke check), prints its own report as it goes, and writes its rows to a
JSON file (``--json``); at the end comes the machine, the versions, and one
Markdown table: what | edge-agent | beside it, same run | target.

    .venv/bin/python bench/run_all.py                 # everything: about 10 minutes
    .venv/bin/python bench/run_all.py --quick         # small counts: about 2 minutes
    .venv/bin/python bench/run_all.py --only endtoend,footprint
    make bench                                        # the same; make bench BENCH_ARGS=--quick
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
import json  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from bench.common import Row, machine, print_machine  # noqa: E402


@dataclass
class Script:
    """One benchmark script and the arguments of a quick run."""

    name: str
    quick: list[str]
    about: str


SCRIPTS = [
    Script(
        "queue",
        ["-n", "20000", "--repeat", "1", "--sync", "full", "--only", "raw,enqueue,cycle"],
        "the SQLite queue against raw sqlite3 (and persist-queue, if installed)",
    ),
    Script("tail", ["-n", "20000", "--repeat", "1"], "tail → queue, beside the Writer alone"),
    Script("file_burst", ["-n", "1000", "--repeat", "1"], "a burst of new files → queue"),
    Script("forward", ["-n", "2000", "--repeat", "1"], "the forwarder alone, queue → Mosquitto"),
    Script("endtoend", ["-n", "2000", "--repeat", "1"], "tail → queue → Mosquitto → subscriber"),
    Script("backlog", ["-n", "20000"], "a large backlog: RSS, then the drain"),
    Script("footprint", ["--seconds", "5", "--repeat", "1"], "the idle agent, start-up time"),
    Script("latency", ["--seconds", "2", "--repeat", "1"], "line written → subscriber"),
    Script("tap", ["--seconds", "2", "--repeat", "1"], "edge-agent tap: no tapper / one tapper"),
    Script(
        "mqtt_source",
        ["-n", "2000", "--repeat", "1"],
        "local broker → mqtt source → queue → mqtt sink",
    ),
    Script(
        "http_source",
        ["--rates", "100", "--seconds", "1"],
        "posts → http source → queue → Mosquitto",
    ),
    Script("http_sink", ["-n", "5000"], "a backlog drained by the http sink"),
    Script("catchup", ["--files", "20000", "--idle", "5"], "the file source's catch-up scans"),
    Script("startup", ["--runs", "5"], "edge-agent --version, check and plugins: start to exit"),
]


@dataclass
class Outcome:
    """What one script gave: its rows, or why there are none."""

    script: Script
    seconds: float
    rows: list[Row] = field(default_factory=list)
    failure: str | None = None


def run_script(script: Script, quick: bool, folder: str) -> Outcome:
    """Run one script, its output going straight to the terminal; read its rows."""
    result_file = os.path.join(folder, f"{script.name}.json")
    command = [sys.executable, os.path.join(HERE, f"{script.name}.py")]
    command += [*(script.quick if quick else []), "--json", result_file]
    print(f"\n===== bench/{script.name}.py: {script.about}", flush=True)
    shown = ["python", os.path.relpath(command[1]), *command[2:-2]]
    print(f"$ {shlex.join(shown)}\n", flush=True)
    started = time.monotonic()
    code = subprocess.run(command).returncode
    seconds = time.monotonic() - started
    if code != 0:
        return Outcome(script, seconds, failure=f"exited with status {code}")
    try:
        with open(result_file) as handle:
            rows = [Row(**row) for row in json.load(handle)["rows"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Outcome(script, seconds, failure=f"wrote no readable results ({exc})")
    return Outcome(script, seconds, rows)


def cell(text: str) -> str:
    """Text fit for a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def print_table(outcomes: list[Outcome]) -> None:
    """The one table, in Markdown, ready for the README's Performance section."""
    print("| what | edge-agent | beside it, same run | target |")
    print("| --- | --- | --- | --- |")
    for outcome in outcomes:
        if outcome.failure:
            what = f"`bench/{outcome.script.name}.py`"
            print(f"| {what} | FAILED: {cell(outcome.failure)} | | |")
        for row in outcome.rows:
            cells = (row.what, row.agent, row.beside, row.target)
            print("| " + " | ".join(cell(text) for text in cells) + " |")


def command_line(argv: list[str]) -> str:
    """How this run was started, as a person would type it again."""
    if os.environ.get("MAKELEVEL"):
        args = os.environ.get("BENCH_ARGS", "").strip()
        return "make bench" + (f" BENCH_ARGS={shlex.quote(args)}" if args else "")
    return shlex.join([".venv/bin/python", "bench/run_all.py", *argv])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts and short windows: a smoke check"
    )
    names = [s.name for s in SCRIPTS]
    parser.add_argument(
        "--only", default=",".join(names), help=f"comma-separated subset of {','.join(names)}"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every row here")
    args = parser.parse_args()
    chosen = [name for name in args.only.split(",") if name]
    if not chosen or set(chosen) - set(names):
        parser.error(f"--only takes names among {', '.join(names)}")

    info = machine()
    began = time.monotonic()
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="bench-results-") as folder:
        for script in SCRIPTS:
            if script.name in chosen:
                outcomes.append(run_script(script, args.quick, folder))

    print(
        "\n===== edge-agent benchmarks"
        + (" (QUICK: small counts, a smoke check)" if args.quick else "")
    )
    print_machine(info, os.getcwd())
    print(f"command:   {command_line(sys.argv[1:])}")
    took = ", ".join(f"{o.script.name} {o.seconds:.0f}s" for o in outcomes)
    print(f"took:      {time.monotonic() - began:.0f}s ({took})\n")
    print_table(outcomes)
    verdicts = [row.met for o in outcomes for row in o.rows if row.met is not None]
    failed = [o for o in outcomes if o.failure]
    print(f"\ntargets: {verdicts.count(True)} met, {verdicts.count(False)} missed", end="")
    print(
        f"; {len(failed)} scripts FAILED: {', '.join(o.script.name for o in failed)}"
        if failed
        else ""
    )

    if args.json:
        rows = [{"script": o.script.name, **row.__dict__} for o in outcomes for row in o.rows]
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "quick": args.quick, "rows": rows}, handle, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the script running got the Ctrl-C too and cleaned up
        sys.exit("interrupted")
