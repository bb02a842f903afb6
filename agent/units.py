"""Human units in configuration: durations ("10s", "7d"), sizes ("256MiB") and broker
addresses ("host:port")."""

from __future__ import annotations

import re

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_NUMBER_WITH_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: str | int | float) -> float:
    """Seconds from ``10``, ``"1.5s"``, ``"250ms"``, ``"5m"``, ``"7d"``; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as 10, "10s", "5m" or "7d"')
    if isinstance(value, int | float):
        if not 0 <= value < 10**9:  # also refuses inf and nan
            raise ValueError("a duration must be 0 or more seconds, and finite")
        return float(value)
    match = _NUMBER_WITH_UNIT.match(value)
    unit = match.group(2).lower() if match else None
    if not match or (unit or "s") not in _DURATION_UNITS:
        raise ValueError(
            f'{value!r} is not a duration; write a number with ms, s, m, h, d or w, such as "10s"'
        )
    return float(match.group(1)) * _DURATION_UNITS[unit or "s"]


def parse_size(value: str | int) -> int:
    """Bytes from ``1048576``, ``"64KiB"``, ``"256MiB"``, ``"1GB"``; ValueError otherwise."""
    if isinstance(value, bool | float):
        raise ValueError('expected a size such as 1048576 or "256MiB"')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _NUMBER_WITH_UNIT.match(value)
    unit = (match.group(2).lower() or "b") if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(
            f"{value!r} is not a size; write a number with B, KiB, MiB, GiB (or KB, MB, GB),"
            ' such as "256MiB"'
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def split_host(entry: str, default_port: int) -> tuple[str, int]:
    """``"broker:8883"`` → ("broker", 8883); ``"[::1]:1883"`` too; ValueError if malformed."""
    host, sep, port = entry.rpartition(":")
    if not sep or "]" in port:
        return entry.strip("[]"), default_port
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"hosts: {entry!r} is not host:port")
    return host.strip("[]"), int(port)
