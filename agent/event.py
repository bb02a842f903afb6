"""Events: what a source emits, and what a sink reads back from the queue.

On the wire an event is a CloudEvents 1.0 envelope in JSON structured mode::

    {"specversion": "1.0", "id": "0193...", "source": "edge-agent://gw-01/inbox",
     "type": "file.created", "time": "2026-11-26T23:59:01.123456Z",
     "sequence": "00000000000000000042", "datacontenttype": "application/json",
     "subject": "/var/spool/inbox/a.csv", "data": {"path": "...", "size": 1432}}

``id`` is a UUIDv7 (time-sortable) given when the event is emitted and kept on
every re-send; ``sequence`` counts per source and is given when the event is
committed to the queue, so consumers can restore order and spot gaps.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any

SEQUENCE_DIGITS = 20

_id_lock = threading.Lock()
_id_last_ms = 0
_id_counter = 0
#: Random bytes for ids, fetched 4 KiB at a time: one getrandom() call per 512 ids, not one
#: per id (each call also let the agent's other threads take the GIL in between).
_RANDOM_CHUNK = 4096
_random_pool = b""
_random_at = 0


def new_event_id() -> str:
    """A UUIDv7 string, strictly increasing within this process (RFC 9562, method 1).

    48 bits of Unix milliseconds, then a 12-bit counter that orders ids made in
    the same millisecond, then 62 random bits.
    """
    global _id_last_ms, _id_counter, _random_pool, _random_at
    with _id_lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms > _id_last_ms:
            _id_last_ms, _id_counter = now_ms, 0
        else:
            _id_counter += 1
            if _id_counter > 0xFFF:  # more than 4096 ids in one ms: borrow the next ms
                _id_last_ms, _id_counter = _id_last_ms + 1, 0
        ms, counter = _id_last_ms, _id_counter
        at = _random_at
        if at + 8 > len(_random_pool):
            _random_pool, at = os.urandom(_RANDOM_CHUNK), 0
        _random_at = at + 8
        rand = int.from_bytes(_random_pool[at : at + 8]) & ((1 << 62) - 1)
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand
    text = f"{value:032x}"  # str(uuid.UUID(int=value)), without building the object
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


#: The UUID variant's hex digit (binary 10xx) for a random hex digit: its low two bits kept.
_VARIANT_DIGIT = {f"{n:x}": f"{0b1000 | (n & 0b11):x}" for n in range(16)}


def new_event_ids(count: int) -> list[str]:
    """``count`` ids as :func:`new_event_id` makes them, in increasing order, at once.

    For a source that builds many events in one go (lines of one read): one clock
    read, one lock and one slice of random bytes for all of them.
    """
    global _id_last_ms, _id_counter, _random_pool, _random_at
    with _id_lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms > _id_last_ms:
            _id_last_ms, _id_counter = now_ms, -1
        ms, first = _id_last_ms, _id_counter + 1
        # Past 4096 ids in one ms, the next ms is borrowed (ids stay strictly increasing).
        last = first + count - 1
        _id_last_ms, _id_counter = ms + (last >> 12), last & 0xFFF
        need = 8 * count
        at = _random_at
        if at + need > len(_random_pool):
            _random_pool, at = os.urandom(max(_RANDOM_CHUNK, need)), 0
        _random_at = at + need
        random_hex = _random_pool[at : at + need].hex()
    ids: list[str] = []
    variant = _VARIANT_DIGIT
    n = first
    while n <= last:  # one run of counters per millisecond
        stamp = f"{ms + (n >> 12):012x}"
        head = f"{stamp[:8]}-{stamp[8:]}-7"
        end = min(last, n | 0xFFF) + 1
        at = 16 * (n - first)
        ids += [
            f"{head}{k & 0xFFF:03x}-{variant[r[0]]}{r[1:4]}-{r[4:]}"
            for k, r in zip(
                range(n, end),
                [random_hex[i : i + 16] for i in range(at, at + 16 * (end - n), 16)],
                strict=True,
            )
        ]
        n = end
    return ids


#: (Unix second, its "YYYY-MM-DDTHH:MM:SS" in UTC): formatted once per second, not per event.
_second_text: tuple[int, str] = (-1, "")


def utc_now() -> str:
    """The current time as RFC 3339 UTC with microseconds, as CloudEvents ``time``."""
    global _second_text
    seconds, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
    cached, text = _second_text
    if seconds != cached:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second_text = (seconds, text)
    return f"{text}.{nanoseconds // 1000:06d}Z"


@dataclass(slots=True)
class Event:
    """One event as a source emits it, before it is committed.

    Sources usually call ``emit(type, data, subject=...)`` and never build one
    themselves; ``process_event`` hooks receive and may change it.

    ``type`` is a dotted CloudEvents type such as ``file.created``; ``source``
    is the source instance name; ``data`` must be JSON-serialisable.
    """

    type: str
    source: str
    data: Any = None
    subject: str | None = None
    id: str = field(default_factory=new_event_id)
    time: str = field(default_factory=utc_now)
    #: More CloudEvents attributes (None: none), for an event that carries one that came
    #: from elsewhere: ``source`` (replaces the agent's own, which then travels as the
    #: extension ``agentsource``), ``datacontenttype``, ``dataschema``, and extensions
    #: (lowercase letters and digits; string, integer or boolean values). With
    #: ``"data_base64": True`` the data is a base64 string sent as ``data_base64``.
    attributes: dict[str, Any] | None = None


@dataclass(slots=True)
class EncodedEvent(Event):
    """An :class:`Event` whose data arrived as JSON text (an MQTT payload, say), kept so the
    queue need not encode the data again.

    The text is queued as it came only when no processor or ``process_event`` hook ran
    on the event (they may change ``data``); it must be valid UTF-8 JSON of ``data`` on
    one line (stdout and the tap write an event a line).
    """

    data_json: str = field(kw_only=True)


def make_events(
    type: str,
    source: str,
    data: Sequence[Any],
    *,
    subject: str | None = None,
    data_json: Sequence[str] | None = None,
) -> list[Event]:
    """Events of one ``type`` from one ``source``, one per item of ``data``, made at once.

    For a source that turns many things read in one go (a chunk of log lines) into
    events: their ids come from one call of :func:`new_event_ids` and they share one
    ``time``, the moment they were read, instead of each calling the clock.
    ``data_json``: each item's JSON text, when the source built it more cheaply than the
    queue would (:class:`EncodedEvent`).
    """
    now = utc_now()
    ids = new_event_ids(len(data))
    if data_json is None:
        return [
            Event(type, source, item, subject, event_id, now)
            for item, event_id in zip(data, ids, strict=True)
        ]
    return [
        EncodedEvent(type, source, item, subject, event_id, now, data_json=text)
        for item, event_id, text in zip(data, ids, data_json, strict=True)
    ]


def canonical_time(value: object) -> str:
    """``time`` as the queue stores it: RFC 3339, UTC, microseconds, ``Z``.

    Times in one form compare as text (max_age, purge); a plugin may set any
    RFC 3339 time. Raises ValueError for anything else.
    """
    if isinstance(value, str) and len(value) == 27 and value[10] == "T" and value[-1] == "Z":
        return value  # already canonical (what utc_now() gives)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        raise ValueError(
            f"event time must be an RFC 3339 time such as 2026-11-26T23:59:01Z, got {value!r}"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


#: ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))``, built once: json.dumps
#: with options builds an encoder per call, and events are encoded by the thousand.
_COMPACT_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
#: The same, refusing NaN and Infinity (event data).
_DATA_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)

#: ``json.dumps(text, ensure_ascii=False)`` for a str, without building an encoder per call.
_string = encode_basestring


_BAD_TYPE_CHARS = re.compile(r"[\x00-\x1f\x7f+#/\s]")


#: Longest event id accepted (an incoming CloudEvent's own id included).
MAX_ID_CHARS = 256
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def check_event(event: Event) -> None:
    """Raise ValueError naming the problem when the event cannot be queued or sent.

    ``type`` becomes part of MQTT topics, so it must be short, printable UTF-8
    without spaces, ``/``, ``+`` or ``#``; ``subject`` must be UTF-8 text.
    """
    if _plainly_good(event):
        return
    for name in ("id", "source"):
        value = getattr(event, name)
        if not isinstance(value, str) or not value or not _is_utf8(value):
            raise ValueError(f"event {name} must be a non-empty UTF-8 string, got {value!r}")
    if len(event.id) > MAX_ID_CHARS or _CONTROL_CHARS.search(event.id):
        # The id travels as an MQTT 5 user property and an AMQP message id: a broker
        # drops the connection over a control character there.
        raise ValueError(
            f"event id must be at most {MAX_ID_CHARS} characters without control characters,"
            f" got {event.id[:80]!r}{'...' if len(event.id) > 80 else ''}"
        )
    event.time = canonical_time(event.time)
    if not isinstance(event.type, str) or event.type not in _GOOD_TYPES:
        _check_type(event.type)
    if event.subject is not None and (
        not isinstance(event.subject, str) or not _is_utf8(event.subject)
    ):
        raise ValueError(f"event subject must be UTF-8 text, got {event.subject!r}")
    if event.attributes is not None:
        check_attributes(event.attributes, event.data)


def _plainly_good(event: Event) -> bool:
    """True for the common event that passes every check of :func:`check_event` for plain
    reasons: ASCII text (valid UTF-8; the id also printable), a type already found good, a
    canonical time, no extra attributes. Each test reads a flag CPython keeps on a str, so
    nothing is encoded or searched."""
    identifier, source, subject, time = event.id, event.source, event.subject, event.time
    return (
        type(identifier) is str
        and 0 < len(identifier) <= MAX_ID_CHARS
        and identifier.isascii()
        and identifier.isprintable()
        and type(source) is str
        and source != ""
        and source.isascii()
        and (subject is None or (type(subject) is str and subject.isascii()))
        and type(time) is str
        and len(time) == 27
        and time[10] == "T"
        and time[-1] == "Z"
        and type(event.type) is str
        and event.type in _GOOD_TYPES
        and event.attributes is None
    )


#: Event types already found good (a source uses a handful): checked once, not per event.
_GOOD_TYPES: set[str] = set()
_GOOD_TYPES_MAX = 1024


def _check_type(type: object) -> None:
    if not isinstance(type, str) or not type or len(type) > 128:
        raise ValueError(
            f"event type must be a non-empty string of at most 128 characters, got {type!r}"
        )
    if _BAD_TYPE_CHARS.search(type) or not _is_utf8(type):
        raise ValueError(
            f"event type {type!r} may not hold spaces, control characters, '/', '+', '#'"
            " or undecodable bytes"
        )
    if len(_GOOD_TYPES) < _GOOD_TYPES_MAX:
        _GOOD_TYPES.add(type)


#: Attributes an event holds itself: ``Event.attributes`` may not name them.
_OWN_ATTRIBUTES = frozenset({"specversion", "id", "type", "time", "subject", "sequence", "data"})
#: CloudEvents attribute names: lowercase letters and digits (at most 20 recommended).
_ATTRIBUTE_NAME = re.compile(r"[a-z0-9]{1,64}")


def check_attributes(attributes: dict[str, Any], data: Any) -> None:
    """Raise ValueError naming the problem when ``attributes`` (see :class:`Event`) cannot be
    carried: a name CloudEvents does not allow or the event holds itself, a value that is
    not a string, an integer or a boolean, text that is not UTF-8."""
    for name, value in attributes.items():
        if name == "data_base64":
            if value is not True or not isinstance(data, str):
                raise ValueError("data_base64 must be True, with the data a base64 string")
            continue
        if not isinstance(name, str) or not _ATTRIBUTE_NAME.fullmatch(name):
            raise ValueError(
                f"attribute name {name!r}: CloudEvents takes lowercase letters and digits only"
            )
        if name in _OWN_ATTRIBUTES or name == "agentsource":
            raise ValueError(f"attribute {name!r} is the event's own; set it on the event")
        if isinstance(value, str):
            if not _is_utf8(value):
                raise ValueError(f"attribute {name!r} is not valid UTF-8 text")
        elif not isinstance(value, int | bool):
            raise ValueError(
                f"attribute {name!r} must be a string, an integer or a boolean, got"
                f" {type(value).__name__}"
            )


def encode_attributes(event: Event) -> str | None:
    """``event.attributes`` as the queue stores them: compact JSON, or None when there are none."""
    if not event.attributes:
        return None
    return _COMPACT_ENCODER.encode(event.attributes)


def _is_utf8(text: str) -> bool:
    if text.isascii():  # a flag CPython keeps: no encoding needed
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: The C encoder behind ``_DATA_ENCODER.encode``, made once instead of per call. Without
#: circular-reference markers (a dict shared by every thread could report a false
#: cycle): data that holds itself ends in RecursionError instead, reported alike.
_C_DATA_ENCODER = (
    json.encoder.c_make_encoder(
        None, _DATA_ENCODER.default, encode_basestring, None, ":", ",", False, False, False
    )
    if json.encoder.c_make_encoder is not None
    else None
)


def encode_data(data: Any) -> str:
    """Serialise event data to compact JSON that is valid UTF-8.

    Raises ValueError naming the problem when the data is not serialisable or
    holds text that cannot be UTF-8 (a lone surrogate from an undecodable name).
    """
    try:
        if _C_DATA_ENCODER is None or isinstance(data, str):
            text = _DATA_ENCODER.encode(data)
        else:
            text = "".join(_C_DATA_ENCODER(data, 0))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"event data is not JSON-serialisable: {exc}") from None
    except RecursionError:
        raise ValueError(
            "event data is not JSON-serialisable: it holds itself (or is nested too deep)"
        ) from None
    if not _is_utf8(text):
        raise ValueError(
            "event data holds text that is not valid UTF-8 (undecodable bytes);"
            " decode it with errors='replace' or send the bytes as base64"
        )
    return text


@dataclass(slots=True)
class QueuedEvent:
    """An event committed to the queue, as sinks receive it. Treat it as read-only.

    (Not a frozen dataclass only because those take four times as long to
    build, and forwarders build one per event.)

    ``position`` is the event's place in the queue (increasing, never reused);
    ``sequence`` counts per source. ``data_json`` is the data as stored.
    """

    position: int
    id: str
    source: str
    type: str
    time: str
    subject: str | None
    sequence: int
    data_json: str
    agent_id: str
    #: More CloudEvents attributes as JSON text (see :attr:`Event.attributes`), or None.
    attributes_json: str | None = None

    @property
    def data(self) -> Any:
        """The event data, parsed from JSON."""
        return json.loads(self.data_json)

    @property
    def source_uri(self) -> str:
        """The CloudEvents ``source``: ``edge-agent://{agent}/{source}``."""
        return f"edge-agent://{self.agent_id}/{self.source}"

    def _own_attributes(self) -> dict[str, Any]:
        """The attributes every event has (``subject`` when it has one)."""
        attributes: dict[str, Any] = {
            "specversion": "1.0",
            "id": self.id,
            "source": self.source_uri,
            "type": self.type,
            "time": self.time,
            "sequence": str(self.sequence).zfill(SEQUENCE_DIGITS),
            "datacontenttype": "application/json",
        }
        if self.subject is not None:
            attributes["subject"] = self.subject
        return attributes

    def attributes(self) -> dict[str, str]:
        """The CloudEvents context attributes (everything but ``data``)."""
        attributes = self._own_attributes()
        if self.attributes_json is not None:
            for name, value in self.extra_attributes().items():
                if name == "source":
                    attributes["agentsource"] = attributes["source"]
                if name != "data_base64":
                    attributes[name] = (
                        ("true" if value else "false") if isinstance(value, bool) else str(value)
                    )
        return attributes

    def extra_attributes(self) -> dict[str, Any]:
        """The attributes that came with the event (:attr:`Event.attributes`); {}: none."""
        return json.loads(self.attributes_json) if self.attributes_json else {}

    @property
    def is_base64(self) -> bool:
        """True when the data is a base64 string of bytes, sent as ``data_base64``."""
        return self.attributes_json is not None and bool(self.extra_attributes().get("data_base64"))

    def to_cloudevent_json(self) -> str:
        """The whole CloudEvents envelope as compact JSON text (the same as ``attributes()``
        plus ``data``, built without a dict: forwarders call this once per event)."""
        if self.attributes_json is not None:
            return self._extended_cloudevent_json()
        subject = "" if self.subject is None else f',"subject":{_string(self.subject)}'
        return (
            f'{{"specversion":"1.0","id":{_string(self.id)},'
            f'"source":{_string(self.source_uri)},"type":{_string(self.type)},'
            f'"time":{_string(self.time)},"sequence":"{self.sequence:0{SEQUENCE_DIGITS}d}",'
            f'"datacontenttype":"application/json"{subject},"data":{self.data_json}}}'
        )

    def _extended_cloudevent_json(self) -> str:
        extra = self.extra_attributes()
        envelope = self._own_attributes()
        if "source" in extra:
            envelope["agentsource"] = envelope["source"]
        base64 = bool(extra.pop("data_base64", False))
        envelope.update(extra)
        head = _COMPACT_ENCODER.encode(envelope)
        return f'{head[:-1]},"{"data_base64" if base64 else "data"}":{self.data_json}}}'
