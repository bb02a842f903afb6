"""The ``amqp`` sink: events to RabbitMQ (AMQP 0-9-1), confirmed by publisher confirms.

An event counts as delivered only when the broker confirms it (basic.ack
after ``confirm_delivery``). A nack, or an unroutable message returned to us
(``mandatory``), is a refusal: the event is rejected (:meth:`edge_agent.Sink.reject`),
sent again, and set aside as a dead letter after ``[queue] dead_letter_after``
refusals, while the events behind it go on. A routing key longer than AMQP
takes (255 bytes) is rejected as invalid at once. Messages are persistent by
default, so the broker writes them to disk before it confirms them to durable
queues.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

from edge_agent import Duration, QueuedEvent, Sink, SinkUnavailable, hookimpl, option
from edge_agent.units import split_host

#: pika, imported once an AMQP sink is configured: it costs about 3 MiB of memory
#: and 50 ms of start-up, which an agent without one should not pay.
pika: Any = None


def _load_pika() -> None:
    global pika
    if pika is None:
        import pika.exceptions  # binds the package, with its exceptions, to the global

        _quiet_pika()


class _DropReturned(logging.Filter):
    """Drops pika's dump of each returned message: the sink logs one line of its own
    per routing key, which the agent's log folds into a count while it repeats."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Published message was returned")


def _quiet_pika() -> None:
    """pika logs about 18 INFO lines per connect, and a WARNING with the properties and
    body of every returned message: keep it at WARNING (unless the agent logs at debug)
    and leave returned messages to the sink's own line."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("pika").setLevel(logging.WARNING)
    blocking = logging.getLogger("pika.adapters.blocking_connection")
    if not any(isinstance(f, _DropReturned) for f in blocking.filters):
        blocking.addFilter(_DropReturned())


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
FIELDS = ("agent", "source", "type")
#: An AMQP 0-9-1 routing key is a short string: at most 255 bytes.
MAX_ROUTING_KEY = 255


class AmqpSink(Sink):
    """Publishes each event to an exchange with a routing key made from a template."""

    @dataclass(kw_only=True)
    class Config:
        url: str = option(
            "amqp://guest:guest@127.0.0.1:5672/%2F",
            secret=True,
            doc="amqp:// or amqps:// URL with credentials; or url_file = PATH.",
        )
        hosts: list[str] = option(
            [],
            doc='Brokers tried in turn, "host:port" each (the nodes of a cluster); replaces'
            " the URL's host and port, which keeps the credentials, vhost and options.",
        )
        exchange: str = option("edge", doc='Exchange to publish to; "" is the default exchange.')
        exchange_type: Literal["topic", "direct", "fanout", "headers"] = option(
            "topic", doc="Type used when declaring the exchange."
        )
        declare_exchange: bool = option(
            True, doc="Declare the exchange (durable) at connect; false if it is managed elsewhere."
        )
        routing_key: str = option(
            "{agent}.{source}.{type}", doc="Routing key template: {agent}, {source}, {type}."
        )
        persistent: bool = option(True, doc="delivery_mode 2: the broker keeps it on disk.")
        mandatory: bool = option(
            True,
            doc="A message no queue takes is returned and kept here (sent again, then set"
            " aside as a dead letter), rather than being dropped by the broker.",
        )
        payload: Literal["cloudevent", "data"] = option(
            "cloudevent", doc='"cloudevent": the whole envelope; "data": the data alone.'
        )
        heartbeat: int = option(30, min=0, max=65535, doc="AMQP heartbeat, seconds; 0: none.")
        connect_timeout: Duration = option(
            10.0, above=0, doc="How long a connection attempt may take."
        )
        reconnect_min: Duration = option(
            1.0, above=0, doc="Shortest wait between connection attempts."
        )
        reconnect_max: Duration = option(
            60.0, above=0, doc="Longest wait between connection attempts."
        )

        def __post_init__(self) -> None:
            if not self.url.startswith(("amqp://", "amqps://")):
                raise ValueError("url must start with amqp:// or amqps://")
            for entry in self.hosts:
                split_host(entry, 5672)
            unknown = [m for m in _PLACEHOLDER.findall(self.routing_key) if m not in FIELDS]
            if unknown:
                raise ValueError(
                    f"routing_key uses unknown field(s) {', '.join(unknown)}; known: {FIELDS}"
                )
            if self.reconnect_min > self.reconnect_max:
                raise ValueError(
                    f"reconnect_min ({self.reconnect_min:g}s) is more than reconnect_max"
                    f" ({self.reconnect_max:g}s)"
                )

    max_batch = 200

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _load_pika()
        self.retry_min = self.config.reconnect_min
        self.retry_max = self.config.reconnect_max
        self._connection: Any = None
        self._channel: Any = None
        self._where = _where(pika.URLParameters(self.config.url))
        #: Messages nacked or returned by the broker, since start.
        self.refused = 0
        if not self.config.mandatory:
            self.log.warning(
                "mandatory = false: the broker drops an event no queue is bound for without"
                " a word, and it counts here as delivered; set mandatory = true to keep such"
                " events (refused, then set aside as dead letters)"
            )

    @property
    def target(self) -> str:
        return self._where  # the URL without its credentials

    def brokers(self) -> list[Any]:
        """Connection parameters of every broker, in the order they are tried."""
        config = self.config
        found = []
        for entry in config.hosts or [None]:
            params = pika.URLParameters(config.url)
            if entry is not None:
                params.host, params.port = split_host(entry, params.port)
            params.heartbeat = config.heartbeat
            params.socket_timeout = config.connect_timeout
            params.blocked_connection_timeout = config.connect_timeout * 3
            params.connection_attempts = 1
            found.append(params)
        return found

    def _connect(self) -> Any:
        """A connection to the first broker that answers; the last one's error if none does.
        Credentials refused are final: every node of a cluster shares its users."""
        brokers = self.brokers()
        for index, params in enumerate(brokers):
            self._where = _where(params)
            try:
                return pika.BlockingConnection(params)
            except pika.exceptions.ProbableAuthenticationError:
                raise
            except (pika.exceptions.AMQPError, OSError):
                if index == len(brokers) - 1:
                    raise
                self.log.debug("%s does not answer; trying the next of hosts", self._where)
        raise AssertionError("no brokers")  # brokers() has at least one

    def open(self) -> None:
        config = self.config
        params = self.brokers()[-1]  # the one whose error is raised
        try:
            self._connection = self._connect()
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
            if config.declare_exchange and config.exchange:
                self._channel.exchange_declare(
                    config.exchange, exchange_type=config.exchange_type, durable=True
                )
        except pika.exceptions.ProbableAuthenticationError:
            raise SinkUnavailable("the broker refused the credentials in url") from None
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise SinkUnavailable(f"the broker closed the channel: {exc.reply_text}") from None
        except (pika.exceptions.AMQPError, OSError) as exc:
            from edge_agent.tls import describe_tls_error, find_verify_error

            if find_verify_error(exc) is not None:
                why = describe_tls_error(exc, params.host, "ssl_options in url (ca_certs)")
                raise SinkUnavailable(why) from None
            raise SinkUnavailable(_describe(exc)) from None

    def publish(self, events: list[QueuedEvent]) -> list[QueuedEvent]:
        if self._channel is None:
            raise SinkUnavailable("not connected")
        config = self.config
        confirmed = []
        for event in events:
            key = routing_key(config.routing_key, event)
            if len(key.encode("utf-8")) > MAX_ROUTING_KEY:
                self.reject(
                    event,
                    f"the routing key is {len(key.encode('utf-8'))} bytes long; AMQP takes at"
                    f" most {MAX_ROUTING_KEY}",
                    invalid=True,
                )
                continue
            body = event.data_json if config.payload == "data" else event.to_cloudevent_json()
            properties = pika.BasicProperties(
                content_type="application/cloudevents+json"
                if config.payload == "cloudevent"
                else "application/json",
                delivery_mode=2 if config.persistent else 1,
                message_id=event.id,
                type=event.type,
                app_id="edge-agent",
                headers={f"ce_{k}": v for k, v in event.attributes().items()},
            )
            try:
                self._channel.basic_publish(
                    config.exchange,
                    key,
                    body.encode("utf-8"),
                    properties=properties,
                    mandatory=config.mandatory,
                )
            except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
                self.refused += 1
                why = (
                    "returned unroutable: no queue is bound for it"
                    if isinstance(exc, pika.exceptions.UnroutableError)
                    else "nacked by the broker"
                )
                self.reject(event, f"{why} (exchange {config.exchange!r}, routing key {key!r})")
                # The same line for each event with this key, so that the log folds the
                # repeats into a count; which events, and why, is in the dead letters.
                self.log.warning(
                    "the broker did not take an event (exchange %r, routing key %s: %s); it"
                    " is sent again, and set aside as a dead letter after [queue]"
                    " dead_letter_after refusals (edge-agent queue dead list)",
                    config.exchange,
                    key,
                    why,
                )
                continue
            except (pika.exceptions.AMQPError, OSError) as exc:
                if confirmed:
                    break  # keep what was confirmed; the next call notices the loss
                raise SinkUnavailable(_describe(exc)) from None
            confirmed.append(event)
        return confirmed

    def check_connection(self) -> None:
        if self._connection is None or not self._connection.is_open:
            raise SinkUnavailable("connection lost")
        try:
            self._connection.process_data_events(time_limit=0)  # heartbeats, a close
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise SinkUnavailable(_describe(exc)) from None

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(Exception):
                connection.close()


def routing_key(template: str, event: QueuedEvent) -> str:
    """Fill ``{agent}``, ``{source}`` and ``{type}``."""
    values = {"agent": event.agent_id, "source": event.source, "type": event.type}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _where(params: Any) -> str:
    """host:port/vhost, without the credentials."""
    return f"{params.host}:{params.port}{params.virtual_host and '/' + params.virtual_host}"


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "…"


@hookimpl
def register_sinks(register):
    register("amqp", AmqpSink)
