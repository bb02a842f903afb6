"""Reloading the configuration on SIGHUP, without losing what is in flight.

The new file is read and validated first; if it is invalid, every problem is
logged and the running configuration stays. Otherwise plugin instances are
compared by kind and name: unchanged ones keep running, changed ones restart,
removed ones stop, new ones start. Stopped sources commit what they hold. A
restarted sink carries on from its cursor; a removed sink no longer holds the
queue: its unconfirmed events are deleted once the remaining sinks confirm
them. A plugin that does not stop within 10 s is left running and not
replaced (restart the agent). Changes to ``[agent]``, ``[queue]`` and
``[metrics]`` need a restart and are reported, not applied.

A source renamed and nothing else (same plugin, same settings, and one to one:
exactly one removed instance matches exactly one new one) keeps its
checkpoints: they move to the new name after the old instance stopped and
before the new one starts. Any other new source starts without checkpoints;
when a removed one of the same plugin had some, a warning says what will be
read again. The same rename made while the agent was stopped is recognised at
start from the plugin and settings each source name last ran with.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from edge_agent.config import InstanceConfig, load_config
from edge_agent.errors import ConfigError, QueueError
from edge_agent.queue import QueueStore, checkpoint_owners, move_checkpoints

log = logging.getLogger("edge_agent.reload")

STOP_TIMEOUT = 10.0


def _same(old: InstanceConfig, new: InstanceConfig) -> bool:
    return (
        old.plugin == new.plugin
        and old.config == new.config
        and old.route == new.route
        and old.limits == new.limits
    )


def instance_record(instance: InstanceConfig) -> str:
    """What the queue keeps of a source instance to recognise it after a rename made while
    the agent was stopped: its plugin and a digest of its settings (all but its name)."""
    digest = hashlib.sha256(repr(instance.config).encode()).hexdigest()
    return json.dumps({"plugin": instance.plugin, "settings": digest}, sort_keys=True)


def _plugin_of(record: str | None) -> str | None:
    try:
        return json.loads(record)["plugin"] if record else None
    except (ValueError, KeyError, TypeError):
        return None


def one_to_one(
    olds: Iterable[str], news: Iterable[str], same: Callable[[str, str], bool]
) -> dict[str, str]:
    """Renames, new name -> old name: pairs that are the same and match nothing else."""
    pairs = [(old, new) for old in olds for new in news if same(old, new)]
    old_matches = collections.Counter(old for old, _ in pairs)
    new_matches = collections.Counter(new for _, new in pairs)
    return {new: old for old, new in pairs if old_matches[old] == 1 and new_matches[new] == 1}


def _carry_checkpoints(store: QueueStore, old: str, new: str, when: str) -> None:
    try:
        moved, replaced = move_checkpoints(store, old, new)
    except QueueError as error:
        log.error(
            "%s: source %s was renamed to %s, but its checkpoints could not be carried over"
            " (%s): %s starts without them, as a new source",
            when,
            old,
            new,
            error,
            new,
        )
        return
    log.info(
        "%s: source %s was renamed to %s (same plugin and settings): its checkpoints (%d keys)"
        " are carried over%s; it carries on where %s stopped",
        when,
        old,
        new,
        moved,
        f", replacing {replaced} stale ones of {new}" if replaced else "",
        old,
    )


def _start_at(instance: InstanceConfig) -> str:
    start_at = getattr(instance.config, "start_at", None)
    return f" (start_at = {start_at!r})" if start_at is not None else ""


def warn_unmatched(store: QueueStore, added: list[InstanceConfig], removed: list[str]) -> None:
    """Say what new sources without checkpoints will read again, when removed ones had some."""
    try:
        owners = checkpoint_owners(store)
    except QueueError as error:
        log.error("SIGHUP: %s", error)
        return
    for instance in added:
        if owners.get(instance.name, (0, None))[0]:
            continue
        losers = [
            name
            for name in removed
            if owners.get(name, (0, None))[0]
            and _plugin_of(owners[name][1]) in (None, instance.plugin)
        ]
        if not losers:
            continue
        log.warning(
            "SIGHUP: source %s (plugin %s) has no checkpoints: it starts as a new source and"
            " what it finds is sent again as new events, as its plugin does on a first"
            " start%s. The checkpoints of %s are not carried over: a rename keeps them only"
            " when nothing but the name changed, one old name for one new. To keep them, put"
            " the old name and settings back, reload, then rename alone and reload again.",
            instance.name,
            instance.plugin,
            _start_at(instance),
            ", ".join(losers),
        )


def carry_renames_at_start(store: QueueStore, sources: list[InstanceConfig]) -> None:
    """At start: give a source renamed while the agent was stopped the checkpoints of its
    old name (same plugin and settings, one to one); name the checkpoints nobody owns."""
    try:
        owners = checkpoint_owners(store)
    except QueueError as error:
        log.error("cannot look for renamed sources: %s", error)
        return
    configured = {instance.name: instance for instance in sources}
    orphans = {
        name: (count, record)
        for name, (count, record) in owners.items()
        if count and name not in configured
    }
    fresh = [name for name in configured if not owners.get(name, (0, None))[0]]
    renames = one_to_one(
        orphans,
        fresh,
        lambda old, new: orphans[old][1] == instance_record(configured[new]),
    )
    for new, old in renames.items():
        _carry_checkpoints(store, old, new, "at start")
    for name, (count, record) in orphans.items():
        if name in renames.values():
            continue
        plugin = _plugin_of(record)
        log.warning(
            "source %s%s has checkpoints (%d keys) but is no longer configured. If it was"
            " renamed, the new name starts without them (a rename is recognised at start"
            " only when nothing but the name changed, one old name for one new): to keep"
            " them, start with the old name, then rename it and reload (SIGHUP). If it was"
            " removed, they are kept in case it comes back; to drop them, with the agent"
            " stopped: sqlite3 %s \"DELETE FROM checkpoints WHERE source = '%s'\"",
            name,
            f" (plugin {plugin})" if plugin else "",
            count,
            store.path,
            name,
        )


def _stopped(
    agent: Any,
    kind: str,
    name: str,
    join: Callable[[float], bool],
    stuck: set[tuple[str, str]],
    changes: list[str],
    restarting: bool,
) -> bool:
    """Wait for a stopped instance; a stuck one keeps running and is not replaced."""
    agent.notifier.watchdog()  # stopping plugins one by one is progress too
    if not join(STOP_TIMEOUT):
        log.error(
            "%s %s did not stop within %gs; it keeps running with its old settings"
            " (restart the agent to apply the change)",
            kind,
            name,
            STOP_TIMEOUT,
        )
        stuck.add((kind, name))
        return False
    changes.append(f"{kind} {name} {'restarted' if restarting else 'stopped'}")
    return True


def reload(agent: Any) -> bool:
    """Apply the config file again to the running ``agent``; False if it was refused."""
    path = agent.config.file
    try:
        new = load_config(path, agent.host)
    except ConfigError as error:
        log.error(
            "SIGHUP: the new configuration is refused (%d problem%s); the running one stays:\n  %s",
            len(error.problems),
            "" if len(error.problems) == 1 else "s",
            "\n  ".join(str(p) for p in error.problems),
        )
        return False
    old = agent.config
    for table in ("agent", "queue", "metrics"):
        if getattr(old, table) != getattr(new, table):
            log.warning("SIGHUP: changes to [%s] need a restart; they are not applied now", table)
    changes: list[str] = []
    stuck: set[tuple[str, str]] = set()  # old instances still running: not replaced

    old_sources = {i.name: i for i in old.sources}
    new_sources = {i.name: i for i in new.sources}
    removed = [name for name in old_sources if name not in new_sources]
    added = [name for name in new_sources if name not in old_sources]
    renames = one_to_one(
        removed,
        added,
        lambda old_name, new_name: _same(old_sources[old_name], new_sources[new_name]),
    )
    renamed_to = {old_name: new_name for new_name, old_name in renames.items()}
    for runner in list(agent.sources):
        name = runner.source.name
        if name in new_sources and _same(old_sources[name], new_sources[name]):
            continue
        runner.stop()
        if _stopped(agent, "source", name, runner.join, stuck, changes, name in new_sources):
            agent.sources = [r for r in agent.sources if r is not runner]
            agent.retired[("source", name)] = runner
            if name in renamed_to:  # stopped, and its new self not started yet
                _carry_checkpoints(agent.store, name, renamed_to[name], "SIGHUP")
        elif name in renamed_to:
            stuck.add(("source", renamed_to[name]))  # two of it would read the same things
    warn_unmatched(
        agent.store,
        [new_sources[name] for name in added if name not in renames],
        [name for name in removed if name not in renamed_to],
    )

    old_sinks = {i.name: i for i in old.sinks}
    new_sinks = {i.name: i for i in new.sinks}
    for forwarder in list(agent.forwarders):
        name = forwarder.name
        if name in new_sinks and _same(old_sinks[name], new_sinks[name]):
            continue
        forwarder.abort()  # unconfirmed events stay queued for whoever comes next
        if _stopped(agent, "sink", name, forwarder.join, stuck, changes, name in new_sinks):
            agent.forwarders = [f for f in agent.forwarders if f is not forwarder]
            agent.sinks = [s for s in agent.sinks if s is not forwarder.sink]
            agent.retired[("sink", name)] = forwarder
    # The writer deletes only what every configured sink that wants it confirmed;
    # new selections apply to the events already queued.
    agent.writer.set_sinks(new.routes())

    agent.config = new
    agent.replace_processors()
    running_sinks = {f.name for f in agent.forwarders}
    for instance in new.sinks:
        if instance.name not in running_sinks and ("sink", instance.name) not in stuck:
            agent.start_sink(instance)
            if instance.name not in old_sinks:
                changes.append(f"sink {instance.name} started")
    running_sources = {r.source.name for r in agent.sources}
    started = []
    for instance in new.sources:
        if instance.name not in running_sources and ("source", instance.name) not in stuck:
            started.append(agent.start_source(instance))
            if instance.name not in old_sources:
                changes.append(f"source {instance.name} started")
    agent.wait_until_listening([r for r in started if r is not None])
    log.info(
        "SIGHUP: configuration reloaded from %s: %s",
        path,
        "; ".join(changes) or "no plugin changed",
    )
    return True
