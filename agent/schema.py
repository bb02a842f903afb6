"""Configuration schemas: plain dataclasses, validated against TOML tables.

A plugin declares its options as a dataclass and the agent checks every
instance table in the config file against it, reporting every problem at once
with its key path. Plugin authors write::

    @dataclass(kw_only=True)
    class Config:
        paths: list[str] = option(doc="Folders to watch.")          # required
        recursive: bool = option(True, doc="Watch sub-folders too.")
        interval: Duration = option(10.0, doc="Seconds, or \\"10s\\", \\"5m\\".")

Supported field types: ``str``, ``int``, ``float``, ``bool``, ``Duration``
(seconds; accepts ``"10s"``), ``ByteSize`` (bytes; accepts ``"256MiB"``),
``Literal[...]``, ``list[T]``, ``dict[str, T]``, ``T | None``, ``Any`` and a
nested dataclass (a TOML table or inline table).

Constraints are declared with the option: ``option(30, min=2, off=0)``,
``option(10.0, above=0)``, ``option(1883, min=1, max=65535)``,
``option("info", choices=["info", "debug"])``, ``option("", validator=f)``;
a value outside them is reported at its own key path
(``sources.thermal[1].interval: must be more than 0, got 0``).

Checks that span options go in ``__post_init__``: raise
``OptionError("interval", "must be less than timeout")`` to report the problem
at that option's key path. A plain ``ValueError`` is reported at the option
its message starts with (``"interval must be ..."`` or ``"tls.cert_file: ..."``)
and otherwise at the table's key path. ``__post_init__`` runs even when other
options of the table have problems (with their defaults in place of the wrong
values), so that ``edge-agent check`` reports every problem of a table at once;
a problem it reports about an option that already has one is left out, and
the others say that defaults stood in.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, Union

from edge_agent.units import parse_duration, parse_size

T = TypeVar("T")


class Duration(float):
    """A duration in seconds; the config may say ``10``, ``"10s"``, ``"5m"``, ``"7d"``."""


class ByteSize(int):
    """A size in bytes; the config may say ``1048576``, ``"64KiB"``, ``"256MiB"``."""


class OptionError(ValueError):
    """Raised in a Config's ``__post_init__``: ``option`` (a key, or a dotted path
    below the table such as ``"tls.cert_file"``) has the problem ``message``.

    ``edge-agent check`` reports it as ``sources.NAME[i].OPTION: message``.
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


class EnvStr(str):
    """A string that came from an environment variable.

    Accepted where a number or boolean is expected, so that
    ``port = "${MQTT_PORT:-1883}"`` works.
    """


def _from_env(tp: type, value: EnvStr) -> Any:
    text = value.strip()
    if tp is bool:
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise ValueError
    return tp(text)


def option(
    default: Any = dataclasses.MISSING,
    *,
    doc: str = "",
    secret: bool = False,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    off: Any = None,
    choices: typing.Iterable[Any] | None = None,
    validator: Callable[[Any], Any] | None = None,
    example: Any = None,
) -> Any:
    """Declare one configuration option of a dataclass schema.

    Without ``default`` or ``default_factory`` the option is required.
    ``doc`` is shown by documentation tools; ``secret=True`` keeps the value
    out of every message the agent prints.

    For numbers (``int``, ``float``, ``Duration``, ``ByteSize``): ``min`` and
    ``max`` bound the value (inclusive), ``above`` excludes it and everything
    below (``above=0``: more than 0, for a duration where 0 is nonsense), and
    ``off`` is one more value allowed outside those bounds, that turns the
    feature off (``keepalive``: ``off=0, min=2``). ``edge-agent check`` reports
    a value outside them at its key path: "must be at least 1, got 0".

    ``choices`` lists the values allowed (for a ``list`` option: allowed for
    each item). ``validator`` is called with the converted value when every
    other check passed; it raises ``ValueError`` with a sentence ("is not a
    topic filter") to refuse it, reported at the option's key path.

    ``example``: a value ``edge-agent config sample`` writes for the option
    (give one for every required option, so that the sample runs as it stands).
    """
    if isinstance(default, list | dict) and default_factory is dataclasses.MISSING:
        value = default
        default, default_factory = dataclasses.MISSING, lambda: type(value)(value)
    bounds = {
        "min": min,
        "max": max,
        "above": above,
        "off": off,
        "choices": None if choices is None else tuple(choices),
        "validator": validator,
    }
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        metadata={
            "doc": doc,
            "secret": secret,
            **{k: v for k, v in bounds.items() if v is not None},
            **({"example": example} if example is not None else {}),
        },
    )


def _out_of_bounds(value: Any, metadata: Any) -> str | None:
    """Why ``value`` is outside the option's bounds (see :func:`option`), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    low, high, above = metadata.get("min"), metadata.get("max"), metadata.get("above")
    off = metadata.get("off")
    if off is not None and value == off:
        return None
    if (
        (low is None or value >= low)
        and (high is None or value <= high)
        and (above is None or value > above)
    ):
        return None
    parts = []
    if above is not None:
        parts.append(f"more than {above:g}")
    if low is not None and high is not None:
        parts.append(f"{low:g} to {high:g}")
    elif low is not None:
        parts.append(f"at least {low:g}")
    elif high is not None:
        parts.append(f"at most {high:g}")
    wanted = " and ".join(parts)
    if off is not None:
        wanted = f"{off:g} (off) or {wanted}"
    return f"must be {wanted}, got {value:g}"


def _option_problem(value: Any, metadata: Any) -> str | None:
    """Why ``value`` breaks the option's declared constraints, or None."""
    wrong = _out_of_bounds(value, metadata)
    if wrong:
        return wrong
    choices = metadata.get("choices")
    if choices is not None:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not any(
                item == c and isinstance(item, bool) == isinstance(c, bool) for c in choices
            ):
                allowed = ", ".join(_show(c) for c in choices)
                return f"must be one of {allowed}, got {_show(item)}"
    validator = metadata.get("validator")
    if validator is not None:
        try:
            validator(value)
        except ValueError as exc:
            return str(exc) or "is not a valid value"
    return None


_LEADING_PATH = re.compile(r"([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*|\[\d+\])*): (.+)", re.DOTALL)
_LEADING_NAME = re.compile(r"([A-Za-z_]\w*) \S")


def _post_init_problem(exc: ValueError, path: str, known: typing.Container[str]) -> Problem:
    """Where a ``__post_init__`` problem belongs: the option it names, else the table."""
    if isinstance(exc, OptionError):
        return _join(path, exc.option), exc.message
    text = str(exc)
    match = _LEADING_PATH.match(text)
    if match and match.group(1) in known:
        return f"{_join(path, match.group(1))}{match.group(2)}", match.group(3)
    match = _LEADING_NAME.match(text)
    if match and match.group(1) in known:
        return _join(path, match.group(1)), text
    return path, text


def describe(tp: Any) -> str:
    """A type as an operator reads it: "a list of strings", "one of "full", "normal""."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None))
    if origin is list:
        return f"a list of {_plural(describe(args[0]))}" if args else "a list"
    if origin is dict:
        return f"a table of {_plural(describe(args[1]))}" if args else "a table"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        Duration: 'a duration such as 10, "10s" or "5m"',
        ByteSize: 'a size such as 1048576 or "256MiB"',
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(text: str) -> str:
    for article in ("a ", "an "):
        if text.startswith(article):
            return text[len(article) :] + "s"
    return text


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


Problem = tuple[str, str]  # (key path, message)


def build(schema: type[T], table: Any, path: str, problems: list[Problem]) -> T | None:
    """Check ``table`` against the dataclass ``schema``; return an instance or None.

    Every problem found is appended to ``problems`` as ``(key path, message)``;
    the instance is returned only when there were none below ``path``.
    """
    before = len(problems)
    value = _convert(schema, table, path, problems, secret=False)
    return value if len(problems) == before else None


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _convert(tp: Any, value: Any, path: str, problems: list[Problem], secret: bool) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def wrong(expected: str | None = None) -> None:
        shown = "" if secret else f" {_show(value)}" if not isinstance(value, dict | list) else ""
        problems.append((path, f"expected {expected or describe(tp)}, got {_kind(value)}{shown}"))

    if tp is Any:
        return value
    if isinstance(value, EnvStr) and tp in (int, float, bool):
        try:
            return _from_env(tp, value)
        except ValueError:
            wrong()
            return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            wrong()
            return None
        return _build_dataclass(tp, value, path, problems)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        for option_type in options:
            trial: list[Problem] = []
            converted = _convert(option_type, value, path, trial, secret)
            if not trial:
                return converted
        if len(options) == 1:
            return _convert(options[0], value, path, problems, secret)
        wrong()
        return None
    if origin is Literal:
        for allowed in args:
            if isinstance(value, EnvStr) and str(allowed) == value.strip():
                return allowed
            if value == allowed and type(value) is type(allowed):
                return value
        wrong()
        return None
    if origin is list:
        if not isinstance(value, list):
            wrong()
            return None
        return [
            _convert(args[0], item, _join(path, i), problems, secret)
            for i, item in enumerate(value)
        ]
    if origin is dict:
        if not isinstance(value, dict):
            wrong()
            return None
        return {k: _convert(args[1], v, _join(path, k), problems, secret) for k, v in value.items()}
    if tp is Duration:
        try:
            return Duration(parse_duration(value))
        except (ValueError, TypeError) as exc:
            problems.append(
                (path, str(exc) if isinstance(value, str) else f"expected {describe(tp)}")
            )
            return None
    if tp is ByteSize:
        try:
            return ByteSize(parse_size(value))
        except (ValueError, TypeError) as exc:
            problems.append(
                (path, str(exc) if isinstance(value, str) else f"expected {describe(tp)}")
            )
            return None
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        wrong()
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        wrong()
        return None
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        wrong()
        return None
    raise TypeError(f"unsupported type in a config schema at {path}: {tp!r}")


def _build_dataclass(cls: type, table: dict, path: str, problems: list[Problem]) -> Any:
    """Build ``cls`` from ``table``; a ``__post_init__`` raising ValueError is a problem too.

    When some options are wrong but every required one is usable, the class is
    still built with the defaults of the wrong ones, so that ``__post_init__``
    reports its problems too; the instance is thrown away in that case.
    """
    before = len(problems)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    faulty: set[str] = set()
    for key, value in table.items():
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            suggestion = f'; did you mean "{hint[0]}"?' if hint else ""
            expected = ", ".join(sorted(known)) or "no keys"
            problems.append(
                (_join(path, key), f"unknown key{suggestion} (expected one of: {expected})")
            )
            continue
        field = known[key]
        seen = len(problems)
        converted = _convert(
            hints[key], value, _join(path, key), problems, bool(field.metadata.get("secret"))
        )
        if len(problems) == seen:
            wrong = _option_problem(converted, field.metadata)
            if wrong:
                problems.append((_join(path, key), wrong))
        if len(problems) == seen:
            kwargs[key] = converted
        else:
            faulty.add(key)
    for name, field in known.items():
        required = (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        if required and name not in table:
            problems.append((_join(path, name), f"missing required key ({describe(hints[name])})"))
            faulty.add(name)
    usable = all(
        name not in faulty
        or f.default is not dataclasses.MISSING
        or f.default_factory is not dataclasses.MISSING
        for name, f in known.items()
    )
    if not usable:
        return None
    try:
        instance = cls(**kwargs)
    except ValueError as exc:  # the schema's own checks, in __post_init__
        where, message = _post_init_problem(exc, path, known)
        named = where[len(path) :].lstrip(".").split(".")[0].split("[")[0]
        if named not in faulty:
            if faulty:  # it may be a consequence of a default standing in for a wrong value
                message += " (found with defaults in place of the wrong values above)"
            problems.append((where, message))
        return None
    return instance if len(problems) == before else None
