"""Hook specifications: the whole plugin API, one spec per hook, no logic.

A plugin is a module (or object) with functions marked ``@hookimpl`` whose
names and argument names match the specs below. Built-in plugins use exactly
this API. A plugin may implement any subset of the hooks, and may accept
fewer arguments than a spec offers (never more, and never with defaults:
pluggy does not pass arguments that have defaults).

Hooks are grouped by lifecycle: registration (at start-up, in the main
thread), events (in source threads) and the agent's life (main thread).

Order: implementations run in pluggy's order. Those marked
``@hookimpl(tryfirst=True)`` come first, then the unmarked ones, the
last-registered plugin first, then those marked ``trylast=True``. Built-in
plugins register before third-party ones (entry points in the order Python's
``importlib.metadata`` lists them), so a third-party implementation normally
runs before the built-ins'; use ``tryfirst``/``trylast`` when the order
matters. Each implementation is called through pluggy on its own, so pluggy's
tracing and ``add_hookcall_monitoring`` see every call, and one plugin's
exception is logged with its name without stopping the others.

Wrappers (``@hookimpl(wrapper=True)`` or ``hookwrapper=True``) are not
supported: a plugin with one is refused at load time with an error naming it,
and the agent runs without it. A plugin implements a hook at most once (no
second implementation through ``specname``).
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("edge_agent")
hookimpl = pluggy.HookimplMarker("edge_agent")


# -- registration ---------------------------------------------------------


@hookspec
def register_sources(register):
    """Register source classes this plugin provides.

    Called once when plugins are loaded, in the main thread.

    :param register: call ``register(name, cls)`` once per source, where
        ``name`` is the table name in the config (``[[sources.NAME]]``) and
        ``cls`` a subclass of :class:`edge_agent.Source`. A name another plugin
        already registered is an error naming both plugins; that second
        registration is ignored and the rest of the agent carries on.

    Return value is ignored. An exception is logged with the plugin's name and
    that plugin's registrations are skipped.
    """


@hookspec
def register_sinks(register):
    """Register sink classes this plugin provides.

    Called once when plugins are loaded, in the main thread.

    :param register: call ``register(name, cls)`` once per sink, where ``name``
        is the table name in the config (``[[sinks.NAME]]``) and ``cls`` a
        subclass of :class:`edge_agent.Sink`. Duplicate names are handled as for
        :func:`register_sources`.

    Return value is ignored. An exception is logged with the plugin's name.
    """


@hookspec
def register_processors(register):
    """Register processor classes this plugin provides.

    Called once when plugins are loaded, in the main thread.

    :param register: call ``register(name, cls)`` once per processor, where
        ``name`` is what a config's ``[[processors]]`` table gives as its
        ``type`` (``type = "NAME"``) and ``cls`` a subclass of
        :class:`edge_agent.Processor`. Duplicate names are handled as for
        :func:`register_sources`.

    Configured processor instances run in the order of their ``[[processors]]``
    tables in the configuration, after every :func:`process_event` implementation.
    Return value is ignored. An exception is logged with the plugin's name.
    """


@hookspec
def register_commands(cli):
    """Add subcommands to the ``edge-agent`` command line.

    Called once per process, before the command line looks up the command to
    run or lists its commands (``edge-agent --help``); not for
    ``edge-agent --version``, which loads no plugin.

    :param cli: the root ``click.Group``; add commands with ``@cli.command()``.

    Return value is ignored. An exception is logged with the plugin's name and
    the other commands keep working.
    """


@hookspec
def register_remote_commands(register):
    """Register commands that operators may send to the running agent over MQTT.

    Called once when plugins are loaded, in the main thread. Remote commands
    are off by default; an MQTT sink's ``[sinks.mqtt.commands]`` table turns
    them on, and its ``allow`` list names the commands that agent runs (a
    registered command not in the list is refused). See docs/commands.md.

    :param register: call ``register(name, handler)`` once per command.
        ``name`` is one MQTT topic level of lower-case letters, digits, ``-``
        and ``_`` (``"rescan"``, ``"disk-usage"``); the request arrives on
        ``edge/{agent}/cmd/NAME``. The built-in names (``ping``, ``status``,
        ``reload``, ``queue-stats``) and a name another plugin registered are
        errors naming the plugins; that registration is ignored.
        ``handler(arguments)`` is called with the request's arguments (the
        JSON object of its payload; ``{}`` for an empty payload) and returns
        what JSON can encode (a dict, a list, a string, a number, None): the
        ``result`` of the answer. An exception is answered as a failure with
        its message and logged with the plugin's name.

    Handlers run in a thread of their own, one request at a time, never in
    the network thread; one that runs longer than the ``timeout`` of the
    sink's ``commands`` table is answered "timed out" and left to finish (two
    still running make further requests answered "busy" until one returns).
    There is no shell and no configuration write behind this hook: register
    only actions safe for anyone the broker lets publish to the command topic.

    Return value is ignored. An exception is logged with the plugin's name and
    that plugin's registrations are skipped.
    """


# -- events -----------------------------------------------------------------


@hookspec
def process_event(event, agent):
    """Filter, change or enrich an event before it is committed to the queue.

    Called in the emitting source's thread for every event, once per
    implementation, in pluggy's order (``tryfirst`` ones, then the others
    last-registered first, then ``trylast`` ones; see the module's docstring);
    each implementation receives what the previous one returned. Runs before
    the configured processors. Keep it fast: the source waits.

    :param event: the :class:`edge_agent.Event` (``type``, ``source``, ``data``,
        ``subject``, ``id``, ``time``). It may be changed in place.
    :param agent: the running :class:`edge_agent.runtime.Agent`.
    :return: the event (the same or a new one) to keep it, or ``None`` to
        drop it; later implementations are then not called. Returning nothing
        therefore drops the event, so always ``return event``.

    An exception is logged with the plugin's name and the event is kept
    unchanged by that implementation.
    """


# -- the agent's life -------------------------------------------------------


@hookspec
def startup(agent):
    """The agent has opened its queue and is about to start sources and sinks.

    Called once in the main thread. :param agent: the running agent.
    Implementations run in pluggy's order. Return value is ignored; an
    exception is logged with the plugin's name and start-up carries on.
    """


@hookspec
def shutdown(agent):
    """The agent has stopped its sources and sinks and is about to exit.

    Called once in the main thread, after the queue has committed everything
    it held. :param agent: the agent. Implementations run in pluggy's order.
    Return value is ignored; an exception is logged with the plugin's name.
    """
