"""Routing: which events a sink wants, by source instance name and event type.

Every sink takes two optional common options, handled here and not by the
plugin (as ``name`` is)::

    [[sinks.mqtt]]
    name = "cloud"
    sources = ["sensors*"]               # globs on the source instance name
    types = ["mqtt.*", "file.created"]   # globs on the event type

Absent means everything. An event must match a glob of each list given.
Globs are :func:`fnmatch.fnmatchcase` patterns: ``*`` any run of characters
(``/`` and ``.`` too), ``?`` one character, ``[abc]`` / ``[a-z]`` one of them,
``[!abc]`` none of them; case-sensitive.

In SQL a glob without ``[`` is an SQLite ``GLOB`` (the same meaning for
``*`` and ``?``, answered in C); one with ``[`` is handed to
:func:`fnmatch.fnmatchcase` through the SQL function ``edge_agent_fnmatch``
that every queue connection has, because SQLite writes ``[!a]`` as ``[^a]``
and reads ``[^a]`` (``^`` or ``a`` to fnmatch) as a negation.
"""

from __future__ import annotations

import fnmatch
import functools
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: The sink options this module reads; no plugin may take them.
ROUTE_KEYS = ("sources", "types")


@functools.lru_cache(maxsize=4096)
def _fnmatch(value: str | None, pattern: str) -> int:
    return int(value is not None and fnmatch.fnmatchcase(value, pattern))


def register_functions(conn: sqlite3.Connection) -> None:
    """Give a queue connection the SQL function routes need for globs with ``[``."""
    conn.create_function("edge_agent_fnmatch", 2, _fnmatch, deterministic=True)


def _glob_sql(column: str, pattern: str) -> tuple[str, list[str]]:
    if "[" in pattern:
        return f"edge_agent_fnmatch({column}, ?)", [pattern]
    return f"{column} GLOB ?", [pattern]


@dataclass(frozen=True)
class Route:
    """A sink's selection: globs on the source instance name and on the event type.

    None means everything; an event must match both parts.
    """

    sources: tuple[str, ...] | None = None
    types: tuple[str, ...] | None = None

    @property
    def everything(self) -> bool:
        """True when nothing is selected: the sink wants every event."""
        return self.sources is None and self.types is None

    def wants(self, source: str, type: str) -> bool:
        """Whether an event of ``source`` (instance name) and ``type`` is for this sink."""
        return _any(self.sources, source) and _any(self.types, type)

    def sql(self) -> tuple[str, list[str]]:
        """An SQL condition on the columns ``source`` and ``type``, and its arguments.

        ``"1"`` for a route that wants everything.
        """
        parts: list[str] = []
        args: list[str] = []
        for column, patterns in (("source", self.sources), ("type", self.types)):
            if patterns is None:
                continue
            terms = []
            for pattern in patterns:
                term, term_args = _glob_sql(column, pattern)
                terms.append(term)
                args += term_args
            parts.append("(" + " OR ".join(terms) + ")")
        return (" AND ".join(parts) or "1"), args

    def describe(self) -> str:
        """For log lines: ``sources sensors*, types file.*``, or ``everything``."""
        if self.everything:
            return "everything"
        said = []
        if self.sources is not None:
            said.append("sources " + ", ".join(self.sources))
        if self.types is not None:
            said.append("types " + ", ".join(self.types))
        return "; ".join(said)


EVERYTHING = Route()


def _any(patterns: tuple[str, ...] | None, value: str) -> bool:
    return patterns is None or any(_fnmatch(value, p) for p in patterns)


def parse_route(
    table: dict[str, Any], where: str, sink: str, problems: list[tuple[str, str]]
) -> Route:
    """Take ``sources`` and ``types`` out of a sink's table; a problem per bad value.

    ``where`` is the table's key path (``sinks.mqtt[1]``), ``sink`` the instance name.
    """
    found: dict[str, tuple[str, ...] | None] = {}
    for key in ROUTE_KEYS:
        if key not in table:
            found[key] = None
            continue
        value = table.pop(key)
        what = "source instance names" if key == "sources" else "event types"
        expected = (
            f"sink {sink!r}: expected a list of globs on {what}, such as"
            f" {['sensors*'] if key == 'sources' else ['file.*', 'log.line']}"
            " (leave the key out for all events)"
        )
        if not isinstance(value, list) or not value:
            got = "an empty list" if value == [] else f"{type(value).__name__} {value!r}"
            problems.append((f"{where}.{key}", f"{expected}, got {got}"))
            continue
        bad = [v for v in value if not isinstance(v, str) or not v]
        if bad:
            problems.append(
                (f"{where}.{key}", f"{expected}; {bad[0]!r} is not a glob (a non-empty string)")
            )
            continue
        found[key] = tuple(value)
    return Route(found.get("sources"), found.get("types"))


def selective(routes: dict[str, Route], sinks: Sequence[str]) -> dict[str, Route]:
    """The routes among ``sinks`` that select something (those that want all are left out)."""
    return {s: routes[s] for s in sinks if s in routes and not routes[s].everything}
