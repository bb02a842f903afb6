"""``edge-agent config sample``: a commented configuration made from the option docs.

Each option's ``doc`` (``agent.schema.option``) becomes a ``##`` comment above
it. Options with a default are shown commented out at that default, as
Telegraf's samples do; required ones are written live with their ``example``,
so that the sample passes ``edge-agent check`` as it stands.
"""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
import typing
from typing import Any

from edge_agent.plugin_host import PluginHost, Registration
from edge_agent.schema import ByteSize, Duration

#: The tables' order in the file: the order events flow through them.
KINDS = (("source", "sources"), ("processor", "processors"), ("sink", "sinks"))


class UnknownPlugin(ValueError):
    """A name given to ``config sample`` that no installed plugin registered."""


def select(host: PluginHost, names: list[str]) -> list[Registration]:
    """The registrations ``names`` ask for ("tail", or "sinks.mqtt" where a name is both a
    source and a sink); every built-in and installed one for no names."""
    everything = [r for kind, attr in KINDS for r in getattr(host, attr).values()]
    if not names:
        return everything
    chosen: list[Registration] = []
    for name in names:
        table, _, plugin = name.rpartition(".")
        found = [
            r
            for kind, attr in KINDS
            for r in getattr(host, attr).values()
            if r.name == plugin and table in ("", attr, kind)
        ]
        if not found:
            known = sorted({r.name for r in everything})
            raise UnknownPlugin(
                f"no plugin named {name!r}; installed: {', '.join(known)}"
                " (edge-agent plugins lists them with their kind)"
            )
        chosen += [r for r in found if r not in chosen]
    return chosen


def render(host: PluginHost, registrations: list[Registration]) -> str:
    """The sample file: the core tables, then one table per registration."""
    from edge_agent.config import AgentSettings, MetricsSettings, QueueSettings

    parts = [
        "# edge-agent configuration, made by `edge-agent config sample`.\n"
        "# Lines starting with ## explain the option below them; an option commented\n"
        "# out shows its default. Check the file with: edge-agent check -c FILE\n",
        _table("[agent]", AgentSettings),
        _table("[queue]", QueueSettings),
        _table("[metrics]", MetricsSettings),
    ]
    for kind, attr in KINDS:
        for registration in registrations:
            if registration.kind == kind:
                parts.append(_plugin(registration, attr))
    if not any(r.kind == "sink" for r in registrations):
        stdout = host.sinks.get("stdout")
        if stdout is not None:
            parts.append(
                "# No sink was asked for, and a configuration needs one: events go to\n"
                "# stdout until you add a real one (edge-agent config sample mqtt).\n"
                + _plugin(stdout, "sinks")
            )
    return "\n".join(parts)


def _plugin(registration: Registration, attr: str) -> str:
    doc = (registration.cls.__doc__ or "").strip().split("\n\n")[0]
    about = " ".join(doc.split()).replace("``", "`")
    origin = f"{registration.package} {registration.version}"
    head = f"# {registration.kind} {registration.name!r} ({origin})"
    lines = [head, *_comment(about, "# ")] if about else [head]
    if registration.kind == "processor":
        # One array, so that TOML keeps the order the processors run in.
        lines += ["[[processors]]", f"type = {_toml(registration.name)}"]
    else:
        lines.append(f"[[{attr}.{_key(registration.name)}]]")
    named = {
        "source": "in its events' source, in status and in metrics",
        "sink": "in status, metrics and logs",
    }.get(registration.kind, "in status, metrics and logs")
    lines += _comment(f"The instance's name, {named}.", "## ")
    lines.append(f"# name = {_toml(registration.name)}")
    if registration.kind == "sink":
        lines += _comment(
            'Only the events of these sources and types (globs, e.g. ["sensors*"]). Default:'
            " every event.",
            "## ",
        )
        lines += ['# sources = ["*"]', '# types = ["*"]']
    schema = getattr(registration.cls, "Config", None)
    if schema is not None:
        lines += _options(schema)
    return "\n".join(lines) + "\n"


def _table(header: str, schema: type) -> str:
    return "\n".join([header, *_options(schema)]) + "\n"


def _options(schema: type) -> list[str]:
    hints = typing.get_type_hints(schema)
    lines: list[str] = []
    # Where the schema's own checks want more than the required options (drop: "give at
    # least one of types, sources or match"), every option with an example is written live.
    live = not _builds(schema)
    for field in dataclasses.fields(schema):
        if not field.init:
            continue
        tp = hints[field.name]
        doc = field.metadata.get("doc", "")
        nested = _nested(tp)
        if nested is not None:
            doc += " Keys: " + "; ".join(
                f"{f.name}: {f.metadata.get('doc', '').rstrip('.')}".strip()
                for f in dataclasses.fields(nested)
                if f.init
            )
        lines += _comment(doc, "## ")
        required = (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        example = field.metadata.get("example")
        if required or (live and example is not None):
            value = example if example is not None else _placeholder(tp)
            lines.append(f"{field.name} = {_toml(value, tp)}")
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif example is not None:
            default = example  # computed at start (the host name): show what it looks like
        else:
            default = field.default_factory()  # type: ignore[misc]
        if default is None:
            if nested is not None and example is None:
                hints_nested = typing.get_type_hints(nested)
                example = {f.name: _placeholder(hints_nested[f.name]) for f in _required(nested)}
            lines.append(f"# {field.name} = {_toml(example, tp)}" if example is not None else "")
            if not lines[-1]:
                lines[-1] = f"# {field.name} = ...  (not set)"
            continue
        lines.append(f"# {field.name} = {_toml(default, tp)}")
    return lines


def _builds(schema: type) -> bool:
    """Does ``schema`` accept its required options' examples and defaults for the rest?"""
    required = {f.name: f.metadata.get("example") for f in _required(schema)}
    try:
        schema(**required)
    except Exception:
        return False
    return True


def _required(schema: type) -> list[dataclasses.Field]:
    return [
        f
        for f in dataclasses.fields(schema)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


def _nested(tp: Any) -> type | None:
    """The dataclass of a nested table option (``TlsConfig | None``), or None."""
    for candidate in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(candidate) and isinstance(candidate, type):
            return candidate
    return None


def _placeholder(tp: Any) -> Any:
    """Something of the right type for a required option that gives no example."""
    origin = typing.get_origin(tp)
    if origin is list:
        return []
    if origin is dict or _nested(tp) is not None:
        return {}
    if origin is typing.Literal:
        return typing.get_args(tp)[0]
    return {bool: False, int: 0, float: 0.0}.get(tp, "")


def _comment(text: str, prefix: str) -> list[str]:
    if not text:
        return []
    return textwrap.wrap(text, 88 - len(prefix), initial_indent=prefix, subsequent_indent=prefix)


def _toml(value: Any, tp: Any = None) -> str:
    """``value`` as TOML text; durations and sizes the way a person writes them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if tp is Duration and isinstance(value, int | float) and value > 0:
        return _toml(_duration(float(value)))
    if tp is ByteSize and isinstance(value, int) and value > 0:
        return _toml(_size(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer() and tp in (Duration, ByteSize):
        return str(int(value))
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        return "[" + ", ".join(_toml(v, item) for v in value) + "]"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def _key(name: str) -> str:
    """A TOML key: bare when it may be, else quoted."""
    return name if name and name.replace("_", "").replace("-", "").isalnum() else _toml(name)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _size(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count % size == 0:
            return f"{count // size}{unit}"
    return str(count)
