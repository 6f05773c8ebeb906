"""Sink `kafka`: produces every event to a Kafka topic with confluent-kafka (librdkafka).

An acknowledgement is a delivery report without error from a producer configured with
`acks=all` (the default here): every in-sync replica has the message. With
`enable.idempotence=true` (also the default) librdkafka's own retries cannot duplicate or reorder
messages within a partition, so the only duplicates left are the relay's at-least-once re-sends.

`confluent_kafka` is imported inside methods only, so that a config naming this sink validates
(and `check` can say which extra to install) on an installation without the `kafka` extra.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import Field, field_validator, model_validator

from outbox_relay.durations import Duration
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import ConnectorError, Delivered, DeliveryReader, Sink
from outbox_relay.logs import get_logger
from outbox_relay.registry import ConnectorConfig, SinkPlugin
from outbox_relay.secrets import MASK, is_secret_key, scrubber
from outbox_relay.templates import TEMPLATE_FIELDS, Template, check_template

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Message, Producer

ProducerValue = str | int | float | bool

#: Merged *under* the user's `producer:` settings: the user can override each of them.
SAFE_DEFAULTS: dict[str, ProducerValue] = {
    # A delivery report then means every in-sync replica has the message (DESIGN.md promise 4).
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
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_TOPIC_LITERAL = re.compile(r"^[A-Za-z0-9._-]*$")

# librdkafka scans for timed-out messages once a second, so reports arrive up to ~1 s after
# message.timeout.ms; the margin keeps our own bound from firing before librdkafka's.
_WAIT_MARGIN_S = 2.0
_PROBE_TIMEOUT_MAX_S = 10.0
# How long the poll thread waits per round while it polls (no publish call is waiting).
_IDLE_POLL_S = 0.05
_QUEUE_FULL_PAUSE_S = 0.01
# A publish call serves its reports after 1 ms, then every 2 ms: the reports of a batch arrive
# together (one produce request per partition), and a shorter pause only burns CPU.
_SERVE_PAUSE_MIN_S = 0.001
_SERVE_PAUSE_MAX_S = 0.002
# Template fields with one value for all events of an aggregate.
_AGGREGATE_FIELDS = frozenset({"aggregate_type", "aggregate_id"})
# Rendered topic names already checked against Kafka's naming rule; bounded for per-aggregate topics.
_VALID_TOPICS_KEPT = 10_000


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
    if static is not None and (static in (".", "..") or not _TOPIC_NAME.match(static)):
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
        text = scrubber.scrub(_kafka_text(exc))
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


def _truthy(value: ProducerValue) -> bool:
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
        if _truthy(settings["enable.idempotence"]):
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


# --- the sink ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Outcome:
    result: PublishResult
    #: The producer instance can no longer deliver (fenced or fatal): a new one can.
    producer_broken: bool = False


_RETRIABLE_ANYWAY = frozenset(
    {
        # Producer-state errors: a new producer id fixes them, so they are not the event's fault.
        "INVALID_PRODUCER_EPOCH",
        "INVALID_PRODUCER_ID_MAPPING",
        "INVALID_TXN_STATE",
    }
)
_PERMANENT = frozenset(
    {
        "MSG_SIZE_TOO_LARGE",
        "_MSG_SIZE_TOO_LARGE",
        "RECORD_LIST_TOO_LARGE",
        "UNKNOWN_TOPIC_OR_PART",
        "_UNKNOWN_TOPIC",
        "_UNKNOWN_PARTITION",
        "TOPIC_EXCEPTION",
        "POLICY_VIOLATION",
        "UNSUPPORTED_FOR_MESSAGE_FORMAT",
        "CORRUPT_MESSAGE",
    }
)
# After these the producer instance is stuck: tansu, for one, answers every later produce of an
# idempotent producer with PRODUCER_FENCED once librdkafka bumped its epoch after a timeout.
_PRODUCER_BROKEN = frozenset(
    {
        "PRODUCER_FENCED",
        "_FENCED",
        "_FATAL",
        "INVALID_PRODUCER_EPOCH",
        "INVALID_PRODUCER_ID_MAPPING",
        "OUT_OF_ORDER_SEQUENCE_NUMBER",
        "UNKNOWN_PRODUCER_ID",
    }
)
# The cluster refuses the relay itself (its principal's ACLs, its SASL credentials), not the
# event: every event would get the same answer until an operator grants or fixes it.
_REFUSED_THE_RELAY = frozenset(
    {
        "TOPIC_AUTHORIZATION_FAILED",
        "CLUSTER_AUTHORIZATION_FAILED",
        "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
        "SASL_AUTHENTICATION_FAILED",
        "_AUTHENTICATION",
    }
)
_HINTS = {
    "MSG_SIZE_TOO_LARGE": "the event is larger than message.max.bytes of the producer or the topic",
    "_MSG_TIMED_OUT": "no delivery report within delivery_timeout: broker unreachable or too slow",
    "UNKNOWN_TOPIC_OR_PART": "the topic does not exist and the broker did not create it",
    "_UNKNOWN_TOPIC": "the topic does not exist and the broker did not create it",
    "TOPIC_AUTHORIZATION_FAILED": "the relay's principal may not write to the topic",
    "CLUSTER_AUTHORIZATION_FAILED": "the relay's principal lacks a cluster permission "
    "(IdempotentWrite, with enable.idempotence)",
    "SASL_AUTHENTICATION_FAILED": "check sasl.username and sasl.password",
    "_AUTHENTICATION": "check sasl.username and sasl.password",
    "TOPIC_EXCEPTION": "the broker refused the topic name",
}


# The cluster did not answer in time or at all: nothing is wrong with the event itself.
_TRANSIENT = frozenset(
    {
        "_MSG_TIMED_OUT",
        "_TIMED_OUT",
        "_TRANSPORT",
        "_ALL_BROKERS_DOWN",
        "REQUEST_TIMED_OUT",
        "NETWORK_EXCEPTION",
        "LEADER_NOT_AVAILABLE",
        "NOT_LEADER_FOR_PARTITION",
        "NOT_ENOUGH_REPLICAS",
        "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
        "PRODUCER_FENCED",
        "_FENCED",
        # Purged unsent or unconfirmed when a producer was closed or replaced: the broker was
        # never asked, or never answered, so the event is not to blame.
        "_PURGE_QUEUE",
        "_PURGE_INFLIGHT",
    }
)


def _outcome(topic: str, err: KafkaError) -> _Outcome:
    name = err.name()
    refused = name in _REFUSED_THE_RELAY
    permanent = not refused and (
        name not in _RETRIABLE_ANYWAY and (name in _PERMANENT or name.startswith(("INVALID_", "_INVALID")))
    )
    hint = _HINTS.get(name)
    detail = f"{err.str()} ({name})" + (f": {hint}" if hint else "")
    return _Outcome(
        Failure(
            f"kafka topic {topic!r}: {scrubber.scrub(detail)}",
            permanent=permanent,
            transient=refused or name in _TRANSIENT,
            setup=refused,
        ),
        producer_broken=name in _PRODUCER_BROKEN or err.fatal(),
    )


class _LibrdkafkaLog:
    """Receives librdkafka's own log lines (instead of raw stderr) and forwards them to structlog."""

    def __init__(self, log: Any) -> None:
        self._log = log

    def log(self, level: int, fmt: str, *args: object) -> None:
        text = scrubber.scrub(fmt % args if args else fmt)
        # confluent-kafka maps syslog levels to logging levels: 10 debug ... 50 critical.
        if level >= 30:
            self._log.warning("librdkafka", detail=text)
        elif level >= 20:
            self._log.info("librdkafka", detail=text)
        else:
            self._log.debug("librdkafka", detail=text)


class _Deliveries:
    """The delivery reports of one publish call, as (index of the event, error or None).

    Whichever thread polls the producer runs the callbacks; list.append is atomic under the GIL,
    so reports served by the event loop and by the idle poll thread never lose one another."""

    __slots__ = ("reports",)

    def __init__(self) -> None:
        self.reports: list[tuple[int, KafkaError | None]] = []

    def report(self, index: int, err: KafkaError | None, _message: Message) -> None:
        self.reports.append((index, err))


class _ProducerHandle:
    """One librdkafka producer plus a thread that polls it while no publish call does.

    Publish calls serve their own delivery reports from the event loop (`serve`): a report
    served by another thread has to take the GIL from the busy event loop once per message, and
    that hand-over costs more than the report itself. The thread polls only while no call is
    waiting (for error and log callbacks, and reports of calls that gave up), and on `retire()`
    turns into a bounded flush; it then purges what is left (reported as failures) and drops
    the producer.
    """

    def __init__(self, settings: Mapping[str, ProducerValue], log: Any) -> None:
        from confluent_kafka import KafkaException, Producer

        self._log = log
        #: Why this producer cannot deliver any more; None while it can.
        self.broken: str | None = None
        #: Publish calls now serving their own reports; only the event loop changes it.
        self.waiting = 0
        #: What produce() raises when librdkafka refuses a message (imported once, not per message).
        self.refusal: type[KafkaException] = KafkaException
        conf: dict[str, Any] = dict(settings)
        conf["error_cb"] = self._on_error
        conf["logger"] = _LibrdkafkaLog(log)
        try:
            self._producer: Producer | None = Producer(conf)
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConnectorError(
                f"kafka producer settings refused: {scrubber.scrub(_kafka_text(exc))}"
            ) from None
        self._retire_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="kafka-sink-poll", daemon=True)
        self._thread.start()

    @property
    def producer(self) -> Producer:
        if self._producer is None or self._retire_at is not None:
            raise ConnectorError("kafka producer is closed")
        return self._producer

    def serve(self) -> None:
        """Run the delivery reports that have arrived, without waiting (from the event loop)."""
        producer = self._producer
        if producer is not None and self._retire_at is None:
            producer.poll(0)

    def retire(self, within: float) -> None:
        """Stop taking messages; deliver what is queued for at most `within` seconds, then purge."""
        if self._retire_at is None:
            self._retire_at = time.monotonic() + within

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    # --- poll thread ---------------------------------------------------------------------------

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.broken = f"{err.name()}: {err.str()}"
            self._log.error("kafka producer failed, replacing it", error=scrubber.scrub(self.broken))
        elif err.name() == "_ALL_BROKERS_DOWN":
            self._log.warning("kafka brokers unreachable", error=scrubber.scrub(err.str()))
        else:
            self._log.debug("kafka client error", error=scrubber.scrub(f"{err.name()}: {err.str()}"))

    def _run(self) -> None:
        producer = self._producer
        assert producer is not None
        try:
            while self._retire_at is None:
                if self.waiting:
                    time.sleep(_IDLE_POLL_S)
                else:
                    producer.poll(_IDLE_POLL_S)
            remaining = self._retire_at - time.monotonic()
            if remaining > 0 and len(producer) > 0:
                # flush() sends at once, without waiting out linger.ms, and serves the reports.
                producer.flush(remaining)
            # What is still queued will not be delivered in time: fail it now rather than never.
            producer.purge()
            producer.poll(0)
        except Exception as exc:  # a bug here must not leave callers waiting silently
            self._log.error("kafka poll thread failed", error=scrubber.scrub(f"{type(exc).__name__}: {exc}"))
            self.broken = f"poll thread failed: {exc}"
        finally:
            self._producer = None


def _kafka_error_of(exc: BaseException) -> KafkaError | None:
    from confluent_kafka import KafkaError

    first = exc.args[0] if exc.args else None
    return first if isinstance(first, KafkaError) else None


def _kafka_text(exc: BaseException) -> str:
    """The KafkaError text inside a KafkaException, else the exception's own text."""
    err = _kafka_error_of(exc)
    if err is not None:
        return f"{err.str()} ({err.name()})"
    return str(exc) or type(exc).__name__


def _partition_order_survives_retries(settings: Mapping[str, ProducerValue]) -> bool:
    """Messages of one partition keep their order across librdkafka's retries only with
    idempotence or one request in flight. (The events of an aggregate share a partition only
    when topic and key are the same for all of them: `keeps_order` needs both.)"""
    in_flight = settings.get("max.in.flight.requests.per.connection", settings.get("max.in.flight", ""))
    return _truthy(settings["enable.idempotence"]) or str(in_flight).strip() == "1"


class KafkaSink(Sink):
    """Contract (on top of `Sink`): `publish` hands every event of the call to librdkafka at once
    and waits, without blocking the event loop, for every delivery report, at most
    delivery_timeout plus a small margin in total. None means a delivery report without error
    (acks=all by default); a Failure names the topic and is `permanent` when resending the same
    bytes to the same topic cannot succeed. `publish` raises only when the sink is not started."""

    kind = "kafka"

    def __init__(self, config: KafkaSinkConfig) -> None:
        self.config = config
        self._settings = config.producer_settings()
        for secret in config.secrets():  # (also when the config did not come from a file)
            scrubber.remember(secret)
        self._log = get_logger(sink="kafka")
        self._handle: _ProducerHandle | None = None
        self._topic = Template(config.topic, "topic")
        self._key = Template(config.key, "key")
        self._valid_topics: set[str] = set()
        self._per_aggregate = (self._topic.fields | self._key.fields) <= _AGGREGATE_FIELDS
        self.keeps_order = _partition_order_survives_retries(self._settings) and self._per_aggregate
        self._wait_bound = config.delivery_timeout + _WAIT_MARGIN_S + 0.1 * config.delivery_timeout
        self._probe_timeout = min(max(config.delivery_timeout, 1.0), _PROBE_TIMEOUT_MAX_S)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the producer and make sure the cluster answers a metadata request."""
        if self._handle is not None and self._handle.broken is None:
            return
        self._replace_handle()
        try:
            assert self._handle is not None
            # Asked twice: see `_probe`.
            await asyncio.to_thread(self._probe, self._handle.producer, 2)
        except BaseException:
            await self._drop_handle()
            raise

    async def check(self) -> None:
        handle = self._handle
        if handle is not None and handle.broken is None:
            await asyncio.to_thread(self._probe, handle.producer)
            return
        probe = _ProducerHandle(self._settings, self._log)
        try:
            await asyncio.to_thread(self._probe, probe.producer)
        finally:
            probe.retire(0)
            await asyncio.to_thread(probe.join, _PROBE_TIMEOUT_MAX_S)

    async def close(self) -> None:
        """Deliver what is queued for at most delivery_timeout, then drop the producer."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        handle.retire(self.config.delivery_timeout)
        await asyncio.to_thread(handle.join, self._wait_bound)

    async def discard(self) -> None:
        """Purge what librdkafka still queues (sent after the lease was lost, it would reach
        the topic after the new holder's newer events), then drop the producer."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        handle.retire(0)
        await asyncio.to_thread(handle.join, self._wait_bound)

    def describe(self) -> dict[str, object]:
        return {
            "bootstrap_servers": self.config.bootstrap_servers,
            "topic": self.config.topic,
            "key": self.config.key,
            "format": self.config.format,
            "delivery_timeout": self.config.delivery_timeout,
            "producer": {k: (MASK if is_secret_key(k) else v) for k, v in sorted(self._settings.items())},
        }

    # --- publish -------------------------------------------------------------------------------

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        if not events:
            return []
        if self._handle is None:
            raise ConnectorError("kafka sink is not started")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_bound
        results: list[PublishResult] = [None] * len(events)
        todo = list(range(len(events)))
        # One extra round for events refused because the producer went bad (fenced): a fresh
        # producer gets a new producer id and usually delivers them within the same call.
        for _round in range(2):
            retry = await self._publish_round(events, todo, results, deadline)
            if not retry or loop.time() >= deadline:
                break
            todo = retry
        return results

    async def _publish_round(
        self,
        events: Sequence[OutboxEvent],
        indexes: list[int],
        results: list[PublishResult],
        deadline: float,
    ) -> list[int]:
        """Produce `indexes`, fill in their results; return those to retry on a new producer."""
        handle = self._usable_handle()
        deliveries = _Deliveries()
        queued: dict[int, str] = {}  # event index -> topic, of the messages librdkafka took
        retry: list[int] = []
        # The loop runs once per event: what it needs is looked up once per call.
        render_topic, render_key, report = self._topic.render, self._key.render, deliveries.report
        valid_topics, cloudevents = self._valid_topics, self.config.format == "cloudevents"
        # A call carries runs of events of one aggregate; when topic and key depend only on the
        # aggregate, a run renders them once.
        per_aggregate = self._per_aggregate
        run: tuple[str, str | None, str, str] | None = None  # aggregate type and id, topic, key
        handle.waiting += 1
        try:
            for index in indexes:
                event = events[index]
                if run is not None and run[1] == event.aggregate_id and run[0] == event.aggregate_type:
                    topic, key = run[2], run[3]
                else:
                    topic = render_topic(event)
                    if topic not in valid_topics and (invalid := self._check_topic(topic)) is not None:
                        results[index] = invalid
                        continue
                    key = render_key(event)
                    if per_aggregate:
                        run = (event.aggregate_type, event.aggregate_id, topic, key)
                # librdkafka takes str keys and header values (as UTF-8), and headers as a dict.
                headers = self._cloudevents_headers(event) if cloudevents else event.standard_headers()
                on_delivery = partial(report, index)
                message = (handle, topic, event.payload, key, headers, on_delivery)
                try:
                    outcome = self._try_produce(*message)
                except BufferError:
                    attempt = partial(self._try_produce, *message)
                    outcome = await self._produce_when_room(handle, attempt, topic, deadline)
                if outcome is None:
                    queued[index] = topic
                    continue
                results[index] = outcome.result
                if outcome.producer_broken:
                    retry.append(index)
            await self._serve_reports(handle, deliveries, len(queued), deadline)
        finally:
            handle.waiting -= 1
        for index, err in list(deliveries.reports):
            topic = queued.pop(index)
            if err is None:
                results[index] = None  # (it may hold the failure of an earlier round)
                continue
            outcome = _outcome(topic, err)
            results[index] = outcome.result
            if outcome.producer_broken:
                if handle.broken is None:
                    handle.broken = outcome.result.reason if outcome.result else err.name()
                retry.append(index)
        for index, topic in queued.items():  # no report in time
            results[index] = Failure(
                f"kafka topic {topic!r}: no delivery report within "
                f"{self._wait_bound:.1f}s (delivery_timeout {self.config.delivery_timeout:g}s)",
                transient=True,
            )
        if retry:
            self._log.warning(
                "kafka producer can no longer deliver, replacing it",
                reason=scrubber.scrub(handle.broken or "unknown"),
                events=len(retry),
            )
        return sorted(retry)

    @staticmethod
    async def _serve_reports(
        handle: _ProducerHandle, deliveries: _Deliveries, expected: int, deadline: float
    ) -> None:
        """Serve delivery reports from the event loop until `expected` of them are in (or the
        deadline passes), pausing briefly between rounds so librdkafka's threads get the CPU."""
        loop = asyncio.get_running_loop()
        pause = _SERVE_PAUSE_MIN_S
        while True:
            handle.serve()
            if len(deliveries.reports) >= expected or loop.time() >= deadline:
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, _SERVE_PAUSE_MAX_S)

    def _try_produce(
        self,
        handle: _ProducerHandle,
        topic: str,
        value: bytes,
        key: str,
        headers: dict[str, str],
        on_delivery: Callable[[KafkaError | None, Message], None],
    ) -> _Outcome | None:
        """Queue one message; None when queued, else why it was not. Raises BufferError when
        librdkafka's queue is full."""
        try:
            # (A dict of str is what produce() takes; its stub wants the wider value type.)
            wide = cast("dict[str, str | bytes | None]", headers)
            handle.producer.produce(topic, value=value, key=key, headers=wide, on_delivery=on_delivery)
            return None
        except handle.refusal as exc:
            err = _kafka_error_of(exc)
            if err is None:
                return _Outcome(Failure(f"kafka topic {topic!r}: {scrubber.scrub(_kafka_text(exc))}"))
            outcome = _outcome(topic, err)
            if outcome.producer_broken and handle.broken is None:
                handle.broken = err.name()
            return outcome
        except ConnectorError as exc:  # a concurrent call retired this producer
            return _Outcome(Failure(f"kafka topic {topic!r}: {exc}", transient=True), producer_broken=True)

    @staticmethod
    async def _produce_when_room(
        handle: _ProducerHandle, attempt: Callable[[], _Outcome | None], topic: str, deadline: float
    ) -> _Outcome | None:
        """Repeat `attempt` (a `_try_produce`) until librdkafka's queue takes the message."""
        loop = asyncio.get_running_loop()
        while True:
            # The queue (queue.buffering.max.*) is full; it drains as delivery reports are
            # served, so serve them and yield instead of blocking the event loop.
            if loop.time() >= deadline:
                return _Outcome(
                    Failure(
                        f"kafka topic {topic!r}: local producer queue stayed full until the deadline",
                        transient=True,
                    )
                )
            handle.serve()
            await asyncio.sleep(_QUEUE_FULL_PAUSE_S)
            with suppress(BufferError):
                return attempt()

    def _check_topic(self, topic: str) -> Failure | None:
        """None when `topic` is a valid Kafka topic name (and remember it), else why not."""
        if not _TOPIC_NAME.match(topic) or topic in (".", ".."):
            return Failure(
                f"kafka topic {topic!r} (from template {self.config.topic!r}) is not a valid topic "
                "name: 1-249 letters, digits, '.', '_', '-'",
                permanent=True,
            )
        if len(self._valid_topics) >= _VALID_TOPICS_KEPT:
            self._valid_topics.clear()
        self._valid_topics.add(topic)
        return None

    @staticmethod
    def _cloudevents_headers(event: OutboxEvent) -> dict[str, str]:
        """CloudEvents Kafka protocol binding, binary mode: `ce_` headers; the payload stays the body."""
        created_at = event.created_at_iso
        headers = event.standard_headers(created_at)
        headers.update(
            {
                "ce_specversion": "1.0",
                "ce_id": event.event_id,
                "ce_source": f"/outbox-relay/{event.aggregate_type}",
                "ce_type": event.event_type,
                "ce_time": created_at,
                "ce_subject": "" if event.aggregate_id is None else event.aggregate_id,
                "content-type": event.content_type,
            }
        )
        return headers

    # --- helpers -------------------------------------------------------------------------------

    def _usable_handle(self) -> _ProducerHandle:
        handle = self._handle
        if handle is None:
            raise ConnectorError("kafka sink is not started")
        if handle.broken is not None:
            self._replace_handle()
            assert self._handle is not None
            return self._handle
        return handle

    def _replace_handle(self) -> None:
        old = self._handle
        self._handle = _ProducerHandle(self._settings, self._log)
        if old is not None:
            # Its in-flight messages may still be acknowledged; their callers are waiting.
            old.retire(self.config.delivery_timeout)

    async def _drop_handle(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.retire(0)
            await asyncio.to_thread(handle.join, _PROBE_TIMEOUT_MAX_S)

    def _probe(self, producer: Producer, requests: int = 1) -> None:
        """Blocking: `requests` metadata requests, each bounded by the probe timeout.

        `start` asks twice: librdkafka answers the first request from a bootstrap connection,
        which it then drops, and the second connects to a broker the cluster advertised. An
        idempotent producer obtains its producer id only from such a broker, and when none is
        up at its creation it waits for a 500 ms retry timer (1 s now and then). Connected
        during start-up, the producer has its id about 50 ms later: measured here, 12 of 12
        starts instead of 10 of 12 with one request and 0 of 12 with none."""
        from confluent_kafka import KafkaException

        where = f"kafka at {self.config.bootstrap_servers}"
        for _request in range(requests):
            try:
                metadata = producer.list_topics(timeout=self._probe_timeout)
            except KafkaException as exc:
                reason = scrubber.scrub(_kafka_text(exc))
                within = f"within {self._probe_timeout:g}s"
                raise ConnectorError(f"{where} did not answer {within}: {reason}") from None
            if not metadata.brokers:
                raise ConnectorError(f"{where} answered without any broker in its metadata")


class KafkaReader(DeliveryReader):
    """Reads the sink's topics from the beginning of every partition, by explicit assignment (no
    consumer group to join, nothing committed); topics that do not exist yet are assigned as
    soon as they appear."""

    def __init__(self, config: KafkaSinkConfig) -> None:
        self._config = config
        self._topics: set[str] = set()
        self._assigned: set[str] = set()
        self._consumer: Any = None

    async def start(self, fields: Sequence[dict[str, str]]) -> None:
        from confluent_kafka import Consumer

        self._topics = {self._config.topic.format_map(f) for f in fields}
        # Connection and security settings apply to a consumer too; producer tuning does not.
        shared = {
            k: v
            for k, v in self._config.producer_settings().items()
            if k.startswith(("security.", "sasl.", "ssl.", "bootstrap."))
        }
        self._consumer = Consumer(
            {**shared, "group.id": f"outbox-relay-drill-{time.time_ns()}", "enable.auto.commit": False}
        )
        await asyncio.to_thread(self._assign_new)

    def _assign_new(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        missing = self._topics - self._assigned
        if not missing:
            return
        metadata = self._consumer.list_topics(timeout=5)
        partitions = []
        for topic in missing:
            found = metadata.topics.get(topic)
            if found is None or found.error is not None or not found.partitions:
                continue
            partitions += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in found.partitions]
            self._assigned.add(topic)
        if partitions:
            self._consumer.incremental_assign(partitions)

    def _consume(self) -> list[Delivered]:
        self._assign_new()
        delivered: list[Delivered] = []
        for message in self._consumer.consume(num_messages=10_000, timeout=0.2):
            if message.error() is not None:
                continue
            headers = {name: (value or b"").decode() for name, value in message.headers() or []}
            delivered.append(Delivered(headers, time.time()))
        return delivered

    async def poll(self) -> list[Delivered]:
        return await asyncio.to_thread(self._consume)

    async def close(self) -> None:
        if self._consumer is not None:
            await asyncio.to_thread(self._consumer.close)
            self._consumer = None


plugin = SinkPlugin(
    type="kafka",
    config=KafkaSinkConfig,
    factory=KafkaSink,
    requires=("confluent_kafka",),
    extra="kafka",
    reader=KafkaReader,
    validate=validate_offline,
)
