"""How the ``mqtt`` source turns an MQTT message into an event.

- A CloudEvent (JSON structured mode: an object with ``specversion``, ``id``,
  ``source`` and ``type``; or MQTT 5 binary mode: ``ce_*`` user properties)
  is kept as it came: its ``id``, ``source``, ``type``, ``time``, ``subject``,
  ``datacontenttype``, ``dataschema``, data and extensions (one without a
  ``subject`` gets the topic, one without a ``time`` the time it arrived). The agent's own
  ``source`` URI travels as the extension ``agentsource`` and its
  ``sequence`` replaces the incoming one, which is kept as ``originsequence``.
- Any other message: ``type`` from the config, ``subject`` the topic, the
  payload as ``data`` (JSON parsed; other UTF-8 text a string; anything else
  base64 in ``data_base64``); the MQTT 5 content type as ``datacontenttype``,
  its user properties as the extension ``mqttuserproperties`` (JSON text of
  ``[[name, value], ...]``) and a retained message marked ``mqttretain``.
"""

from __future__ import annotations

import base64
import json
import re
from typing import TYPE_CHECKING, Any

from edge_agent import Event, Source
from edge_agent.event import (
    EncodedEvent,
    canonical_time,
    check_event,
    new_event_id,
    utc_now,
)

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

    from edge_agent.plugins.mqtt_clients import Received

#: CloudEvents attributes an Event holds itself, rather than in ``attributes``.
_OWN = {"specversion", "id", "type", "time", "subject", "data", "data_base64"}
#: Incoming attributes whose name the agent uses for its own: kept as ``origin<name>``.
_RENAMED = {"sequence", "agentsource"}
_TEXT_TYPES = ("text/", "application/xml", "application/yaml")
#: A CloudEvents attribute name (binary mode: the user properties that are attributes).
_ATTRIBUTE = re.compile(r"[a-z0-9]{1,64}")
#: A JSON escape of a surrogate code point.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
#: A number that may be too large for a float (JSON has no infinity): a three-digit
#: exponent, or 309 digits in a row. Such a payload is checked before it is taken as JSON.
_HUGE_NUMBER = re.compile(rb"[0-9][eE][+]?[0-9]{3}|[0-9]{309}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON the queue can keep")


#: One decoder for every message (json.loads with an option builds one per call).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


#: What a payload holds as JSON: (True, value, text) or (False, None, None). ``text`` is
#: the payload as it came, to be queued as it is; None when it spans lines (the queue keeps
#: an event's data on one line: stdout and the tap print an event a line).
Parsed = tuple[bool, Any, str | None]
_NOT_JSON: Parsed = (False, None, None)


def _parse_json(payload: bytes) -> Parsed:
    """``payload`` as UTF-8 JSON without NaN or Infinity, and without escapes of lone
    surrogates (``"\\ud800"``: no UTF-8 holds such a value; the payload is then kept as
    the text it is)."""
    try:
        text = payload.decode("utf-8")
        value = _DECODER.decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return _NOT_JSON
    if (b"\\u" in payload and _SURROGATE_ESCAPE.search(payload)) or _HUGE_NUMBER.search(payload):
        try:  # what the queue could not keep: text that is no UTF-8, a float past 1.8e308
            json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (UnicodeEncodeError, ValueError):
            return _NOT_JSON
    one_line = b"\n" not in payload and b"\r" not in payload
    return (True, value, text if one_line else None)


def _properties(message: Received | mqtt.MQTTMessage) -> tuple[str | None, list[tuple[str, str]]]:
    """The MQTT 5 content type and user properties of ``message`` (None, [] with 3.1.1)."""
    props = getattr(message, "properties", None)
    if props is None:
        return None, []
    content_type = getattr(props, "ContentType", None) or None
    pairs = [(str(k), str(v)) for k, v in (getattr(props, "UserProperty", None) or [])]
    return content_type, pairs


def message_event(
    source: Source, message: Received | mqtt.MQTTMessage, stamp: tuple[str, str] | None = None
) -> Event | None:
    """The event for ``message``; a CloudEvent stays one (see the module docstring).

    ``stamp``: the event's (id, time), when the caller made them for a whole batch at
    once (:func:`edge_agent.event.new_event_ids`); a CloudEvent keeps its own id.
    """
    try:
        topic = message.topic
    except UnicodeDecodeError:  # brokers refuse such topics; be safe all the same
        source.count("invalid")
        source.log.error("a message whose topic is not UTF-8 was dropped")
        return None
    payload = message.payload
    content_type, pairs = _properties(message)
    event = None
    parsed: Parsed | None = None
    names = {name for name, _ in pairs} if pairs else ()
    if "specversion" in names or "ce_specversion" in names:
        # MQTT 5 binary mode: the CloudEvents MQTT binding names user properties as the
        # attributes (as our sink sends them); some producers prefix them with ce_.
        prefix = "" if "specversion" in names else "ce_"
        event = _binary_cloudevent(source, topic, payload, content_type, pairs, prefix, stamp)
    elif content_type is None or "json" in content_type:
        parsed = _parse_json(payload)
        is_json, value, _ = parsed
        if is_json and isinstance(value, dict) and _looks_structured(value):
            event = _structured_cloudevent(source, topic, value, stamp)
    if event is not None:
        return event
    attributes: dict[str, Any] = {}
    data, kind = _payload_data(payload, content_type, parsed)
    if kind == "base64":
        attributes["data_base64"] = True
    if content_type:
        attributes["datacontenttype"] = content_type
    elif kind == "text":
        attributes["datacontenttype"] = "text/plain; charset=utf-8"
    elif kind == "base64":
        attributes["datacontenttype"] = "application/octet-stream"
    if pairs:
        attributes["mqttuserproperties"] = json.dumps(pairs, ensure_ascii=False)
    if message.retain:
        attributes["mqttretain"] = True
    # JSON on one line is queued as the text it came in (no second encoding).
    data_json = parsed[2] if kind == "json" and parsed is not None else None
    return _new_event(source, source.config.type, data, topic, stamp, attributes or None, data_json)


def _new_event(
    source: Source,
    type: str,
    data: Any,
    subject: str,
    stamp: tuple[str, str] | None,
    attributes: dict[str, Any] | None,
    data_json: str | None = None,
) -> Event:
    event_id, time = stamp if stamp is not None else (new_event_id(), utc_now())
    if data_json is None:
        return Event(type, source.name, data, subject, event_id, time, attributes)
    return EncodedEvent(
        type, source.name, data, subject, event_id, time, attributes, data_json=data_json
    )


def _payload_data(
    payload: bytes, content_type: str | None, parsed: Parsed | None = None
) -> tuple[Any, str]:
    """(data, "json" | "text" | "base64") for a payload (``parsed``: what _parse_json gave
    for it, if it was called already)."""
    textual = content_type is not None and content_type.startswith(_TEXT_TYPES)
    if not textual:
        is_json, value, _ = parsed or _parse_json(payload)
        if is_json:
            return value, "json"
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(payload).decode("ascii"), "base64"
    if "\x00" in text:
        return base64.b64encode(payload).decode("ascii"), "base64"
    return text, "text"


def _looks_structured(value: dict[str, Any]) -> bool:
    if "specversion" not in value:  # the usual case: a device's own JSON
        return False
    return all(isinstance(value.get(k), str) for k in ("specversion", "id", "source", "type"))


def _structured_cloudevent(
    source: Source, topic: str, value: dict[str, Any], stamp: tuple[str, str] | None
) -> Event | None:
    attributes = {k: v for k, v in value.items() if k not in _OWN}
    if "data_base64" in value:
        data, base64_data = value["data_base64"], True
    else:
        data, base64_data = value.get("data"), False
    return _cloudevent(source, topic, value, attributes, data, base64_data, stamp)


def _binary_cloudevent(
    source: Source,
    topic: str,
    payload: bytes,
    content_type: str | None,
    pairs: list[tuple[str, str]],
    prefix: str,
    stamp: tuple[str, str] | None,
) -> Event | None:
    size = len(prefix)
    found = {
        name[size:]: value
        for name, value in pairs
        if name.startswith(prefix) and _ATTRIBUTE.fullmatch(name[size:])
    }
    if not all(found.get(k) for k in ("id", "source", "type")):
        return None
    attributes: dict[str, Any] = {k: v for k, v in found.items() if k not in _OWN}
    others = [[name, value] for name, value in pairs if name[size:] not in found]
    if others:
        attributes["mqttuserproperties"] = json.dumps(others, ensure_ascii=False)
    if content_type:
        attributes["datacontenttype"] = content_type
    data, kind = _payload_data(payload, content_type)
    return _cloudevent(source, topic, found, attributes, data, kind == "base64", stamp)


def _cloudevent(
    source: Source,
    topic: str,
    envelope: dict[str, Any],
    attributes: dict[str, Any],
    data: Any,
    base64_data: bool,
    stamp: tuple[str, str] | None,
) -> Event | None:
    """An Event keeping the CloudEvent's own attributes; None if it cannot carry them."""
    extra: dict[str, Any] = {}
    for name, value in attributes.items():
        if name in _RENAMED:
            name = f"origin{name}"
        if isinstance(value, bool | int | str):
            extra[name] = value
        else:  # CloudEvents allows no such extension values: kept as JSON text
            extra[name] = json.dumps(value, ensure_ascii=False)
    if base64_data:
        extra["data_base64"] = True
    subject = envelope.get("subject")
    event = _new_event(source, envelope["type"], data, subject or topic, stamp, None)
    event.id = envelope["id"]
    if envelope.get("time"):
        try:
            event.time = canonical_time(envelope["time"])
        except ValueError:
            return _refuse(source, topic, f"its time {envelope['time']!r} is not RFC 3339")
    event.attributes = extra
    try:
        check_event(event)
    except ValueError as exc:
        return _refuse(source, topic, str(exc))
    return event


def _refuse(source: Source, topic: str, why: str) -> None:
    """A CloudEvent the queue cannot keep as one: it is queued as a plain message."""
    source.count("cloudevents_not_kept")
    source.log.warning(
        "a CloudEvent on %s is queued as a plain message (type %s): %s",
        topic,
        source.config.type,
        why,
    )
    return None


def own_output(event: Event, own_prefix: str) -> bool:
    """True if ``event`` is a CloudEvent this agent published (its source, or the agentsource
    of a CloudEvent it forwarded, starts with ``edge-agent://{agent id}/``)."""
    attributes = event.attributes or {}
    for name in ("source", "originagentsource"):
        value = attributes.get(name)
        if isinstance(value, str) and value.startswith(own_prefix):
            return True
    return False
