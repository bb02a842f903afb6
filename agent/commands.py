"""Remote commands: the allow-listed actions an operator may ask a running agent for.

This module knows nothing of MQTT. A transport (the MQTT sink's ``commands``
table, :mod:`edge_agent.plugins.mqtt_commands`) hands each request to
:meth:`Dispatcher.answer` as a command name and a raw payload, and sends the
returned answer back to the requester. Built-in commands:

- ``ping``: the agent's id, version and time: it is alive and reachable;
- ``status``: the status snapshot, as ``edge-agent status --json`` prints it;
- ``reload``: read the configuration file again, as SIGHUP does;
- ``queue-stats``: the queue, as ``edge-agent queue stats --json`` prints it;

and those plugins register through the ``register_remote_commands`` hook.
There is no shell and no configuration write. An answer is a JSON object:
``{"agent", "command", "ok": true, "result"}``, or ``{"agent", "command",
"ok": false, "code", "error"}`` where ``code`` is one of :data:`CODES`.

Handlers run one at a time in a thread of their own (never the transport's
network thread); one that overruns its timeout is answered ``timeout`` and
left to finish, and while :data:`MAX_RUNNING` handlers are still running,
requests are answered ``busy``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("edge_agent.commands")

#: The commands the agent itself answers (a plugin may not register these names).
BUILTIN_COMMANDS = ("ping", "status", "reload", "queue-stats")
#: What a ``commands`` table allows when it has no ``allow`` list: read-only and cheap.
DEFAULT_ALLOW = ("ping", "status")
#: Handlers still running (timed out) before further requests are answered "busy".
MAX_RUNNING = 2
#: The reasons a request is refused or fails, as the answer's ``code``.
CODES = (
    "unknown",  # no such command
    "not_allowed",  # a command this agent's allow list leaves out
    "bad_request",  # the payload is not a JSON object
    "too_large",  # the payload is larger than the limit
    "busy",  # too many requests waiting, or handlers still running
    "timeout",  # the handler did not return in time (it may still finish)
    "failed",  # the handler raised, or returned what JSON cannot encode
)
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def command_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a command's name (one topic level), or None if it can."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return (
            "a command's name is 1 to 64 lower-case letters, digits, '-' and '_',"
            " starting with a letter or digit"
        )
    return None


@dataclass(frozen=True)
class RemoteCommand:
    """A command a plugin registered: ``handler(arguments)`` returns the JSON result."""

    name: str
    handler: Callable[[dict[str, Any]], Any]
    plugin: str


class Refused(Exception):
    """A request answered with ``ok: false``: ``code`` (see :data:`CODES`) and a reason."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def parse_arguments(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """The request's arguments: its payload as a JSON object (``{}`` when empty)."""
    if len(payload) > max_bytes:
        raise Refused(
            "too_large",
            f"the request has {len(payload)} bytes, more than the {max_bytes} this agent"
            " takes (max_request_bytes)",
        )
    if not payload.strip():
        return {}
    try:
        arguments = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Refused("bad_request", f"the payload is not JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise Refused(
            "bad_request",
            f"the payload must be a JSON object of arguments (or empty), not a"
            f" {type(arguments).__name__}",
        )
    return arguments


class Dispatcher:
    """Runs the commands of one agent: built-ins and the plugins' (see the module docstring)."""

    def __init__(self, agent: Any, max_running: int = MAX_RUNNING) -> None:
        self.agent = agent
        self._slots = threading.BoundedSemaphore(max_running)
        self._one_at_a_time = threading.Lock()
        self.builtins: dict[str, Callable[[dict[str, Any], float], Any]] = {
            "ping": self._ping,
            "status": self._status,
            "reload": self._reload,
            "queue-stats": self._queue_stats,
        }

    @property
    def plugin_commands(self) -> dict[str, RemoteCommand]:
        return self.agent.host.remote_commands

    def known(self) -> list[str]:
        """Every command name this agent knows, built-in first."""
        return [*self.builtins, *sorted(self.plugin_commands)]

    def answer(
        self,
        name: str,
        payload: bytes,
        *,
        allow: Iterable[str],
        timeout: float,
        max_bytes: int,
    ) -> dict[str, Any]:
        """Check and run one request; the answer document (never raises)."""
        started = time.monotonic()
        reply: dict[str, Any] = {"agent": self.agent.id, "command": name}
        try:
            handler = self._handler(name, set(allow))
            arguments = parse_arguments(payload, max_bytes)
            result = self._run(name, handler, arguments, timeout)
            try:
                json.dumps(result)
            except (TypeError, ValueError) as exc:
                raise Refused(
                    "failed", f"the command returned what JSON cannot encode: {exc}"
                ) from None
        except Refused as refused:
            reply.update(ok=False, code=refused.code, error=refused.reason)
        else:
            reply.update(ok=True, result=result)
        reply["seconds"] = round(time.monotonic() - started, 3)
        return reply

    def _handler(self, name: str, allow: set[str]) -> Callable[[dict[str, Any], float], Any]:
        builtin = self.builtins.get(name)
        plugin = self.plugin_commands.get(name)
        if builtin is None and plugin is None:
            raise Refused(
                "unknown",
                f"no command {name!r} on this agent; it knows {', '.join(self.known())}",
            )
        if name not in allow:
            raise Refused(
                "not_allowed",
                f"command {name!r} is not allowed on this agent (allowed: "
                f"{', '.join(sorted(allow)) or 'none'}); an operator of the device can add it"
                " to the allow list of the MQTT sink's commands table",
            )
        if builtin is not None:
            return builtin
        assert plugin is not None

        def run_plugin(arguments: dict[str, Any], _deadline: float) -> Any:
            return plugin.handler(arguments)

        return run_plugin

    def _run(
        self,
        name: str,
        handler: Callable[[dict[str, Any], float], Any],
        arguments: dict[str, Any],
        timeout: float,
    ) -> Any:
        """Run ``handler`` in a thread of its own; wait for it at most ``timeout`` seconds."""
        with self._one_at_a_time:
            if not self._slots.acquire(blocking=False):
                raise Refused(
                    "busy",
                    f"{MAX_RUNNING} earlier commands that timed out are still running;"
                    " try again later",
                )
            outcome: dict[str, Any] = {}
            done = threading.Event()
            deadline = time.monotonic() + timeout

            def work() -> None:
                try:
                    outcome["result"] = handler(arguments, deadline)
                except Refused as refused:
                    outcome["refused"] = refused
                except Exception as exc:
                    outcome["error"] = exc
                finally:
                    self._slots.release()
                    done.set()

            threading.Thread(target=work, name=f"command:{name}", daemon=True).start()
            if not done.wait(timeout):
                log.warning(
                    "command %r did not return within %gs; answered 'timeout' and left running",
                    name,
                    timeout,
                )
                raise Refused(
                    "timeout", f"the command did not finish within {timeout:g}s (timeout)"
                )
        if "refused" in outcome:
            raise outcome["refused"]
        if "error" in outcome:
            exc = outcome["error"]
            plugin = self.plugin_commands.get(name)
            who = f"plugin {plugin.plugin}'s command {name!r}" if plugin else f"command {name!r}"
            log.error("%s raised %s: %s", who, type(exc).__name__, exc, exc_info=exc)
            raise Refused("failed", f"{who} raised {type(exc).__name__}: {exc}")
        return outcome.get("result")

    # -- built-in commands ---------------------------------------------------

    def _ping(self, _arguments: dict[str, Any], _deadline: float) -> dict[str, Any]:
        return {
            "agent": self.agent.id,
            "version": self.agent.version,
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }

    def _status(self, _arguments: dict[str, Any], _deadline: float) -> dict[str, Any]:
        from edge_agent import status

        return {"running": True, "problem": None, "status": status.snapshot(self.agent)}

    def _queue_stats(self, _arguments: dict[str, Any], _deadline: float) -> dict[str, Any]:
        from edge_agent import status

        return status.queue_stats(self.agent.store, self.agent.config.routes())

    def _reload(self, _arguments: dict[str, Any], deadline: float) -> dict[str, Any]:
        applied = self.agent.reload_and_wait(max(0.0, deadline - time.monotonic() - 0.1))
        if applied is None:
            return {"reload": "requested", "applied": None}
        if not applied:
            raise Refused(
                "failed",
                f"the configuration in {self.agent.config.file} is invalid; the running one"
                " stays (the agent's log lists the problems; edge-agent check shows them)",
            )
        return {"reload": "done", "applied": True, "file": self.agent.config.file}
