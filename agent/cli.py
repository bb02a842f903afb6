"""The ``edge-agent`` command line.

Exit codes: 0 ok, 1 runtime failure, 2 usage error, 78 (EX_CONFIG) invalid
configuration, so that systemd's ``RestartPreventExitStatus=78`` stops a
restart loop on a bad config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import click

from edge_agent import __version__
from edge_agent.config import Config, check_state_dir, choose_config_path, load_config
from edge_agent.errors import AgentError, ConfigError
from edge_agent.logfold import RepeatFolder
from edge_agent.plugin_host import PluginHost, load_plugins
from edge_agent.statedir import StateDirBusy, StateDirLock

EX_CONFIG = 78

log = logging.getLogger("edge_agent")

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    metavar="PATH",
    default=None,
    help="Config file, or a folder whose *.toml files are read in name order."
    " Default: $EDGE_AGENT_CONFIG, then /etc/edge-agent/agent.toml.",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


#: sd-daemon(3) priority prefixes, by logging level (the nearest at or below it).
JOURNAL_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4))


class JournalFormatter(logging.Formatter):
    """Prefixes every line with sd-daemon's ``<N>`` priority, which journald takes as the
    entry's level (``journalctl -p err``) and strips: 3 error, 4 warning, 6 info, 7 debug."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = 6 if record.levelno >= logging.INFO else 7
        for level, number in JOURNAL_PRIORITIES:
            if record.levelno >= level:
                priority = number
                break
        text = self.inner.format(record)
        # journald stores each line as an entry of its own: a traceback's lines too.
        return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


def stderr_is_journal() -> bool:
    """True when stderr is connected to journald: ``$JOURNAL_STREAM`` ("DEV:INODE", set by
    systemd) names stderr's own device and inode, as sd-daemon(3) says to check; a child
    whose stderr was redirected elsewhere inherits the variable but not the stream."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def setup_logging(level: str = "info", log_format: str = "text") -> None:
    """Log lines to stderr; under journald without timestamps (it adds its own) and with
    each line's level as a ``<N>`` prefix, so ``journalctl -p err`` finds the errors."""
    handler = logging.StreamHandler(sys.stderr)
    journal = stderr_is_journal()
    formatter: logging.Formatter
    if log_format == "json":
        formatter = JsonFormatter()
    else:
        fmt = "%(levelname)s %(name)s: %(message)s"
        if not journal:
            fmt = "%(asctime)s " + fmt
        formatter = logging.Formatter(fmt)
    handler.setFormatter(JournalFormatter(formatter) if journal else formatter)
    handler.addFilter(_quiet_watchdog_shutdown)
    handler.addFilter(RepeatFolder(handler))
    handler.setLevel(level.upper())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Warnings are always made, even when not printed: each plugin's are counted
    # (agent.counters.LoggedProblems) whatever the log level.
    root.setLevel(min(logging.getLevelName(level.upper()), logging.WARNING))


def _quiet_watchdog_shutdown(record: logging.LogRecord) -> bool:
    """watchdog logs an ERROR when a stopped watch had an event in hand; nothing is wrong."""
    return not (
        record.name.startswith("watchdog") and "called when the thread is inactive" in record.msg
    )


def _host() -> PluginHost:
    """The plugins, loaded on first use by the command that needs them.

    ``edge-agent --version`` and the built-in commands that read no config
    never load them, so they start without importing any plugin.
    """
    return _root_host(click.get_current_context())


def _root_host(ctx: click.Context) -> PluginHost:
    root = ctx.find_root()
    if root.obj is None:
        root.obj = load_plugins()
    return root.obj


class AgentGroup(click.Group):
    """The root command: plugins' own commands (``register_commands``) are added before a
    command is looked up or the commands are listed, so ``--version`` loads no plugin, and
    a plugin may still add to (or replace) any command, as when they were added at start."""

    _commands_from: PluginHost | None = None

    def _add_plugin_commands(self, ctx: click.Context) -> None:
        host = _root_host(ctx)
        if self._commands_from is not host:
            self._commands_from = host
            host.call_each("register_commands", cli=self)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._add_plugin_commands(ctx)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands(ctx)
        return super().list_commands(ctx)


def _load(config_path: str | None) -> tuple[PluginHost, Config]:
    host = _host()
    path, chosen_by = choose_config_path(config_path)
    return host, load_config(path, host, chosen_by)


def _config_failed(error: ConfigError) -> None:
    count = len(error.problems)
    click.echo(f"invalid configuration ({count} problem{'s' if count != 1 else ''}):", err=True)
    for problem in error.problems:
        click.echo(f"  {problem}", err=True)
    sys.exit(EX_CONFIG)


@click.group(cls=AgentGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edge-agent")
def cli() -> None:
    """edge-agent: capture local events, queue them on disk, forward them over MQTT."""


@cli.command()
@config_option
def run(config_path: str | None) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    from edge_agent.runtime import Agent

    setup_logging()
    try:
        host, config = _load(config_path)
        check_state_dir(config)
    except ConfigError as error:
        _config_failed(error)
        return
    setup_logging(config.agent.log_level, config.agent.log_format)
    for warning in config.warnings:
        log.warning("%s", warning)
    for name, message in host.errors:
        log.error("plugin %s %s; running without it", name, message)
    agent = Agent(config, host)
    try:
        agent.install_signal_handlers()
        agent.start()
        agent.run_until_stopped()
    except StateDirBusy as exc:
        log.error("%s", exc)
        sys.exit(1)
    except AgentError as exc:
        log.error("%s", exc)
        agent.stop()
        sys.exit(1)
    agent.stop()


@cli.command()
@config_option
@click.option(
    "--connect",
    is_flag=True,
    help="Also connect each sink (TLS, credentials) and report it; exit 1 if one cannot.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=15.0,
    show_default=True,
    help="With --connect: seconds to wait for the sinks.",
)
def check(config_path: str | None, connect: bool, timeout: float) -> None:
    """Validate the config file and the plugins it names; exit 0, or 78 (invalid).

    With --connect, also connect each sink once, as the agent would, and report
    each one: exit 1 if a sink could not connect."""
    setup_logging("warning")
    path = choose_config_path(config_path)[0]
    try:
        host, config = _load(config_path)
        check_state_dir(config)
    except ConfigError as error:
        _config_failed(error)
        return
    plugin_errors = [(name, message) for name, message in host.errors]
    files = f"{len(config.files)} files, " if os.path.isdir(path) else ""
    click.echo(
        f"{path}: ok ({files}{len(config.sources)} sources, {len(config.sinks)} sinks,"
        f" agent id {config.agent.id!r})"
    )
    for warning in config.warnings:
        click.echo(f"warning: {warning}", err=True)
    for name, message in plugin_errors:
        click.echo(f"warning: plugin {name} {message}", err=True)
    if connect:
        _check_connect(config, timeout)


def _check_connect(config: Config, timeout: float) -> None:
    from edge_agent.probe import probe_sinks

    failed = 0
    # Each line below carries the reason; the libraries' own logs (pika's tracebacks)
    # would only repeat it.
    logging.disable(logging.CRITICAL)
    try:
        probes = probe_sinks(config, timeout)
    finally:
        logging.disable(logging.NOTSET)
    for probe in probes:
        where = f"sink {probe.name} ({probe.target})"
        if probe.problem is None:
            click.echo(f"{where}: connected in {probe.seconds:.2f}s")
        else:
            failed += 1
            click.echo(f"{where}: cannot connect: {probe.problem}")
    if failed:
        click.echo(
            f"{failed} of {len(config.sinks)} sinks could not connect; the agent would keep"
            " their events queued and retry",
            err=True,
        )
        sys.exit(1)


@cli.group()
def config() -> None:
    """Configuration tools: a commented sample."""


@config.command("sample")
@click.argument("plugin_names", metavar="[PLUGIN]...", nargs=-1)
def config_sample(plugin_names: tuple[str, ...]) -> None:
    """Print a commented sample configuration: the core tables and a table for each PLUGIN
    (default: every installed one). A name that is both a source and a sink (mqtt, http)
    gives both; "sources.mqtt" or "sinks.mqtt" gives one."""
    from edge_agent import sample

    host = _host()
    try:
        chosen = sample.select(host, list(plugin_names))
    except sample.UnknownPlugin as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(sample.render(host, chosen), nl=False)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def plugins(as_json: bool) -> None:
    """List installed plugins: name, kind, package, version."""
    host = _host()
    kinds = {"source": 0, "processor": 1, "sink": 2}  # the order events flow through them
    registered = [*host.sources.values(), *host.processors.values(), *host.sinks.values()]
    rows = sorted(registered, key=lambda r: (kinds.get(r.kind, 3), r.name))
    if as_json:
        data = [
            {"name": r.name, "kind": r.kind, "package": r.package, "version": r.version}
            for r in rows
        ]
        errors = [{"plugin": name, "error": message} for name, message in host.errors]
        click.echo(json.dumps({"plugins": data, "errors": errors}, indent=2))
        return
    table = [("NAME", "KIND", "PACKAGE", "VERSION")] + [
        (r.name, r.kind, r.package, r.version) for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    for name, message in host.errors:
        click.echo(f"error: plugin {name} {message}", err=True)


def _state(config_path: str | None) -> Config:
    try:
        config = _load(config_path)[1]
    except ConfigError as error:
        _config_failed(error)
        raise  # not reached
    return config


def _status_state_dir(config_path: str | None, what: str = "Status") -> str:
    """The state directory to read the status from, even while the config file is invalid.

    The running agent goes on with the configuration it read at start, so a
    file edited since must not hide its status. A file that cannot be read at
    all (missing, not a regular file) is still an error (exit 78); an invalid
    one gives its ``[agent] state_dir`` if that can be read, else the default,
    with a warning.
    """
    from edge_agent.config import (
        AgentSettings,
        NotAFile,
        config_files,
        read_small_file,
        state_dir_hint,
    )

    path = choose_config_path(config_path)[0]
    try:
        return _load(config_path)[1].agent.state_dir
    except ConfigError as error:
        try:
            for file in config_files(path):
                read_small_file(file)
        except (OSError, NotAFile, ConfigError):
            _config_failed(error)  # nothing there to read
        count = len(error.problems)
        state_dir = state_dir_hint(path) or AgentSettings().state_dir
        click.echo(
            f"warning: {path} is invalid ({count} problem{'s' if count != 1 else ''}; run"
            f" edge-agent check -c {path}); the agent runs on what it read at its start."
            f" {what} from {state_dir}:",
            err=True,
        )
        return state_dir


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(config_path: str | None, as_json: bool) -> None:
    """How the running agent is doing: sinks, backlog, errors. Exit 1 if it is not running."""
    from edge_agent import status as snapshots

    data, problem = snapshots.read(_status_state_dir(config_path))
    if as_json:
        click.echo(json.dumps({"running": problem is None, "problem": problem, "status": data}))
    elif data is not None:
        click.echo(snapshots.render(data))
    if problem is not None:
        if not as_json:
            click.echo(problem, err=True)
        sys.exit(1)


@cli.command()
@config_option
@click.option(
    "--source",
    "sources",
    multiple=True,
    metavar="GLOB",
    help="Only events of sources whose name matches (repeatable).",
)
@click.option(
    "--type",
    "types",
    multiple=True,
    metavar="GLOB",
    help="Only events whose type matches, e.g. 'file.*' (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="One CloudEvents JSON line per event.")
def tap(config_path: str | None, sources: tuple[str, ...], types: tuple[str, ...], as_json: bool):
    """Show events live as the running agent commits them to its queue (Ctrl-C ends it)."""
    from edge_agent import tap as tapping

    state_dir = _status_state_dir(config_path, "Events")
    sys.exit(tapping.run(state_dir, sources, types, as_json))


@cli.group()
def queue() -> None:
    """Look into the backlog on disk: stats, peek, purge, and dead letters."""


def _store(config: Config):
    from edge_agent.queue import QueueStore

    store = QueueStore(config.agent.state_dir, sync=config.queue.sync)
    if not os.path.exists(store.path):
        raise click.ClickException(f"no queue at {store.path}: the agent has not run yet")
    return store


@contextlib.contextmanager
def _queue_errors(store) -> Iterator[None]:
    """The queue's own errors (a damaged file, above all) as one clear line and exit 1,
    the same for every ``queue`` command."""
    import sqlite3

    try:
        yield
    except AgentError as exc:
        raise click.ClickException(str(exc)) from None
    except sqlite3.DatabaseError as exc:  # damage found below the first page
        raise click.ClickException(f"the queue {store.path} is damaged: {exc}") from None


@queue.command("stats")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def queue_stats(config_path: str | None, as_json: bool) -> None:
    """Events queued, oldest and newest, and each sink's backlog."""
    from edge_agent.queue import read_stats

    config = _state(config_path)
    store = _store(config)
    if as_json:
        from edge_agent.status import queue_stats as stats_data

        with _queue_errors(store):
            click.echo(json.dumps(stats_data(store, config.routes())))
        return
    with _queue_errors(store):
        stats = read_stats(store, config.routes())
    size = sum(
        os.path.getsize(store.path + suffix)
        for suffix in ("", "-wal")
        if os.path.exists(store.path + suffix)
    )
    click.echo(f"{store.path}: {stats.events} events, {size / 2**20:.1f} MiB on disk")
    click.echo(f"oldest {stats.oldest_time or '-'}, newest {stats.newest_time or '-'}")
    for sink, backlog in sorted(stats.sink_backlog.items()):
        configured = "" if sink in {s.name for s in config.sinks} else " (no longer configured)"
        dead = stats.dead_letters.get(sink, 0)
        dead_text = f", {dead} dead letters (edge-agent queue dead list)" if dead else ""
        click.echo(f"sink {sink}: {backlog} waiting{dead_text}{configured}")


@queue.command("peek")
@config_option
@click.option("-n", "count", default=10, show_default=True, help="How many events.")
@click.option(
    "--sink", "sink", default=None, help="Only the events this sink wants and has not confirmed."
)
def queue_peek(config_path: str | None, count: int, sink: str | None) -> None:
    """The oldest queued events, as they will be sent."""
    from edge_agent.queue import peek
    from edge_agent.routing import EVERYTHING

    config = _state(config_path)
    route = config.routes().get(sink, EVERYTHING) if sink else EVERYTHING
    store = _store(config)
    with _queue_errors(store):
        events = peek(store, count, config.agent.id, sink, route)
    for event in events:
        body = json.loads(event.to_cloudevent_json())
        click.echo(json.dumps(body, indent=2, ensure_ascii=False))


@queue.command("purge")
@config_option
@click.option("--sink", "sink", required=True, help="The sink whose backlog to cut.")
@click.option(
    "--before",
    required=True,
    help='Events older than this: a time ("2026-11-20T00:00:00Z") or an age ("7d", "12h").',
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def queue_purge(config_path: str | None, sink: str, before: str, yes: bool) -> None:
    """Give up on a sink's oldest events: they count as confirmed by it.

    An event leaves the queue once every sink that wants it has confirmed (or
    been purged of) it; only the events the sink selects are counted. The queue
    has one writer at a time: stop the agent first (purge refuses while it runs,
    naming its pid), then start it again.
    """
    from edge_agent.queue import purge, purge_plan
    from edge_agent.routing import EVERYTHING

    config = _state(config_path)
    store = _store(config)
    _held = _lock(config, "purge")  # until the command ends
    before_text = _before(before)
    with _queue_errors(store):
        taken, through = purge_plan(store, sink, before_text, config.routes().get(sink, EVERYTHING))
    if not taken:
        click.echo(f"sink {sink} has no events queued before {before_text}; nothing to purge")
        return
    _ask(f"Purge {taken} events queued before {before_text} from sink {sink}'s backlog?", yes)
    with _queue_errors(store):
        purge(store, sink, through)
    click.echo(f"purged {taken} events from sink {sink}")


def _lock(config: Config, doing: str) -> StateDirLock:
    """The state dir's lock, for a command that writes to the queue; refused (naming the
    agent's pid) while the agent runs: the queue has one writer at a time."""
    lock = StateDirLock(config.agent.state_dir)
    try:
        lock.acquire(
            doing=f"stop it first (systemctl stop edge-agent), {doing}, then start it again:"
            " the queue has one writer at a time"
        )
    except AgentError as exc:
        raise click.ClickException(str(exc)) from None
    return lock


def _before(before: str) -> str:
    """``--before``: a time ("2026-11-20T00:00:00Z") or an age ("7d") → RFC 3339 UTC text."""
    from datetime import timedelta

    from edge_agent.units import parse_duration

    try:
        cutoff = datetime.now(UTC) - timedelta(seconds=parse_duration(before))
        return cutoff.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(before.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            'expected a time such as "2026-11-20T00:00:00Z" or an age such as "7d"',
            param_hint="--before",
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ask(question: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.ClickException(f"{question} Refusing without --yes (no terminal to ask).")
    click.confirm(question, abort=True)


@queue.group("dead")
def queue_dead() -> None:
    """Dead letters: events a sink could never deliver, set aside so the rest flow."""


def _dead_connection(config_path: str | None, doing: str | None = None):
    """(a connection to the queue, the state dir's lock or None), for dead letters.

    ``doing``: the command writes, so it takes the lock (keep it until done) and is
    refused while the agent runs."""
    config = _state(config_path)
    store = _store(config)
    lock = _lock(config, doing) if doing is not None else None
    with _queue_errors(store):
        conn = store.connect()
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'dead_letters'").fetchone() is None:
        conn.close()
        raise click.ClickException(
            f"the queue {store.path} has no dead letters: an older version made it; this"
            " version adds them when the agent starts"
        )
    return conn, lock


@queue_dead.command("list")
@config_option
@click.option("--sink", default=None, help="Only this sink's dead letters.")
@click.option("-n", "count", default=None, type=int, help="At most this many, oldest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts (with the data).")
def queue_dead_list(config_path: str | None, sink: str | None, count: int | None, as_json: bool):
    """Each dead letter: sink, event, why it was set aside, attempts, when."""
    from edge_agent import dead_letters

    conn, _ = _dead_connection(config_path)
    try:
        found = dead_letters.listing(conn, sink, count)
    finally:
        conn.close()
    if as_json:
        rows = [
            {
                "sink": d.sink,
                "id": d.id,
                "source": d.source,
                "type": d.type,
                "time": d.time,
                "subject": d.subject,
                "sequence": d.sequence,
                "data": json.loads(d.data_json),
                "reason": d.reason,
                "attempts": d.attempts,
                "dead_at": d.dead_at,
                "retry": d.retry,
            }
            for d in found
        ]
        click.echo(json.dumps(rows, ensure_ascii=False))
        return
    if not found:
        click.echo(f"no dead letters{f' for sink {sink}' if sink else ''}")
        return
    for d in found:
        state = ", retry asked" if d.retry else ""
        click.echo(
            f"sink {d.sink}: event {d.id} ({d.type} from {d.source}, {d.time}),"
            f" set aside {d.dead_at} after {d.attempts} attempt{'s' if d.attempts != 1 else ''}"
            f"{state}"
        )
        click.echo(f"  reason: {d.reason}")


@queue_dead.command("retry")
@config_option
@click.option("--sink", default=None, help="Only this sink's dead letters.")
@click.option("--id", "ids", multiple=True, help="Only the dead letter of this event (repeatable).")
def queue_dead_retry(config_path: str | None, sink: str | None, ids: tuple[str, ...]) -> None:
    """Send dead letters again, ahead of the sink's other events, when the agent starts.

    The queue has one writer at a time: stop the agent first (retry refuses
    while it runs, naming its pid), then start it again. Confirmed, they are
    gone; refused again, they are set aside again.
    """
    from edge_agent import dead_letters

    conn, _held = _dead_connection(config_path, "retry")
    try:
        marked = dead_letters.request_retry(conn, sink, ids)
    except AgentError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        conn.close()
    which = f" of sink {sink}" if sink else ""
    click.echo(f"{marked} dead letters{which} will be sent again when the agent starts")


@queue_dead.command("purge")
@config_option
@click.option("--sink", default=None, help="Only this sink's dead letters.")
@click.option(
    "--before",
    default=None,
    help='Only those set aside before this: a time ("2026-11-20T00:00:00Z") or an age ("7d").',
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def queue_dead_purge(config_path: str | None, sink: str | None, before: str | None, yes: bool):
    """Delete dead letters for good (stop the agent first: one writer at a time)."""
    from edge_agent import dead_letters

    before_text = _before(before) if before else None
    conn, _held = _dead_connection(config_path, "purge dead letters")
    try:
        count = dead_letters.purge_count(conn, sink, before_text)
        which = (f" of sink {sink}" if sink else "") + (
            f" set aside before {before_text}" if before_text else ""
        )
        if not count:
            click.echo(f"no dead letters{which}; nothing to purge")
            return
        _ask(f"Delete {count} dead letters{which} for good?", yes)
        deleted = dead_letters.purge(conn, sink, before_text)
    except AgentError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        conn.close()
    click.echo(f"deleted {deleted} dead letters{which}")


def main() -> None:
    """Entry point of the ``edge-agent`` command: plugins are loaded (once) when a command
    is looked up, so ``edge-agent --version`` loads none."""
    cli(prog_name="edge-agent")
