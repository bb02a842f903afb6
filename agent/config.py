"""The configuration: TOML, environment variables, and validation.

``load_config(path, host)`` reads one TOML file, or every ``*.toml`` file of a
folder in name order (merged by the rules of :func:`parse_documents`),
replaces ``${VAR}`` and ``${VAR:-default}`` in string values from the
environment, reads secrets from ``KEY_file`` keys, and validates every table
against its schema: the core's below and each plugin's ``Config``. Every
problem is collected and raised at once as :class:`edge_agent.errors.ConfigError`,
each naming the file, the key path and what was expected.

Relative paths in the file are taken from the working directory, as Vector and
Telegraf do; systemd runs the agent from ``/``, so use absolute paths there.
"""

from __future__ import annotations

import collections
import difflib
import os
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from edge_agent.drain import UNLIMITED, DrainLimits, parse_limits
from edge_agent.errors import ConfigError, ConfigProblem
from edge_agent.plugin_host import PluginHost, Registration
from edge_agent.routing import EVERYTHING, Route, parse_route
from edge_agent.schema import ByteSize, Duration, EnvStr, build, option

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
    """One ``[[sources.X]]``, ``[[sinks.X]]`` or ``[[processors]]`` table, validated."""

    kind: str
    plugin: str
    name: str
    key: str
    config: Any
    registration: Registration
    index: int = 0  # which table of that plugin (in every file), counting from 0
    #: A sink's selection (``sources``, ``types``; agent/routing.py); sources' is everything.
    route: Route = EVERYTHING
    #: The file the table is in (``key`` is its path there).
    file: str = ""
    #: A sink's ``max_rate``, ``max_bytes_rate`` and ``priority`` (agent/drain.py).
    limits: DrainLimits = UNLIMITED


@dataclass
class Config:
    """A whole, valid configuration: one file, or the files of a config folder."""

    #: What was read: the file, or the folder (see ``files``).
    file: str
    agent: AgentSettings
    queue: QueueSettings
    sources: list[InstanceConfig]
    sinks: list[InstanceConfig]
    processors: list[InstanceConfig] = field(default_factory=list)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    #: Things that work but are probably not meant, as "FILE: KEY: message".
    warnings: list[str] = field(default_factory=list)
    #: The files read, in order: ``[file]``, or a folder's ``*.toml`` files by name.
    files: list[str] = field(default_factory=list)
    #: Which file set each ``[agent]``, ``[queue]`` and ``[metrics]`` key ("queue.max_age").
    origins: dict[str, str] = field(default_factory=dict)

    def file_of(self, key: str) -> str:
        """The file that set ``key`` (such as ``agent.state_dir``), else :attr:`file`."""
        return _file_of(key, self.origins, self.file)

    def routes(self) -> dict[str, Route]:
        """Each sink's selection by name (EVERYTHING for a sink that selects nothing)."""
        return {instance.name: instance.route for instance in self.sinks}


def default_config_path() -> str:
    """``$EDGE_AGENT_CONFIG``, else ``/etc/edge-agent/agent.toml``."""
    return os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


def choose_config_path(given: str | None) -> tuple[str, str]:
    """(the config path to read, where it came from): ``-c``, then ``$EDGE_AGENT_CONFIG``,
    then the default; the second is for the message when nothing is there."""
    if given:
        return given, "-c"
    if os.environ.get(CONFIG_ENV):
        return os.environ[CONFIG_ENV], f"${CONFIG_ENV}"
    return DEFAULT_CONFIG, "the default"


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


@dataclass
class _Table:
    """One instance table as written: its file, its key path there, its plugin name."""

    file: str
    key: str
    plugin: str
    table: dict


def _tables(kind: str, file: str, section: Any, problems: list[ConfigProblem]) -> list[_Table]:
    """The ``[[sources.PLUGIN]]`` or ``[[sinks.PLUGIN]]`` tables of one file, in its order."""
    top = f"{kind}s"
    if not isinstance(section, dict):
        problems.append(
            ConfigProblem(
                file, top, f"expected tables such as [[{top}.NAME]], got a {type(section).__name__}"
            )
        )
        return []
    found: list[_Table] = []
    for plugin_name, tables in section.items():
        key = f"{top}.{plugin_name}"
        if isinstance(tables, dict):
            tables = [tables]
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            problems.append(ConfigProblem(file, key, f"expected tables written [[{key}]]"))
            continue
        for index, table in enumerate(tables):
            here = f"{key}[{index}]" if len(tables) > 1 else key
            found.append(_Table(file, here, plugin_name, dict(table)))
    return found


def _processor_tables(file: str, section: Any, problems: list[ConfigProblem]) -> list[_Table]:
    """The ``[[processors]]`` tables of one file, in its order, each named by its ``type``.

    The older form, ``[[processors.PLUGIN]]``, is refused: TOML groups those
    tables by plugin name, so the order they were written in across plugins is
    lost before the agent sees them, and processors run in order.
    """
    if isinstance(section, dict):
        for plugin_name in section:
            problems.append(
                ConfigProblem(
                    file,
                    f"processors.{plugin_name}",
                    f"[[processors.{plugin_name}]] is no longer read, since TOML does not keep"
                    " the order of such tables across plugins; write each processor as"
                    f' [[processors]] with type = "{plugin_name}" (its other keys unchanged),'
                    " in the order they should run",
                )
            )
        return []
    if not isinstance(section, list) or not all(isinstance(t, dict) for t in section):
        problems.append(
            ConfigProblem(
                file,
                "processors",
                'expected tables written [[processors]], each with a type such as type = "drop"',
            )
        )
        return []
    found: list[_Table] = []
    for index, table in enumerate(section):
        here = f"processors[{index}]"
        table = dict(table)
        nested = [
            k for k, v in table.items() if isinstance(v, list) and v and isinstance(v[0], dict)
        ]
        for key in nested:  # [[processors.KEY]] after a [[processors]]: TOML nests it there
            del table[key]
            problems.append(
                ConfigProblem(
                    file,
                    f"{here}.{key}",
                    f"[[processors.{key}]] is read by TOML as part of the [[processors]] table"
                    f' before it; write it as [[processors]] with type = "{key}"',
                )
            )
        plugin_name = table.pop("type", None)
        if not isinstance(plugin_name, str) or not plugin_name:
            got = "nothing" if plugin_name is None else repr(plugin_name)
            problems.append(
                ConfigProblem(
                    file,
                    f"{here}.type",
                    f'expected the processor plugin\'s name, such as type = "drop", got {got}',
                )
            )
            continue
        found.append(_Table(file, here, plugin_name, table))
    return found


def _instances(
    kind: str, found: list[_Table], host: PluginHost, problems: list[ConfigProblem]
) -> list[InstanceConfig]:
    """Validate the tables of one kind, from every file, in order; names unique across them."""
    registry = {"source": host.sources, "sink": host.sinks, "processor": host.processors}[kind]
    failed = {name for name, _ in host.errors}
    result: list[InstanceConfig] = []
    used: dict[str, _Table] = {}
    counts = collections.Counter(t.plugin for t in found)
    seen: collections.Counter[str] = collections.Counter()
    refused: set[tuple[str, str]] = set()
    for item in found:
        here, file = item.key, item.file
        index = seen[item.plugin]
        seen[item.plugin] += 1
        registration = registry.get(item.plugin)
        if registration is None:
            if (file, item.plugin) in refused:
                continue
            refused.add((file, item.plugin))
            known = ", ".join(sorted(registry)) or "none"
            close = difflib.get_close_matches(item.plugin, registry, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            why = (
                f"plugin {item.plugin!r} is installed but failed to load (see the errors above)"
                if item.plugin in failed
                else f"no {kind} plugin named {item.plugin!r} is installed{hint}"
                f" (installed: {known})"
            )
            at = f"{here}.type" if kind == "processor" else here.partition("[")[0]
            problems.append(ConfigProblem(file, at, why))
            continue
        schema = registration.cls.Config
        if kind == "processor" and schema is not None and "type" in _field_names(schema):
            problems.append(
                ConfigProblem(
                    file,
                    f"{here}.type",
                    f"processor plugin {item.plugin!r} has an option named 'type', which every"
                    " [[processors]] table uses for its plugin's name, so it cannot be set;"
                    " the plugin must rename it",
                )
            )
            continue
        table = dict(item.table)
        name = table.pop("name", None)
        if name is None:
            name = item.plugin if counts[item.plugin] == 1 else f"{item.plugin}-{index + 1}"
        if not isinstance(name, str) or not _NAME.match(name):
            problems.append(
                ConfigProblem(
                    file,
                    f"{here}.name",
                    "expected a name of letters, digits, '_', '.' or '-' (at most 64),"
                    f" got {name!r}",
                )
            )
            continue
        if name in used:
            other = used[name]
            where = other.key if other.file == file else f"{other.key} in {other.file}"
            problems.append(
                ConfigProblem(
                    file, f"{here}.name", f"{kind} name {name!r} is already used by {where}"
                )
            )
            continue
        used[name] = item
        local: list[tuple[str, str]] = []
        route = parse_route(table, here, name, local) if kind == "sink" else EVERYTHING
        limits = parse_limits(table, here, local) if kind == "sink" else UNLIMITED
        table = _read_secret_files(schema, table, here, local)
        if schema is None:
            takes = (
                "'name', 'sources', 'types', 'max_rate', 'max_bytes_rate' and 'priority'"
                if kind == "sink"
                else "'name'"
            )
            if kind == "processor":
                takes = "'type' and 'name'"
            for extra in table:
                local.append((f"{here}.{extra}", f"unknown key ({item.plugin} takes only {takes})"))
            config = None
        else:
            config = build(schema, table, here, local)
        problems += [ConfigProblem(file, key, message) for key, message in local]
        result.append(
            InstanceConfig(
                kind, item.plugin, name, here, config, registration, index, route, file, limits
            )
        )
    return result


def _field_names(schema: type) -> set[str]:
    return {f.name for f in fields(schema)}


#: The tables a configuration has; the first three hold settings, the others plugin instances.
CORE_TABLES = ("agent", "queue", "metrics")
TOP_LEVEL = (*CORE_TABLES, "sources", "processors", "sinks")


def parse_config(data: dict, file: str, host: PluginHost) -> Config:
    """Validate one already-parsed TOML document; raise ConfigError listing every problem."""
    return parse_documents([(file, data)], file, host)


def parse_documents(documents: list[tuple[str, dict]], origin: str, host: PluginHost) -> Config:
    """Validate parsed TOML documents as one configuration, merged in the order given.

    ``documents`` is ``[(file, data), ...]``; ``origin`` is what was asked for
    (the file, or the folder the files came from). The merge rules, for a
    config folder: each key of ``[agent]``, ``[queue]`` and ``[metrics]`` may be
    set in one file only; ``[[sources.X]]``, ``[[sinks.X]]`` and
    ``[[processors]]`` tables add up in file order; instance names are unique
    across the files. Every problem names its file and key path.
    """
    problems: list[ConfigProblem] = []
    core: dict[str, dict[str, Any]] = {table: {} for table in CORE_TABLES}
    origins: dict[str, str] = {}
    found: dict[str, list[_Table]] = {"source": [], "sink": [], "processor": []}
    for file, raw in documents:
        local: list[tuple[str, str]] = []
        data = _interpolate(raw, "", local)
        problems += [ConfigProblem(file, key, message) for key, message in local]
        for key in data:
            if key not in TOP_LEVEL:
                problems.append(
                    ConfigProblem(
                        file,
                        key,
                        "unknown table (expected agent, queue, metrics, sources, processors"
                        " or sinks)",
                    )
                )
        for table in CORE_TABLES:
            if table not in data:
                continue
            section = data[table]
            origins.setdefault(table, file)
            if not isinstance(section, dict):
                problems.append(
                    ConfigProblem(file, table, f"expected a table [{table}], got a value")
                )
                continue
            for key, value in section.items():
                path = f"{table}.{key}"
                if path in origins:
                    problems.append(
                        ConfigProblem(
                            file,
                            path,
                            f"already set in {origins[path]}; set each [{table}] key in one"
                            " file only",
                        )
                    )
                    continue
                origins[path] = file
                core[table][key] = value
        found["source"] += _tables("source", file, data.get("sources", {}), problems)
        found["sink"] += _tables("sink", file, data.get("sinks", {}), problems)
        found["processor"] += _processor_tables(file, data.get("processors", []), problems)

    def file_of(key: str) -> str:
        return _file_of(key, origins, origin)

    local = []
    agent = build(AgentSettings, core["agent"], "agent", local)
    queue = build(QueueSettings, core["queue"], "queue", local)
    metrics = build(MetricsSettings, core["metrics"], "metrics", local)
    if agent is not None and not _NAME.match(agent.id):
        local.append(("agent.id", f"expected letters, digits, '_', '.' or '-', got {agent.id!r}"))
    problems += [ConfigProblem(file_of(key), key, message) for key, message in local]
    sources = _instances("source", found["source"], host, problems)
    sinks = _instances("sink", found["sink"], host, problems)
    processors = _instances("processor", found["processor"], host, problems)
    if not sinks and not any(p.key.startswith("sinks") for p in problems):
        where = "" if len(documents) == 1 else " in any of its files"
        problems.append(
            ConfigProblem(
                origin, "sinks", f"no sink is configured{where}; add one such as [[sinks.mqtt]]"
            )
        )
    if problems:
        raise ConfigError(problems)
    assert agent is not None and queue is not None and metrics is not None
    return Config(
        origin,
        agent,
        queue,
        sources,
        sinks,
        processors,
        metrics,
        files=[file for file, _ in documents],
        origins=origins,
    )


def _file_of(key: str, origins: dict[str, str], default: str) -> str:
    """The file that set ``key`` (``agent.state_dir``) or its nearest table; else ``default``."""
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return default


def check_state_dir(config: Config) -> None:
    """For ``check`` and ``run``: can this user make and write ``[agent] state_dir``?

    One that cannot be made or written raises ConfigError; a relative one adds
    a warning to ``config.warnings``. Not part of :func:`load_config`: the
    read-only commands (``status``, ``queue stats``) work for a user who may
    only read the state directory.
    """
    key = "agent.state_dir"
    state_dir = config.agent.state_dir
    file = config.file_of(key)
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


def config_files(path: str) -> list[str]:
    """The files ``-c path`` names: the file itself, or a folder's ``*.toml`` files.

    A folder's files are taken in name order (byte order of their names: start
    them with numbers, ``10-agent.toml``, ``50-sinks.toml``, to choose it);
    names starting with ``.`` and sub-folders are skipped. A folder without
    any such file raises ConfigError. A path that is not a folder is returned
    as it is, to be read (or found missing) by :func:`load_config`.
    """
    if not os.path.isdir(path):
        return [path]
    try:
        names = os.listdir(path)
    except OSError as exc:
        raise ConfigError(
            [ConfigProblem(path, "", f"cannot list this config folder: {exc.strerror}")]
        ) from None
    chosen = [
        name
        for name in names
        if name.endswith(".toml")
        and not name.startswith(".")
        and not os.path.isdir(os.path.join(path, name))
    ]
    if not chosen:
        raise ConfigError(
            [
                ConfigProblem(
                    path,
                    "",
                    "a config folder with no *.toml files; put the configuration in files"
                    " such as agent.toml there, or pass -c FILE",
                )
            ]
        )
    return [os.path.join(path, name) for name in sorted(chosen, key=os.fsencode)]


def state_dir_hint(path: str) -> str | None:
    """``[agent] state_dir`` of the config at ``path`` (a file or a folder), the rest
    unchecked; None if no file says it or none can be read.

    For ``edge-agent status`` while the configuration is invalid: the agent still
    runs on what it read at its start.
    """
    try:
        files = config_files(path)
    except ConfigError:
        return None
    for file in files:
        hint = _state_dir_of(file)
        if hint is not None:
            return hint
    return None


def _state_dir_of(path: str) -> str | None:
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


def load_config(path: str, host: PluginHost, chosen_by: str = "") -> Config:
    """Read and validate the configuration at ``path``; raise ConfigError listing every problem.

    ``path`` is a file, or a folder whose ``*.toml`` files are read in name order
    and merged (see :func:`config_files` and :func:`parse_documents`).
    ``chosen_by`` says where the path came from (``"-c"``, ``"$EDGE_AGENT_CONFIG"``,
    ``"the default"``), for the message when nothing is there.
    """
    files = config_files(path)
    documents: list[tuple[str, dict]] = []
    problems: list[ConfigProblem] = []
    for file in files:
        try:
            documents.append((file, _read_toml(file)))
        except FileNotFoundError:
            problems.append(
                ConfigProblem(file, "", _missing(file, chosen_by if file == path else ""))
            )
        except _Unreadable as exc:
            problems.append(ConfigProblem(file, "", str(exc)))
    if problems:
        raise ConfigError(problems)
    return parse_documents(documents, path, host)


class _Unreadable(ValueError):
    """A config file that cannot be read as TOML; the message says why."""


def _read_toml(file: str) -> dict:
    try:
        return tomllib.loads(read_small_file(file).decode("utf-8"))
    except NotAFile as exc:
        raise _Unreadable(str(exc)) from None
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _Unreadable(f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise _Unreadable(f"not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise _Unreadable(f"not valid TOML: {exc}") from None


def _missing(path: str, chosen_by: str) -> str:
    """What to say when nothing is at the config ``path``: where it looked, and why there."""
    looked = os.path.abspath(path)
    folder = os.path.dirname(looked)
    why = {"-c": ", given with -c", "the default": ", the default path"}.get(
        chosen_by, f", from {chosen_by}" if chosen_by else ""
    )
    gone = "" if os.path.isdir(folder) else f"; the folder {folder} does not exist either"
    text = f"no such file or folder (looked for {looked}{why}{gone})"
    if chosen_by == "the default":
        return f"{text}; pass -c FILE or set {CONFIG_ENV} to the agent's configuration"
    return f"{text}; check the path" if chosen_by else text
