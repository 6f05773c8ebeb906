"""The `kafka` sink's settings: the config model, its checks (topic names, bootstrap servers,
settings the sink owns, idempotence) and librdkafka's own offline verdict on them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from outbox_relay.connectors.sinks.kafka.outcomes import kafka_text
from outbox_relay.durations import Duration
from outbox_relay.registry import ConnectorConfig
from outbox_relay.secrets import is_secret_key, scrubber
from outbox_relay.templates import TEMPLATE_FIELDS, check_template

ProducerValue = str | int | float | bool

#: Merged *under* the user's `producer:` settings: the user can override each of them.
SAFE_DEFAULTS: dict[str, ProducerValue] = {
    # A delivery report then means every in-sync replica has the message (docs/concepts/guarantees.md:
    # marked only after the broker said yes).
    "acks": "all",
    # librdkafka retries internally without duplicating or reordering a partition's messages;
    # it keeps max.in.flight.requests.per.connection at its idempotence-compatible 5.
    "enable.idempotence": True,
    # A few ms of batching turns a burst of small events into one request per partition.
    "linger.ms": 5,
    # Cheap on CPU, good on JSON; in builtin.features of the librdkafka inside the confluent-kafka
    # wheels (checked with 2.16.0), so no system library is needed.
    "compression.type": "lz4",
    # The Java client's partitioner: a key lands on the same partition as when Debezium or a
    # Java service produces it, so consumers joining topics by key stay co-partitioned.
    "partitioner": "murmur2_random",
    "client.id": "outbox-relay",
}

# Settings the sink owns: a second way to set them would make the effective value ambiguous.
_OWNED_SETTINGS: dict[str, str] = {
    "bootstrap.servers": "use bootstrap_servers",
    "metadata.broker.list": "use bootstrap_servers",
    "message.timeout.ms": "use delivery_timeout",
    "delivery.timeout.ms": "use delivery_timeout",
    "transactional.id": "transactions are not supported; idempotence already prevents duplicates",
    "error_cb": "callbacks cannot be configured",
    "logger": "callbacks cannot be configured",
}

# Kafka's own rule for topic names (kafka.common.internals.Topic).
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_TOPIC_LITERAL = re.compile(r"^[A-Za-z0-9._-]*$")


def _check_template(template: str, what: str) -> None:
    literals = check_template(template, what)
    if what != "topic":
        return
    for literal in literals:
        if not _TOPIC_LITERAL.match(literal):
            raise ValueError(
                f"topic template {template!r} has characters Kafka refuses in topic names "
                "(allowed: letters, digits, '.', '_', '-')"
            )
    static = "".join(literals) if len(literals) == 1 and "{" not in template.replace("{{", "") else None
    if static is not None and (static in (".", "..") or not TOPIC_NAME.match(static)):
        raise ValueError(f"topic {_shown_topic(static)!r} is not a topic name Kafka allows: {_TOPIC_RULE}")
    if sum(map(len, literals)) > 249:
        raise ValueError(
            f"topic template {_shown_topic(template)!r} renders topics longer than Kafka allows:"
            f" {_TOPIC_RULE}"
        )


_TOPIC_RULE = "1 to 249 letters, digits, '.', '_' or '-', and not '.' or '..'"


def _shown_topic(text: str) -> str:
    return text if len(text) <= 60 else text[:60] + "..."


# One bootstrap server as librdkafka reads it: [protocol://]host[:port], an IPv6 host in brackets.
_SERVER = re.compile(
    r"^(?:(?P<protocol>[A-Za-z_]+)://)?(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*))"
    r"(?::(?P<port>[0-9]{1,5}))?$"
)
_PROTOCOLS = frozenset({"plaintext", "ssl", "sasl_plaintext", "sasl_ssl"})


def _check_bootstrap_servers(value: str) -> None:
    """`host:port,host:port` as librdkafka reads it, refused here rather than retried forever."""
    for entry in value.split(","):
        server = entry.strip()
        if not server:
            raise ValueError("has an empty entry: write host:port,host:port")
        shown = server if len(server) <= 80 else server[:80] + "..."
        match = _SERVER.match(server)
        if match is None:
            raise ValueError(
                f"{shown!r} is not host:port (a host name, an IPv4 address or [IPv6], and a port)"
            )
        if match["protocol"] and match["protocol"].lower() not in _PROTOCOLS:
            raise ValueError(
                f"{shown!r}: unknown protocol {match['protocol']!r} (known: {', '.join(sorted(_PROTOCOLS))};"
                " set security.protocol under producer: instead)"
            )
        if match["port"] is not None and not 1 <= int(match["port"]) <= 65535:
            raise ValueError(f"{shown!r}: the port must be between 1 and 65535")


#: librdkafka names some settings by an alias in its messages.
_SETTING_ALIASES = {
    "queue.buffering.max.ms": "linger.ms",
    "compression.codec": "compression.type",
    "queue.buffering.max.messages": "queue.buffering.max.messages",
    "request.required.acks": "acks",
}
_QUOTED = re.compile(r'["`]([A-Za-z0-9._-]+)["`]')


def validate_offline(config: KafkaSinkConfig) -> list[tuple[str, str]]:
    """librdkafka's own verdict on the producer settings, without contacting any broker (the
    producer is created without bootstrap servers and dropped at once): (key, reason) pairs."""
    import logging

    from confluent_kafka import KafkaException, Producer

    settings: dict[str, Any] = dict(config.producer_settings())
    del settings["bootstrap.servers"]
    silent = logging.getLogger("outbox_relay.kafka.validate")
    silent.addHandler(logging.NullHandler())
    silent.propagate = False
    settings["logger"] = silent  # (the warning that no broker is configured goes nowhere)
    try:
        Producer(settings)
    except (KafkaException, ValueError, TypeError) as exc:
        text = scrubber.scrub(kafka_text(exc))
        return [(_setting_key(text, config), f"librdkafka refuses the producer settings: {text}")]
    return []


def _setting_key(message: str, config: KafkaSinkConfig) -> str:
    """The config key a librdkafka message is about (it quotes the setting's name)."""
    for name in _QUOTED.findall(message):
        if name == "message.timeout.ms":
            return "delivery_timeout"
        for candidate in (name, _SETTING_ALIASES.get(name, name)):
            if candidate in config.producer:
                return f"producer.{candidate}"
    return "producer"


def truthy(value: ProducerValue) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


class KafkaSinkConfig(ConnectorConfig):
    type: Literal["kafka"]
    bootstrap_servers: str = Field(
        min_length=1, description="Comma-separated host:port list of brokers to bootstrap from."
    )
    topic: str = Field(
        default="outbox.{aggregate_type}",
        min_length=1,
        description=f"Topic template; fields: {', '.join(TEMPLATE_FIELDS)}.",
    )
    key: str = Field(
        default="{aggregate_id}",
        description="Message key template; events with equal keys share a partition and keep their order.",
    )
    producer: dict[str, ProducerValue] = Field(
        default_factory=dict,
        description="librdkafka producer settings, passed unchanged; they override the safe defaults.",
    )
    format: Literal["raw", "cloudevents"] = Field(
        default="raw",
        description="raw: payload and headers only; cloudevents: also CloudEvents binary-mode headers.",
    )
    delivery_timeout: Duration = Field(
        default=30.0,
        gt=0,
        description="How long one event may wait for its delivery report before it counts as failed.",
    )

    @field_validator("bootstrap_servers")
    @classmethod
    def _valid_bootstrap_servers(cls, value: str) -> str:
        _check_bootstrap_servers(value)
        return value

    @field_validator("topic")
    @classmethod
    def _valid_topic(cls, value: str) -> str:
        _check_template(value, "topic")
        return value

    @field_validator("key")
    @classmethod
    def _valid_key(cls, value: str) -> str:
        _check_template(value, "key")
        return value

    @field_validator("producer", mode="before")
    @classmethod
    def _scalar_settings(cls, value: object) -> object:
        # Without this, pydantic reports one error per member of the value union.
        if isinstance(value, dict):
            for name, setting in value.items():
                if not isinstance(setting, str | int | float | bool):
                    raise ValueError(f"{name} must be a string, number or boolean (librdkafka setting)")
        return value

    @field_validator("producer")
    @classmethod
    def _no_owned_settings(cls, value: dict[str, ProducerValue]) -> dict[str, ProducerValue]:
        for name in value:
            if name in _OWNED_SETTINGS:
                raise ValueError(f"{name} cannot be set here: {_OWNED_SETTINGS[name]}")
        return value

    @model_validator(mode="after")
    def _idempotence_consistent(self) -> KafkaSinkConfig:
        # librdkafka refuses these combinations only when the producer is created; saying so
        # at config time names the key instead of failing on every start attempt.
        settings = self.producer_settings()
        if truthy(settings["enable.idempotence"]):
            acks = str(settings["acks"]).strip().lower()
            if acks not in ("all", "-1"):
                raise ValueError(
                    f"producer.acks={settings['acks']} needs producer.enable.idempotence: false "
                    "(and an acknowledgement then no longer means every in-sync replica has the event)"
                )
            for name in ("max.in.flight.requests.per.connection", "max.in.flight"):
                if name in settings and not isinstance(settings[name], bool):
                    try:
                        in_flight = int(settings[name])
                    except ValueError:
                        raise ValueError(f"producer.{name} must be a number") from None
                    if in_flight > 5:
                        raise ValueError(
                            f"producer.{name}={in_flight} is above 5, which enable.idempotence forbids"
                        )
        return self

    def producer_settings(self) -> dict[str, ProducerValue]:
        """The librdkafka configuration the sink uses (without callbacks), secrets included."""
        settings: dict[str, ProducerValue] = dict(SAFE_DEFAULTS)
        settings.update(self.producer)
        settings["bootstrap.servers"] = self.bootstrap_servers
        # librdkafka reads 0 as "never time out"; the validator already refuses 0.
        settings["message.timeout.ms"] = max(1, round(self.delivery_timeout * 1000))
        return settings

    def secrets(self) -> list[str]:
        return [str(v) for k, v in self.producer.items() if is_secret_key(k) and str(v)]


def partition_order_survives_retries(settings: Mapping[str, ProducerValue]) -> bool:
    """Messages of one partition keep their order across librdkafka's retries only with
    idempotence or one request in flight. (The events of an aggregate share a partition only
    when topic and key are the same for all of them: `keeps_order` needs both.)"""
    in_flight = settings.get("max.in.flight.requests.per.connection", settings.get("max.in.flight", ""))
    return truthy(settings["enable.idempotence"]) or str(in_flight).strip() == "1"
