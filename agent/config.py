"""The configuration file: TOML, environment variables, and validation.

``load_config(path, host)`` reads one TOML file, replaces ``${VAR}`` and
``${VAR:-default}`` in string values from the environment, reads secrets from
``KEY_file`` keys, and validates every table against its schema: the core's
below and each plugin's ``Config``. Every problem is collected and raised at
once as :class:`agent.errors.ConfigError`, each naming the file, the key path
and what was expected.

Relative paths in the file are taken from the working directory, as Vector and
Telegraf do; systemd runs the agent from ``/``, so use absolute paths there.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from agent.drain import UNLIMITED, DrainLimits, parse_limits
from agent.errors import ConfigError, ConfigProblem
from agent.plugins import PluginHost, Registration
from agent.routing import EVERYTHING, Route, parse_route
from agent.schema import ByteSize, Duration, EnvStr, build, option

DEFAULT_CONFIG = "/etc/edge-agent/agent.toml"
#: A config file (or a secret file) larger than this is refused: it is not one.
MAX_FILE_BYTES = 1024 * 1024
CONFIG_ENV = "EDGE_AGENT_CONFIG"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(kw_only=True)
class AgentSettings:
    """The ``[agent]`` table."""

    id: str = option(
        default_factory=socket.gethostname,
        example="gw-01",
        doc="This device's name in event sources and topics. Default: the host name.",
    )
    state_dir: str = option(
        "/var/lib/edge-agent", doc="Where the queue database lives. Must be on local disk."
    )
    log_level: Literal["debug", "info", "warning", "error"] = option(
        "info", doc="Least severe log level written to stderr."
    )
    log_format: Literal["text", "json"] = option(
        "text", doc='"text" for people, "json" (one object a line) for log shippers.'
    )
    shutdown_grace: Duration = option(
        10.0, min=0, doc="On SIGTERM, how long sinks may keep sending the backlog before exit."
    )


@dataclass(kw_only=True)
class QueueSettings:
    """The ``[queue]`` table."""

    sync: Literal["full", "normal"] = option(
        "full",
        doc='"full" survives power loss; "normal" is faster but may lose the last'
        " commits on power loss (never on a crash of the agent alone).",
    )
    commit_max_events: int = option(
        1000, min=1, doc="Most events the writer commits in one transaction (group commit)."
    )
    handoff_max_events: int = option(
        10000, min=1, doc="Events that may wait in memory for the writer before sources block."
    )
    max_bytes: ByteSize = option(
        ByteSize(256 * 1024**2), min=0, doc="Largest the queue may grow (live data plus its WAL)."
    )
    max_events: int = option(0, min=0, doc="Most events queued; 0: no limit.")
    max_age: Duration = option(
        0.0, min=0, doc="Drop events older than this, whatever the policy; 0: keep them."
    )
    when_full: Literal["drop_oldest", "block"] = option(
        "drop_oldest",
        doc='"drop_oldest" deletes the oldest events to make room (counted, logged);'
        ' "block" makes sources wait.',
    )
    reserve_free: ByteSize | None = option(
        None,
        min=0,
        doc="Stop growing the queue while the filesystem has less than this free."
        " Default: 64MiB, or 10% of a smaller filesystem's size.",
    )
    dead_letter_after: int = option(
        3,
        min=0,
        doc="Set an event aside as a dead letter after a sink's destination refused it this"
        " many times in a row, so the events behind it flow (an event that cannot be sent"
        " at all goes at once); 0: never, the sink keeps trying.",
    )


@dataclass(kw_only=True)
class MetricsSettings:
    """The ``[metrics]`` table."""

    listen: str = option(
        "",
        doc='Serve Prometheus metrics on this address, e.g. "127.0.0.1:9108". Empty: off.',
    )

    def __post_init__(self) -> None:
        if self.listen:
            host, sep, port = self.listen.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f'listen must be "host:port", got {self.listen!r}')


@dataclass
class InstanceConfig:
    """One ``[[sources.X]]`` or ``[[sinks.X]]`` table, validated."""

    kind: str
    plugin: str
    name: str
    key: str
    config: Any
    registration: Registration
    index: int = 0  # which [[KIND.PLUGIN]] table of that plugin, counting from 0
    #: A sink's selection (``sources``, ``types``; agent/routing.py); sources' is everything.
    route: Route = EVERYTHING
    #: A sink's ``max_rate``, ``max_bytes_rate`` and ``priority`` (agent/drain.py).
    limits: DrainLimits = UNLIMITED


@dataclass
class Config:
    """A whole, valid configuration file."""

    file: str
    agent: AgentSettings
    queue: QueueSettings
    sources: list[InstanceConfig]
    sinks: list[InstanceConfig]
    processors: list[InstanceConfig] = field(default_factory=list)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    #: Things that work but are probably not meant, as "FILE: KEY: message".
    warnings: list[str] = field(default_factory=list)

    def routes(self) -> dict[str, Route]:
        """Each sink's selection by name (EVERYTHING for a sink that selects nothing)."""
        return {instance.name: instance.route for instance in self.sinks}


def default_config_path() -> str:
    """``$EDGE_AGENT_CONFIG``, else ``/etc/edge-agent/agent.toml``."""
    return os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


def _interpolate(value: Any, path: str, problems: list[tuple[str, str]]) -> Any:
    if isinstance(value, dict):
        return {
            k: _interpolate(v, f"{path}.{k}" if path else k, problems) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        problems.append(
            (path, f"environment variable {name} is not set; set it or write ${{{name}:-default}}")
        )
        return ""

    return EnvStr(_ENV_REF.sub(substitute, value))


def _read_secret_files(
    schema: type | None, table: dict, path: str, problems: list[tuple[str, str]]
) -> dict:
    """Replace ``X_file = "/path"`` by ``X = <file content>`` for secret option X."""
    if schema is None:
        return table
    secret = {f.name for f in fields(schema) if f.metadata.get("secret")}
    known = {f.name for f in fields(schema)}
    table = dict(table)
    for key in list(table):
        base = key.removesuffix("_file")
        if key == base or base not in secret or key in known:
            continue
        file_name = table.pop(key)
        if base in table:
            problems.append((f"{path}.{key}", f"give either {base} or {key}, not both"))
            continue
        if not isinstance(file_name, str):
            problems.append((f"{path}.{key}", "expected a file path (a string)"))
            continue
        try:
            table[base] = read_small_file(file_name).decode("utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError, NotAFile) as exc:
            reason = (
                str(exc)
                if isinstance(exc, NotAFile)
                else exc.strerror
                if isinstance(exc, OSError)
                else "not UTF-8 text"
            )
            problems.append(
                (
                    f"{path}.{key}",
                    f"cannot read {file_name}: {reason}; check the path and permissions",
                )
            )
    return table


def _instances(
    kind: str,
    section: Any,
    host: PluginHost,
    problems: list[tuple[str, str]],
) -> list[InstanceConfig]:
    top = f"{kind}s"
    registry = {"source": host.sources, "sink": host.sinks, "processor": host.processors}[kind]
    if not isinstance(section, dict):
        problems.append(
            (top, f"expected tables such as [[{top}.NAME]], got a {type(section).__name__}")
        )
        return []
    failed = {name for name, _ in host.errors}
    result: list[InstanceConfig] = []
    used: dict[str, str] = {}
    for plugin_name, tables in section.items():
        key = f"{top}.{plugin_name}"
        if isinstance(tables, dict):
            tables = [tables]
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            problems.append((key, f"expected tables written [[{key}]]"))
            continue
        registration = registry.get(plugin_name)
        if registration is None:
            known = ", ".join(sorted(registry)) or "none"
            close = difflib.get_close_matches(plugin_name, registry, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            why = (
                f"plugin {plugin_name!r} is installed but failed to load (see the errors above)"
                if plugin_name in failed
                else f"no {kind} plugin named {plugin_name!r} is installed{hint}"
                f" (installed: {known})"
            )
            problems.append((key, why))
            continue
        schema = registration.cls.Config
        for index, table in enumerate(tables):
            here = f"{key}[{index}]" if len(tables) > 1 else key
            table = dict(table)
            name = table.pop("name", None)
            if name is None:
                name = plugin_name if len(tables) == 1 else f"{plugin_name}-{index + 1}"
            if not isinstance(name, str) or not _NAME.match(name):
                problems.append(
                    (
                        f"{here}.name",
                        "expected a name of letters, digits, '_', '.' or '-' (at most 64),"
                        f" got {name!r}",
                    )
                )
                continue
            if name in used:
                problems.append(
                    (f"{here}.name", f"{kind} name {name!r} is already used by {used[name]}")
                )
                continue
            used[name] = here
            route = parse_route(table, here, name, problems) if kind == "sink" else EVERYTHING
            limits = parse_limits(table, here, problems) if kind == "sink" else UNLIMITED
            table = _read_secret_files(schema, table, here, problems)
            if schema is None:
                takes = (
                    "'name', 'sources', 'types', 'max_rate', 'max_bytes_rate' and 'priority'"
                    if kind == "sink"
                    else "'name'"
                )
                for extra in table:
                    problems.append(
                        (f"{here}.{extra}", f"unknown key ({plugin_name} takes only {takes})")
                    )
                config = None
            else:
                config = build(schema, table, here, problems)
            result.append(
                InstanceConfig(
                    kind, plugin_name, name, here, config, registration, index, route, limits
                )
            )
    return result


_PROCESSOR_HEADER = re.compile(r"^\s*\[\[\s*processors\s*\.\s*([A-Za-z0-9_-]+)\s*\]\]", re.M)


def processor_order(text: str) -> list[str]:
    """Processor plugin names in the order their ``[[processors.NAME]]`` tables appear."""
    return _PROCESSOR_HEADER.findall(text)


def _in_file_order(instances: list[InstanceConfig], order: list[str]) -> list[InstanceConfig]:
    """Interleave processor instances as the file does (TOML groups them by name)."""
    places: dict[tuple[str, int], int] = {}
    seen: dict[str, int] = {}
    for place, name in enumerate(order):
        places[(name, seen.get(name, 0))] = place
        seen[name] = seen.get(name, 0) + 1
    return sorted(instances, key=lambda i: places.get((i.plugin, i.index), len(order)))


def parse_config(
    data: dict, file: str, host: PluginHost, processor_order: list[str] | None = None
) -> Config:
    """Validate an already-parsed TOML document; raise ConfigError listing every problem.

    ``processor_order`` lists processor plugin names in file order (see
    :func:`processor_order`); without it processors run grouped by plugin.
    """
    problems: list[tuple[str, str]] = []
    data = _interpolate(data, "", problems)
    for key in data:
        if key not in ("agent", "queue", "metrics", "sources", "processors", "sinks"):
            problems.append(
                (
                    key,
                    "unknown table (expected agent, queue, metrics, sources, processors or sinks)",
                )
            )
    agent = build(AgentSettings, data.get("agent", {}), "agent", problems)
    queue = build(QueueSettings, data.get("queue", {}), "queue", problems)
    metrics = build(MetricsSettings, data.get("metrics", {}), "metrics", problems)
    if agent is not None and not _NAME.match(agent.id):
        problems.append(
            ("agent.id", f"expected letters, digits, '_', '.' or '-', got {agent.id!r}")
        )
    sources = _instances("source", data.get("sources", {}), host, problems)
    sinks = _instances("sink", data.get("sinks", {}), host, problems)
    processors = _in_file_order(
        _instances("processor", data.get("processors", {}), host, problems),
        processor_order or [],
    )
    if not sinks and "sinks" not in [p[0].split(".")[0] for p in problems]:
        problems.append(("sinks", "no sink is configured; add one such as [[sinks.mqtt]]"))
    if problems:
        raise ConfigError([ConfigProblem(file, key, message) for key, message in problems])
    assert agent is not None and queue is not None and metrics is not None
    return Config(file, agent, queue, sources, sinks, processors, metrics)


def check_state_dir(config: Config) -> None:
    """For ``check`` and ``run``: can this user make and write ``[agent] state_dir``?

    One that cannot be made or written raises ConfigError; a relative one adds
    a warning to ``config.warnings``. Not part of :func:`load_config`: the
    read-only commands (``status``, ``queue stats``) work for a user who may
    only read the state directory.
    """
    key = "agent.state_dir"
    state_dir = config.agent.state_dir
    file = config.file
    problems: list[tuple[str, str]] = []
    if not os.path.isabs(state_dir):
        config.warnings.append(
            f"{file}: {key}: {state_dir!r} is relative, so it depends on the working directory"
            f" (now {os.getcwd()}); systemd starts the agent in /. Use an absolute path"
        )
    path = os.path.abspath(state_dir)
    nearest = path
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    disk = _filesystem_problem(nearest) if os.path.isdir(nearest) else None
    if not os.path.isdir(nearest):
        problems.append((key, f"{nearest} is not a directory, so {path} cannot be made"))
    elif disk is not None:
        problems.append((key, f"{nearest} is on {disk}, so {path} cannot hold the queue"))
    elif not os.access(nearest, os.W_OK | os.X_OK):
        user = _user()
        what = path if nearest == path else f"{nearest}, where {path} would be made,"
        problems.append(
            (
                key,
                f"{what} is not writable by this user ({user}); run as the service user,"
                " make it writable, or choose another folder",
            )
        )
    if problems:
        raise ConfigError([ConfigProblem(file, k, message) for k, message in problems])


def _filesystem_problem(folder: str) -> str | None:
    """Why ``folder``'s filesystem cannot hold a queue (read-only, or no disk behind it
    like /proc and /sys, where even root cannot make files), or None."""
    try:
        info = os.statvfs(folder)
    except OSError:
        return None  # cannot tell: the start will say
    if info.f_flag & os.ST_RDONLY:
        return "a read-only filesystem"
    if info.f_blocks == 0:
        return "a virtual filesystem with no disk behind it (such as /proc or /sys)"
    return None


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


class NotAFile(ValueError):
    """The path names something other than a small regular file (a FIFO, a device, a folder)."""


_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
    stat.S_IFSOCK: "a socket",
}


def read_small_file(path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The content of the regular file at ``path``; NotAFile for anything else or a huge one.

    Opened without blocking, so a FIFO is refused at once instead of waiting
    for a writer; read up to ``limit`` bytes, so ``/dev/zero`` or a log file
    given by mistake cannot exhaust memory. Raises OSError when it cannot be read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
        raise NotAFile(f"is {kind}, not a regular file; give the path of a file")
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        size = f"{limit / 2**20:g} MiB" if limit >= 2**20 else f"{limit // 1024} KiB"
        raise NotAFile(f"is larger than {size}, more than a config file can be; right file?")
    return data


def state_dir_hint(path: str) -> str | None:
    """``[agent] state_dir`` of the file at ``path``, the rest unchecked; None if unreadable.

    For ``edge-agent status`` while the file is invalid: the agent still runs on
    what it read at its start.
    """
    try:
        text = read_small_file(path).decode("utf-8")
    except (OSError, ValueError):  # NotAFile and UnicodeDecodeError too
        return None
    try:
        data = tomllib.loads(text)
    except ValueError:  # a syntax error elsewhere: the [agent] table alone may still parse
        data = {"agent": _table_alone(text, "agent")}
    agent = data.get("agent")
    value = agent.get("state_dir") if isinstance(agent, dict) else None
    if not isinstance(value, str):
        return None
    problems: list[tuple[str, str]] = []
    value = _interpolate(value, "agent.state_dir", problems)
    return None if problems else str(value)


def _table_alone(text: str, name: str) -> dict | None:
    """The ``[name]`` table of a TOML text that does not parse as a whole, or None."""
    lines, inside = [], False
    for line in text.splitlines():
        header = line.strip()
        if header.startswith("["):
            inside = header == f"[{name}]"
            continue
        if inside:
            lines.append(line)
    try:
        return tomllib.loads("\n".join(lines)) if lines else None
    except ValueError:
        return None


def load_config(path: str, host: PluginHost) -> Config:
    """Read and validate the config file at ``path``; raise ConfigError listing every problem."""
    try:
        text = read_small_file(path).decode("utf-8")
        data = tomllib.loads(text)
    except NotAFile as exc:
        raise ConfigError([ConfigProblem(path, "", str(exc))]) from None
    except FileNotFoundError:
        raise ConfigError(
            [ConfigProblem(path, "", "no such file; pass -c FILE or set EDGE_AGENT_CONFIG")]
        ) from None
    except OSError as exc:
        raise ConfigError([ConfigProblem(path, "", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem(path, "", f"not UTF-8 text: {exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem(path, "", f"not valid TOML: {exc}")]) from None
    return parse_config(data, path, host, processor_order(text))
