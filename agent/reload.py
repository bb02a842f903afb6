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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from agent.config import InstanceConfig, load_config
from agent.errors import ConfigError

log = logging.getLogger("edge_agent.reload")

STOP_TIMEOUT = 10.0


def _same(old: InstanceConfig, new: InstanceConfig) -> bool:
    return old.plugin == new.plugin and old.config == new.config


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
    for runner in list(agent.sources):
        name = runner.source.name
        if name in new_sources and _same(old_sources[name], new_sources[name]):
            continue
        runner.stop()
        if _stopped(agent, "source", name, runner.join, stuck, changes, name in new_sources):
            agent.sources = [r for r in agent.sources if r is not runner]
            agent.retired[("source", name)] = runner

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
    # The writer deletes only what every configured sink confirmed.
    agent.writer.sink_names = [i.name for i in new.sinks]

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
