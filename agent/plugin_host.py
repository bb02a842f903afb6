"""The plugin manager: finds plugins through entry points and collects what they register.

Built-in and third-party plugins are found the same way: modules named in the
``edge_agent`` entry-point group. Each is loaded inside its own try/except, so
a broken plugin is reported by name and never stops the others.
``EDGE_AGENT_LOAD_PLUGINS=file,mqtt`` restricts loading to those entry points
(an empty value loads none), which helps when hunting a misbehaving plugin.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy

from edge_agent import hookspecs
from edge_agent.api import Processor, Sink, Source
from edge_agent.commands import BUILTIN_COMMANDS, RemoteCommand, command_name_problem
from edge_agent.event import Event

log = logging.getLogger("edge_agent.plugins")

ENTRY_POINT_GROUP = "edge_agent"
#: A hook or processor slower than this (seconds) is reported.
SLOW_HOOK = 1.0
SLOW_WARN_EVERY = 60.0
LOAD_PLUGINS_ENV = "EDGE_AGENT_LOAD_PLUGINS"


@dataclass(frozen=True)
class Registration:
    """One registered source or sink class and where it came from."""

    name: str
    kind: str  # "source", "sink" or "processor"
    cls: type
    plugin: str
    package: str
    version: str


class SlowReporter:
    """Warns, at most once a minute per culprit, when a hook or processor takes too long.

    Sources wait for processors and hooks, so a slow one slows every source.
    Calls are timed with :meth:`timed`; :meth:`report_stuck`, called from the
    main loop, also names a call that has not returned at all.
    """

    def __init__(self, threshold: float = SLOW_HOOK) -> None:
        self.threshold = threshold
        self._warned: dict[str, float] = {}
        self._running: dict[int, tuple[str, float]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def timed(self, who: str) -> Iterator[None]:
        """Time the block; warn if it took longer than the threshold."""
        token = object()
        started = time.monotonic()
        with self._lock:
            self._running[id(token)] = (who, started)
        try:
            yield
        finally:
            with self._lock:
                del self._running[id(token)]
            seconds = time.monotonic() - started
            if seconds >= self.threshold:
                self._warn(who, f"took {seconds:.1f}s")

    def report_stuck(self) -> None:
        """Warn about calls still running past the threshold (a hook that blocks)."""
        now = time.monotonic()
        with self._lock:
            running = list(self._running.values())
        for who, started in running:
            if now - started >= self.threshold:
                self._warn(who, f"has been running for {now - started:.0f}s")

    def _warn(self, who: str, what: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._warned.get(who, -SLOW_WARN_EVERY) < SLOW_WARN_EVERY:
                return
            self._warned[who] = now
        log.warning(
            "%s %s (more than %.1fs); what waits for it is held up: make it faster or move"
            " the slow work out of the event path",
            who,
            what,
            self.threshold,
        )


@dataclass
class PluginHost:
    """The loaded plugins: the pluggy manager and the registered sources and sinks."""

    pm: pluggy.PluginManager
    sources: dict[str, Registration] = field(default_factory=dict)
    sinks: dict[str, Registration] = field(default_factory=dict)
    processors: dict[str, Registration] = field(default_factory=dict)
    #: Commands plugins registered for remote requests (``register_remote_commands``).
    remote_commands: dict[str, RemoteCommand] = field(default_factory=dict)
    #: (plugin name, message) for every plugin that failed to load or register.
    errors: list[tuple[str, str]] = field(default_factory=list)
    _origins: dict[str, tuple[str, str]] = field(default_factory=dict)
    slow: SlowReporter = field(default_factory=lambda: SlowReporter())
    _caller_cache: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def _callers(self, hook_name: str) -> list[tuple[str, Any]]:
        """One hook caller per implementing plugin, in the order pluggy calls them.

        pluggy calls ``tryfirst`` implementations first, then the others
        last-registered first, then ``trylast`` ones. Each caller here is
        pluggy's own (``PluginManager.subset_hook_caller``) restricted to one
        plugin, so a call goes through pluggy, its tracing and hook-call
        monitoring see it, and one plugin's exception does not stop the rest.
        """
        cached = self._caller_cache.get(hook_name)
        if cached is not None:
            return cached
        hook = getattr(self.pm.hook, hook_name)
        plugins = self.pm.get_plugins()
        callers = []
        for impl in reversed(hook.get_hookimpls()):  # pluggy calls from the end
            others = [p for p in plugins if p is not impl.plugin]
            callers.append((impl.plugin_name, self.pm.subset_hook_caller(hook_name, others)))
        self._caller_cache[hook_name] = callers
        return callers

    def call_each(self, hook_name: str, **kwargs: Any) -> None:
        """Call a hook one plugin at a time, in pluggy's order, logging each plugin's failure."""
        for plugin_name, caller in self._callers(hook_name):
            try:
                with self.slow.timed(f"plugin {plugin_name}'s {hook_name} hook"):
                    caller(**kwargs)
            except Exception as exc:
                log.exception("plugin %s failed in hook %s: %s", plugin_name, hook_name, exc)

    @property
    def processes_events(self) -> bool:
        """True if some plugin implements ``process_event`` (else events skip the chain)."""
        return bool(self._callers("process_event"))

    def process_event(self, event: Event, agent: Any) -> Event | None:
        """Run the ``process_event`` chain in pluggy's order; None when one dropped the event."""
        for plugin_name, caller in self._callers("process_event"):
            try:
                with self.slow.timed(f"plugin {plugin_name}'s process_event hook"):
                    (result,) = caller(event=event, agent=agent) or [None]
            except Exception as exc:
                log.error(
                    "plugin %s raised in process_event for %s event from %s: %s;"
                    " the event is kept as it was",
                    plugin_name,
                    event.type,
                    event.source,
                    exc,
                )
                continue
            if result is None:
                return None
            event = result
        return event

    def _refuse(self, plugin: Any) -> str | None:
        """Why pluggy's registration of ``plugin`` cannot be used here, or None."""
        for caller in self.pm.get_hookcallers(plugin) or []:
            impls = [i for i in caller.get_hookimpls() if i.plugin is plugin]
            for impl in impls:
                if impl.wrapper or impl.hookwrapper:
                    kind = "wrapper=True" if impl.wrapper else "hookwrapper=True"
                    return (
                        f"implements {caller.name} as a {kind} hook, which edge-agent does not"
                        " support (it calls each plugin's implementation on its own); drop the"
                        " option and implement the hook plainly"
                    )
            if len(impls) > 1:
                return (
                    f"implements {caller.name} {len(impls)} times (through specname); edge-agent"
                    " calls a plugin's implementation of a hook once: merge them into one function"
                )
        return None

    def register_plugin(self, plugin: Any, name: str, package: str, version: str) -> bool:
        """Register one plugin object and collect its sources and sinks; False on failure."""
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            self.errors.append((name, f"cannot be registered: {exc}"))
            return False
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            self.errors.append((name, f"implements an unknown hook: {exc}"))
            return False
        refused = self._refuse(plugin)
        if refused:
            self.pm.unregister(plugin)
            self.errors.append((name, refused))
            return False
        self._caller_cache.clear()
        self._origins[name] = (package, version)
        self._collect(plugin, name)
        return True

    def _collect(self, plugin: Any, plugin_name: str) -> None:
        package, version = self._origins[plugin_name]
        for kind, hook_name, base, table in (
            ("source", "register_sources", Source, self.sources),
            ("sink", "register_sinks", Sink, self.sinks),
            ("processor", "register_processors", Processor, self.processors),
        ):
            impls = [
                i for i in getattr(self.pm.hook, hook_name).get_hookimpls() if i.plugin is plugin
            ]

            def register(name: str, cls: type, *, _kind=kind, _base=base, _table=table) -> None:
                if not (isinstance(cls, type) and issubclass(cls, _base)):
                    raise TypeError(
                        f"{_kind} {name!r} must be a subclass of agent.{_base.__name__}"
                    )
                if name in _table:
                    other = _table[name].plugin
                    self.errors.append(
                        (
                            plugin_name,
                            f"registers {_kind} {name!r}, which plugin {other!r} already"
                            f" registered; keeping {other!r}'s. Uninstall one of them.",
                        )
                    )
                    return
                _table[name] = Registration(name, _kind, cls, plugin_name, package, version)

            for impl in impls:
                try:
                    impl.function(register)
                except Exception as exc:
                    self.errors.append((plugin_name, f"failed in {hook_name}: {exc}"))
        self._collect_remote_commands(plugin, plugin_name)

    def _collect_remote_commands(self, plugin: Any, plugin_name: str) -> None:
        hook = self.pm.hook.register_remote_commands
        impls = [i for i in hook.get_hookimpls() if i.plugin is plugin]
        found: dict[str, RemoteCommand] = {}

        def register(name: str, handler: Any) -> None:
            problem = command_name_problem(name)
            if problem is not None:
                raise ValueError(f"remote command {name!r}: {problem}")
            if not callable(handler):
                raise TypeError(f"remote command {name!r}: the handler must be callable")
            if name in BUILTIN_COMMANDS:
                self.errors.append(
                    (
                        plugin_name,
                        f"registers remote command {name!r}, a built-in command's name;"
                        " ignoring it. Choose another name.",
                    )
                )
                return
            other = self.remote_commands.get(name) or found.get(name)
            if other is not None:
                self.errors.append(
                    (
                        plugin_name,
                        f"registers remote command {name!r}, which plugin {other.plugin!r}"
                        f" already registered; keeping {other.plugin!r}'s. Uninstall one of them.",
                    )
                )
                return
            found[name] = RemoteCommand(name, handler, plugin_name)

        for impl in impls:
            try:
                impl.function(register)
            except Exception as exc:
                self.errors.append((plugin_name, f"failed in register_remote_commands: {exc}"))
                return  # as the docstring says: that plugin's registrations are skipped
        self.remote_commands.update(found)


def load_plugins(extra: list[tuple[Any, str]] | None = None) -> PluginHost:
    """Load every plugin in the ``edge_agent`` entry-point group, then ``extra`` ones.

    ``extra`` is a list of ``(plugin object, name)`` registered after the
    entry points, for tests and embedding. Never raises for a bad plugin: the
    problem is recorded in ``PluginHost.errors`` for the caller to report.
    """
    pm = pluggy.PluginManager("edge_agent")
    pm.add_hookspecs(hookspecs)
    host = PluginHost(pm=pm)
    wanted = os.environ.get(LOAD_PLUGINS_ENV)
    allowed = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}

    seen: set[str] = set()
    # (name, version) per distribution: each read parses its METADATA file again.
    origins: dict[int, tuple[str, str]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in seen or (allowed is not None and ep.name not in allowed):
            continue
        seen.add(ep.name)
        dist = ep.dist
        if dist is None:
            package, version = "?", "?"
        else:
            if id(dist) not in origins:
                metadata = dist.metadata
                origins[id(dist)] = (metadata["Name"], metadata["Version"])
            package, version = origins[id(dist)]
        try:
            plugin = ep.load()
        except Exception as exc:
            host.errors.append((ep.name, f"failed to import {ep.value!r} from {package}: {exc}"))
            continue
        host.register_plugin(plugin, ep.name, package, version)

    for plugin, name in extra or []:
        host.register_plugin(plugin, name, "(registered in code)", "")

    return host
