"""The `rabbitmq` sink's settings: the config model, its checks (the URL, the routing key template,
the exchange name) and pika's own offline reading of the URL."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import parse_qsl

from pydantic import Field, field_validator, model_validator

from outbox_relay.durations import Duration
from outbox_relay.registry import ConnectorConfig
from outbox_relay.secrets import parse_url_setting, redact_url, scrubber
from outbox_relay.templates import TEMPLATE_FIELDS, check_template

ExchangeType = Literal["topic", "direct", "fanout", "headers", "x-consistent-hash"]

DEFAULT_ROUTING_KEY = "{aggregate_type}.{event_type}"
# The consistent-hash exchange hashes the routing key: the aggregate id keeps an aggregate on one queue.
CONSISTENT_HASH_ROUTING_KEY = "{aggregate_id}"


# Connection settings that the sink's own keys control; a second spelling in the URL would make
# the effective value ambiguous.
_OWNED_URL_OPTIONS: dict[str, str] = {
    "heartbeat": "use heartbeat",
    "socket_timeout": "use connect_timeout",
    "stack_timeout": "use connect_timeout",
    "blocked_connection_timeout": "use confirm_timeout",
    "connection_attempts": "the relay reconnects by itself, with backoff",
    "retry_delay": "the relay reconnects by itself, with backoff",
}

MAX_SHORTSTR = 255  # AMQP short strings (routing keys, exchange names) are at most 255 bytes


class RabbitMQSinkConfig(ConnectorConfig):
    type: Literal["rabbitmq"]
    url: str = Field(
        min_length=1,
        description="amqp://user:password@host:5672/vhost (or amqps://); the password is never shown.",
    )
    exchange: str = Field(
        default="outbox",
        max_length=MAX_SHORTSTR,
        description='Exchange to publish to; "" is the default exchange (routing key = queue name).',
    )
    exchange_type: ExchangeType = Field(
        default="topic",
        description="Type used when declaring the exchange. x-consistent-hash needs the "
        'rabbitmq_consistent_hash_exchange plugin; bind N queues with a weight such as "1".',
    )
    routing_key: str = Field(
        default=DEFAULT_ROUTING_KEY,
        description=f"Routing key template; fields: {', '.join(TEMPLATE_FIELDS)}. "
        f"Defaults to {CONSISTENT_HASH_ROUTING_KEY} for x-consistent-hash exchanges.",
    )
    declare: bool = Field(
        default=True,
        description="Declare the exchange (durable) on connect; false only checks that it exists.",
    )
    mandatory: bool = Field(
        default=True,
        description="Treat a message no queue is bound for as a failure instead of letting RabbitMQ drop it.",
    )
    confirm_timeout: Duration = Field(
        default=30.0,
        gt=0,
        description="How long a call waits for publisher confirms before its unconfirmed events count as "
        "failed (also the longest a connection may stay blocked by a resource alarm).",
    )
    connect_timeout: Duration = Field(
        default=10.0, gt=0, description="Bound on TCP connect plus the AMQP handshake."
    )
    heartbeat: Duration = Field(
        default=60.0,
        ge=0,
        description="AMQP heartbeat: a dead connection is noticed after about twice this; 0 disables.",
    )

    @model_validator(mode="before")
    @classmethod
    def _routing_key_for_exchange_type(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and "routing_key" not in data
            and data.get("exchange_type") == "x-consistent-hash"
        ):
            return {**data, "routing_key": CONSISTENT_HASH_ROUTING_KEY}
        return data

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        parts = parse_url_setting(value, ("amqp", "amqps"))
        shown = redact_url(value)
        if not parts.hostname:
            raise ValueError(f"url {shown!r} names no host")
        for name, _ in parse_qsl(parts.query):
            if name in _OWNED_URL_OPTIONS:
                raise ValueError(f"url option {name} cannot be set in the URL: {_OWNED_URL_OPTIONS[name]}")
        return value

    @field_validator("routing_key")
    @classmethod
    def _valid_routing_key(cls, value: str) -> str:
        check_template(value, "routing_key")
        return value

    @field_validator("exchange")
    @classmethod
    def _valid_exchange(cls, value: str) -> str:
        if len(value.encode()) > MAX_SHORTSTR:
            raise ValueError(f"exchange name is longer than {MAX_SHORTSTR} bytes")
        return value


def validate_offline(config: RabbitMQSinkConfig) -> list[tuple[str, str]]:
    """pika's own reading of the url (its URL options), without connecting; and an exchange the
    relay would declare under the `amq.` prefix, which RabbitMQ reserves for itself and refuses
    to declare (ACCESS_REFUSED on every connect). (key, reason) pairs."""
    import pika

    problems: list[tuple[str, str]] = []
    try:
        pika.URLParameters(config.url)
    except (ValueError, TypeError) as exc:
        shown = redact_url(config.url)
        problems.append(("url", f"pika refuses url {shown!r}: {scrubber.scrub(str(exc))}"))
    if config.declare and config.exchange.startswith("amq."):
        problems.append(
            (
                "exchange",
                f"exchange {config.exchange!r} starts with 'amq.', a prefix RabbitMQ reserves: it refuses"
                " to declare such an exchange; name another one, or set declare: false to publish to"
                " one of its predeclared amq.* exchanges",
            )
        )
    return problems
