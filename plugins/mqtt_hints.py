"""What an MQTT 5 broker says about where and when to connect, as the ``mqtt`` sink reads it.

A broker (or a load balancer in front of a cluster) can answer a CONNECT,
or end a connection, with a reason code that is advice rather than a fault:

- 0x9C "Use another server" and 0x9D "Server moved", with the Server
  Reference property naming where to go (``host``, ``host:port``, or several
  separated by spaces). The sink tries the named broker next, but only when
  it is one of its own configured brokers (``host``/``port`` or ``hosts``):
  a broker, or someone pretending to be one, never sends the device's
  events and credentials somewhere the operator did not list. A reference
  outside the list is logged and the sink goes on with its list in order.
- 0x89 "Server busy" and 0x97 "Quota exceeded": the sink waits about
  ``reconnect_max`` (between half of it and all of it) before the next
  attempt, instead of the usual doubling from ``reconnect_min``.

MQTT 3.1.1 has none of these; its refusals are ordinary failures.
"""

from __future__ import annotations

from typing import Any

from edge_agent.units import split_host

#: Reason codes (CONNACK or DISCONNECT) that send the client to another server.
MOVED = {0x9C: "use another server", 0x9D: "server moved"}
#: Reason codes (CONNACK or DISCONNECT) that ask the client to stay away a while.
BUSY = {0x89: "server busy", 0x97: "quota exceeded"}


def reason_value(reason_code: Any) -> int:
    """The numeric value of a paho ``ReasonCode`` (0 for anything else)."""
    value = getattr(reason_code, "value", 0)
    return value if isinstance(value, int) else 0


def server_reference(
    reason_code: Any,
    properties: Any,
    current: tuple[str, int],
    brokers: list[tuple[str, int]],
) -> tuple[tuple[str, int] | None, str]:
    """The configured broker a "use another server" / "server moved" answer points to.

    Returns ``(broker, "")`` to try that broker next, or ``(None, why)`` when the
    answer names no broker this sink may use (``why`` is empty when there was no
    such answer at all). A reference without a port takes the current broker's.
    """
    if reason_value(reason_code) not in MOVED:
        return None, ""
    reference = getattr(properties, "ServerReference", None) if properties else None
    if not reference or not isinstance(reference, str):
        return None, "it named no server (no Server Reference property)"
    known = {(host.lower(), port): (host, port) for host, port in brokers}
    for entry in reference.split():
        try:
            host, port = split_host(entry, current[1]) if ":" in entry else (entry, current[1])
        except ValueError:
            continue
        found = known.get((host.strip("[]").lower(), port))
        if found is not None and found != current:
            return found, ""
    return None, (
        f"it pointed to {reference!r}, which is not among this sink's brokers (host/port or"
        " hosts); add it to hosts to follow such a hint"
    )
