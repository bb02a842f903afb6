"""Chaos soak: the real agent under a seeded random schedule of faults, then an oracle that
accounts for every event the producers made: delivered, dead-lettered, or covered by a
gap event. Anything else is a silent loss, and the run fails (exit 1).

    .venv/bin/python bench/chaos.py                         # 10 minutes (CHAOS_MINUTES)
    .venv/bin/python bench/chaos.py --minutes 2 --faults kill,link-cut,broker-restart
    .venv/bin/python bench/chaos.py --seed 1234             # the same schedule again
    make chaos                                              # the same; CHAOS_ARGS=...

Needs root (the agent's state dir is a small tmpfs, for the full-disk fault) and the
mosquitto binary. Everything runs on loopback, in a temporary folder.
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
import atexit  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402

from bench.chaos_oracle import (  # noqa: E402
    Ledger,
    Received,
    Window,
    account,
    attribute,
    markdown,
    queued_count,
    read_dead_letters,
    read_queued,
    rows,
    serial_text,
    serials_in,
)
from bench.chaos_world import EXEC_TIMEOUT, MAX_PACKET, Producers, World  # noqa: E402
from bench.common import Row, machine, print_machine, workdir, write_results  # noqa: E402
from edge_agent.testing import wait_for  # noqa: E402

# -- the faults: each injects, holds, and clears itself (also when interrupted) --------


def kill(world: World, rng: random.Random) -> str:
    down = rng.uniform(0.5, 3.0)
    stopped = world.stop_agent(signal.SIGKILL)
    try:
        time.sleep(down)  # the outage itself
    finally:
        world.start_agent(stopped)
    return f"SIGKILL, down {down:.1f}s"


def broker_stop(world: World, rng: random.Random) -> str:
    held = rng.uniform(2.0, 8.0)
    assert world.broker is not None and world.broker.process is not None
    world.broker.process.send_signal(signal.SIGSTOP)
    world.broker_paused = True
    try:
        time.sleep(held)
    finally:
        world.resume_broker()
    return f"SIGSTOP {held:.1f}s, SIGCONT"


def broker_restart(world: World, rng: random.Random) -> str:
    down = rng.uniform(0.5, 3.0)
    assert world.broker is not None and world.proxy is not None
    assert world.subscriber is not None
    subscribed = world.subscriber.subscriptions
    world.broker.stop()  # SIGTERM: it saves the subscriber's session and queue
    # The agent gets back only once the subscriber is: Mosquitto 2.0.11 acknowledged
    # messages published between its restart and a restored persistent session's
    # reconnection, and never delivered them to it (seen in its debug log).
    world.proxy.cut()
    try:
        time.sleep(down)
        world.broker.start()
        wait_for(
            lambda: world.subscriber.subscriptions > subscribed,
            30,
            "the subscriber to subscribe again after the broker's restart",
        )
    finally:
        world.proxy.restore()
    return f"SIGTERM, down {down:.1f}s, started"


def link_cut(world: World, rng: random.Random) -> str:
    held = rng.uniform(1.0, 6.0)
    assert world.proxy is not None
    world.proxy.cut()
    try:
        time.sleep(held)
    finally:
        world.proxy.restore()
    return f"connections dropped and refused for {held:.1f}s"


def disk_full(world: World, rng: random.Random) -> str:
    leave = rng.randint(0, 1024 * 1024)
    held = rng.uniform(2.0, 8.0)
    ballast = os.path.join(world.state, "ballast")
    stat = os.statvfs(world.state)
    size = max(0, stat.f_bavail * stat.f_frsize - leave)
    chunk = b"\0" * (1024 * 1024)
    try:
        with open(ballast, "wb") as handle:
            written = 0
            while written < size:
                written += handle.write(chunk[: min(len(chunk), size - written)])
    except OSError:
        pass  # the agent took some room meanwhile: the disk is full either way
    try:
        stat = os.statvfs(world.state)
        free = stat.f_bavail * stat.f_frsize
        time.sleep(held)
    finally:
        os.unlink(ballast)
    return f"{free // 1024} KiB left free for {held:.1f}s"


def rotate(world: World, rng: random.Random) -> str:
    world.rotate(copytruncate=False)
    return "app.log renamed to app.log.1"


def copytruncate(world: World, rng: random.Random) -> str:
    world.rotate(copytruncate=True)
    return "app.log copied to app.log.1 and truncated"


def rotate_down(world: World, rng: random.Random) -> str:
    between = rng.uniform(0.3, 1.5)
    stopped = world.stop_agent(signal.SIGTERM)
    try:
        world.rotate(copytruncate=False)
        time.sleep(between)  # the producer writes to the new app.log meanwhile
        world.rotate(copytruncate=False)
    finally:
        world.start_agent(stopped)
    return f"agent stopped, app.log rotated twice {between:.1f}s apart, started"


def rotate_lost(world: World, rng: random.Random) -> str:
    # A loss that is certain: the agent is killed, app.log goes on growing, and is rotated
    # and its old generation deleted before the agent is back (logrotate with "rotate 0",
    # or a compressing rotation). The lines it had not read are gone: a log.gap is due.
    between = rng.uniform(0.3, 1.5)
    stopped = world.stop_agent(signal.SIGKILL)
    try:
        time.sleep(between)  # the producer writes lines the agent will never read
        world.rotate(copytruncate=False, keep=False)
    finally:
        world.start_agent(stopped)
    return f"SIGKILL, {between:.1f}s of lines, app.log rotated and the old one deleted, started"


def log_replaced(world: World, rng: random.Random) -> str:
    # As rotate-lost, but app.log is deleted and created again under the same name: the
    # new file may reuse the old inode number, and must not be taken for a truncation.
    between = rng.uniform(0.3, 1.5)
    stopped = world.stop_agent(signal.SIGKILL)
    try:
        time.sleep(between)  # the producer writes lines the agent will never read
        world.replace_log()
    finally:
        world.start_agent(stopped)
    return f"SIGKILL, {between:.1f}s of lines, app.log deleted and created again, started"


def inotify_burst(world: World, rng: random.Random) -> str:
    # The agent is stopped (SIGSTOP) while the burst is written, as a starved agent on a
    # busy device would be: the kernel's queue overflows for certain.
    with open("/proc/sys/fs/inotify/max_queued_events") as handle:
        limit = int(handle.read())
    count = limit + rng.randint(1000, 4000)
    world.agent.signal(signal.SIGSTOP)
    try:
        for _ in range(count):
            world.make_file()
    finally:
        world.agent.signal(signal.SIGCONT)
    return f"{count:,} files while the agent was stopped (max_queued_events {limit:,})"


def poison_acl(world: World, rng: random.Random) -> str:
    count = rng.randint(1, 3)
    for _ in range(count):
        world.make_file(folder=world.denied)
    return f"{count} files whose topic the broker's ACL denies"


def poison_oversize(world: World, rng: random.Random) -> str:
    count = rng.randint(1, 2)
    for _ in range(count):
        world.write_line(world.app_log, padding=2 * MAX_PACKET)
    return f"{count} log lines over the broker's max_packet_size ({MAX_PACKET:,} bytes)"


def poison_control(world: World, rng: random.Random) -> str:
    count = rng.randint(1, 2)
    for _ in range(count):
        world.make_file(suffix="\ttab.txt")
    return f"{count} files with a tab in the name (and so in the topic)"


def hup(world: World, rng: random.Random) -> str:
    variant = "lean" if world.variant == "full" else "full"
    world.reload(variant)
    if variant == "lean":
        return "SIGHUP: source app2 removed, max_inflight 100 -> 20"
    return "SIGHUP: source app2 added back, max_inflight 20 -> 100"


def sabotage(world: World, rng: random.Random) -> str:
    """Not a fault of the world: deletes one queued event behind the agent's back, to show
    that the oracle reports a silent loss (the run must fail). The link is cut, so the
    event cannot leave; the agent is stopped meanwhile, so no copy of it stays in memory."""
    assert world.proxy is not None
    world.proxy.cut()
    try:
        serial = world.write_line(world.app_log)
        pattern = f"%{serial_text(serial)}%"

        def queued() -> bool:
            conn = sqlite3.connect(f"file:{world.db_path}?mode=ro", uri=True, timeout=10)
            try:
                query = "SELECT 1 FROM events WHERE data LIKE ?"
                return conn.execute(query, (pattern,)).fetchone() is not None
            finally:
                conn.close()

        wait_for(queued, 30, f"the agent to queue serial {serial}")
        stopped = world.stop_agent(signal.SIGTERM)
        try:
            conn = sqlite3.connect(world.db_path, timeout=10)
            with conn:
                conn.execute("DELETE FROM events WHERE data LIKE ?", (pattern,))
            conn.close()
        finally:
            world.start_agent(stopped)
    finally:
        world.proxy.restore()
    return f"deleted the queued event of serial {serial} from queue.db while the agent was down"


FAULTS: dict[str, Callable[[World, random.Random], str]] = {
    "kill": kill,
    "broker-stop": broker_stop,
    "broker-restart": broker_restart,
    "link-cut": link_cut,
    "disk-full": disk_full,
    "rotate": rotate,
    "copytruncate": copytruncate,
    "rotate-down": rotate_down,
    "rotate-lost": rotate_lost,
    "log-replaced": log_replaced,
    "inotify-burst": inotify_burst,
    "poison-acl": poison_acl,
    "poison-oversize": poison_oversize,
    "poison-control": poison_control,
    "hup": hup,
    "sabotage": sabotage,
}
DEFAULT_FAULTS = [name for name in FAULTS if name != "sabotage"]
#: The shortest fault window: what is made this soon after a fault is counted under it.
MIN_WINDOW = 2.0
#: ... and what is made this soon after a fault was cleared.
AFTERMATH = 1.0


# -- the run --------------------------------------------------------------------------


class Run:
    """One soak: the schedule, what happened, and the end."""

    def __init__(self, world: World, args: argparse.Namespace) -> None:
        self.world = world
        self.args = args
        self.rng = random.Random(args.seed)
        self.windows: list[Window] = []
        self.findings: list[str] = []
        self.began = time.time()

    def say(self, text: str) -> None:
        print(f"{time.time() - self.began:7.1f}s  {text}", flush=True)

    def check_agent(self) -> None:
        """An agent that exited on its own is a finding; start it again."""
        agent = self.world.agent
        if agent.process is not None and agent.process.poll() is not None:
            code = agent.process.returncode
            self.findings.append(f"the agent exited on its own with status {code}")
            self.say(f"FINDING: the agent exited with status {code}:\n{agent.log_tail()}")
            stopped = time.time()
            agent.kill()
            self.world.start_agent(stopped)

    def recover(self) -> None:
        """After a fault went wrong: every part back as it should be."""
        world = self.world
        world.resume_broker()
        if world.broker is not None and world.broker.process is None:
            world.broker.start()
        if world.proxy is not None:
            world.proxy.restore()
        ballast = os.path.join(world.state, "ballast")
        if os.path.exists(ballast):
            os.unlink(ballast)
        if not world.agent.running():
            stopped = time.time()
            world.agent.kill()
            world.start_agent(stopped)

    def soak(self, kinds: list[str], seconds: float) -> None:
        finish = time.time() + seconds
        while time.time() < finish:
            kind = self.rng.choice(kinds)
            quiet = self.rng.uniform(1.0, 3.0)
            self.check_agent()
            self.world.sweep_inbox()  # a consumer takes what has arrived (not a fault)
            window = Window(kind, time.time())
            self.windows.append(window)
            try:
                window.detail = FAULTS[kind](self.world, self.rng)
                self.say(f"{kind}: {window.detail}")
            except Exception as exc:
                window.detail = f"failed: {exc}"
                self.findings.append(f"{kind}: {exc}")
                self.say(f"FINDING: {kind} failed: {exc}")
                self.recover()
            finally:
                # What is made just after a fault is cleared still meets its aftermath (an
                # overflowed inotify queue being read); a fault of an instant (a rotation,
                # a reload) counts for a while.
                until = max(window.start + MIN_WINDOW, time.time() + AFTERMATH)
                time.sleep(max(0.0, until - time.time()))
                window.end = time.time()
            time.sleep(quiet)  # between faults: the agent catches up
        self.check_agent()

    def drain(self, timeout: float, settle: float) -> bool:
        """Faults over: wait until the queue is empty and nothing more arrives for
        ``settle`` seconds; False at the deadline."""
        world = self.world
        world.stop_exec()
        if world.variant != "full":
            try:
                world.reload("full")
            except AssertionError as exc:  # a finding, not the end of the accounting
                self.say(f"FINDING: the reload before the drain failed: {exc}")
        self.check_agent()
        deadline = time.monotonic() + timeout
        assert world.subscriber is not None
        messages = world.subscriber.messages
        seen: set[int] = set()
        read = 0
        last = (-2, -2)
        still_since = time.monotonic()
        while time.monotonic() < deadline:
            # Serials received, not messages: the exec source goes on sending empty output.
            for message in messages[read : len(messages)]:
                seen |= serials_in(message.payload.decode("utf-8", "replace"))
                read += 1
            now = (queued_count(world.db_path), len(seen))
            if now != last:
                last, still_since = now, time.monotonic()
            elif now[0] == 0 and time.monotonic() - still_since >= settle:
                # An empty queue is not drained while sources hold events the writer
                # has not committed (waiting for room, or a main thread that is stuck).
                held = uncommitted(world.state)
                if held == 0:
                    return True
                self.say(f"the queue is empty but the agent's status says: {held}")
                still_since = time.monotonic()
            self.check_agent()
            time.sleep(0.5)  # a poll interval, bounded by the deadline
        self.say(f"the drain's deadline passed with {last[0]} events still queued")
        return False


def uncommitted(state_dir: str) -> int | str:
    """0 when the agent's status snapshot is fresh and says every event the sources
    handed over is committed; else what stands in the way, in words."""
    path = os.path.join(state_dir, "status.json")
    try:
        with open(path, encoding="utf-8") as file:
            status = json.load(file)
        # The file's time, not "updated": an unchanged snapshot is only touched.
        age = time.time() - os.path.getmtime(path)
    except (OSError, ValueError) as exc:
        return f"no status snapshot ({exc})"
    if age > 4 * status.get("interval", 5):
        return f"a status snapshot {age:.0f} s old (the main thread is stuck?)"
    queue = status["queue"]
    if queue.get("waiting_for_room"):
        return f"{queue.get('uncommitted')} events waiting for room"
    return queue.get("uncommitted", 0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=float(os.environ.get("CHAOS_MINUTES", "10")),
        help="how long faults are injected (default: $CHAOS_MINUTES, else 10)",
    )
    parser.add_argument("--seed", type=int, default=None, help="the schedule's seed (printed)")
    parser.add_argument(
        "--faults",
        default=",".join(DEFAULT_FAULTS),
        help=f"comma-separated fault kinds (default: all of {','.join(DEFAULT_FAULTS)});"
        " 'sabotage' deletes a queued event to show that the oracle catches it",
    )
    parser.add_argument(
        "--drain", type=float, default=180.0, help="seconds the drain may take (default 180)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the result rows here")
    parser.add_argument(
        "--dir", default=None, help="where to make the temporary folder (default: here)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    args.kinds = [k for k in args.faults.split(",") if k]
    unknown = set(args.kinds) - set(FAULTS)
    if not args.kinds or unknown:
        parser.error(f"--faults takes names among {', '.join(FAULTS)}")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 2**31)
    return args


def replay_command(args: argparse.Namespace) -> str:
    words = [".venv/bin/python", "bench/chaos.py", "--seed", str(args.seed)]
    words += ["--minutes", f"{args.minutes:g}", "--faults", ",".join(args.kinds)]
    return shlex.join(words)


def report(run: Run, drained: bool, folder: str) -> int:
    """Account for every serial, print the table and what went wrong; the exit status."""
    world, args = run.world, run.args
    world.exec_serials()
    dead = read_dead_letters(world.db_path)
    queued = read_queued(world.db_path)
    assert world.subscriber is not None
    received = Received.from_payloads(m.payload for m in list(world.subscriber.messages))
    verdict = account(world.ledger, received, dead, queued, world.stops, EXEC_TIMEOUT)
    if args.keep:  # for a look afterwards: what arrived, what was made, the faults
        with open(os.path.join(folder, "received.jsonl"), "w") as handle:
            for message in world.subscriber.messages:
                handle.write(message.payload.decode("utf-8", "replace") + "\n")
        with open(os.path.join(folder, "ledger.jsonl"), "w") as handle:
            for item in world.ledger.items.values():
                handle.write(json.dumps(item.__dict__) + "\n")
        with open(os.path.join(folder, "faults.jsonl"), "w") as handle:
            for window in run.windows:
                handle.write(json.dumps(window.__dict__) + "\n")
    table = rows(world.ledger, verdict, run.windows, args.kinds)
    total = table[-1]

    print("\n===== edge-agent chaos soak")
    info = machine()
    print_machine(info, folder)
    print(f"seed:      {args.seed}")
    print(f"faults:    {', '.join(args.kinds)} for {args.minutes:g} min")
    print(f"replay:    {replay_command(args)}")
    print(f"messages:  {sum(received.copies.values()):,} received, {len(received.events):,} ids")
    print()
    print(markdown(table))
    if verdict.reasons:
        # Reasons name the topic or the size: one line per kind of reason.
        kinds = Counter()
        for reason, count in verdict.reasons.items():
            kinds[re.sub(r"\d{4,}", "N", re.sub(r"'[^']*'", "'...'", reason))] += count
        print("\ndead letters (one per event) by reason:")
        for reason, count in kinds.most_common():
            print(f"  {count:6,}  {reason}")
    if verdict.gaps:
        print(f"\ngap events ({len(verdict.gaps)}):")
        for gap in verdict.gaps[:20]:
            print(f"  {gap.get('type')} from {gap.get('source')}: {gap.get('data')}")
    lost = [s for s, c in verdict.classes.items() if c in ("silent", "stuck")]
    ledger = world.ledger
    if lost:
        by_kind = Counter(
            (attribute(ledger.items[s], run.windows), ledger.items[s].producer, verdict.classes[s])
            for s in lost
        )
        print("\nsilent losses and stuck events by fault, producer:")
        for (kind, producer, cls), count in sorted(by_kind.items()):
            print(f"  {count:6,}  {cls:6} {kind:15} {producer}")
        print(f"\nsilent losses and stuck events ({len(lost):,}); the first 20:")
        for serial in lost[:20]:
            item = ledger.items[serial]
            when = item.at - run.began
            print(
                f"  ser-{serial:09d} {verdict.classes[serial]:6} {item.producer:5} at"
                f" {when:7.1f}s ({attribute(item, run.windows)}) {item.where!r}"
            )
    if verdict.unknown_serials:
        run.findings.append(f"{len(verdict.unknown_serials)} serials seen but never produced")
    if not drained:
        run.findings.append("the queue did not drain before the deadline")
    for finding in run.findings:
        print(f"FINDING: {finding}")
    failed = bool(total.counts["silent"] or total.counts["stuck"] or run.findings)
    print(
        f"\n{'FAIL' if failed else 'PASS'}: {total.produced:,} produced,"
        f" {total.counts['silent']:,} silent losses, {total.counts['stuck']:,} stuck"
    )
    write_results(
        args.json,
        "chaos",
        [
            Row(
                what=f"chaos: {row.kind}",
                agent=(
                    f"{row.produced:,} produced, {row.counts['delivered']:,} delivered,"
                    f" {row.counts['silent']:,} silent losses"
                ),
                beside=(
                    f"{row.injected} injected, {row.duplicates:,} duplicates,"
                    f" {row.counts['dead']:,} dead, {row.counts['gap']:,} gap,"
                    f" {row.counts['cut']:,} cut, {row.counts['stuck']:,} stuck"
                ),
                target="0 silent losses",
                met=not (row.counts["silent"] or row.counts["stuck"]),
                values={
                    "injected": row.injected,
                    "produced": row.produced,
                    "duplicates": row.duplicates,
                    **{c: row.counts[c] for c in ("delivered", "dead", "stuck", "gap", "cut")},
                    "silent": row.counts["silent"],
                    "seed": args.seed,
                },
            )
            for row in table
        ],
        info,
    )
    return 1 if failed else 0


def interrupted(signum: int, frame: object) -> None:
    """SIGTERM ends the run as Ctrl-C does: everything started is stopped."""
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/chaos.py needs root: the agent's state dir is a tmpfs it mounts")
    print(f"seed {args.seed}; faults {', '.join(args.kinds)}; {args.minutes:g} min", flush=True)
    with workdir("chaos", args.dir, args.keep) as folder:
        world = World(folder, Ledger())
        atexit.register(world.close)  # also on an exception before the finally below
        signal.signal(signal.SIGTERM, interrupted)
        producers = Producers(world)
        try:
            world.open()
            run = Run(world, args)
            run.say(f"agent ready; state dir on a tmpfs at {world.state}")
            producers.start()
            run.soak(args.kinds, args.minutes * 60)
            producers.stop()
            run.say("faults over; draining")
            drained = run.drain(args.drain, settle=10.0)
            run.say("drained" if drained else "not drained")
            code = world.agent.terminate()
            if code not in (0, None):
                run.findings.append(f"the agent's clean stop exited with status {code}")
            run.findings += [f"producer: {e}" for e in Counter(producers.errors)]
            return report(run, drained, folder)
        finally:
            producers.stop()
            world.close()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted; everything started was stopped")
