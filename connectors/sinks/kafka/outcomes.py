"""How the `kafka` sink reads librdkafka's per-message errors: each becomes a `Failure` that says
whether resending can help (`permanent`), whether the event is to blame at all (`transient`,
`setup`) and whether the producer instance itself is done for (`producer_broken`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from outbox_relay.events import Failure, PublishResult
from outbox_relay.secrets import scrubber

if TYPE_CHECKING:
    from confluent_kafka import KafkaError


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one message that did not reach the topic."""

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


def classify(topic: str, err: KafkaError) -> Outcome:
    """The failure of a message to `topic` that librdkafka refused or reported with `err`: its
    reason names the topic, the error and (for the common ones) what to check."""
    name = err.name()
    refused = name in _REFUSED_THE_RELAY
    permanent = not refused and (
        name not in _RETRIABLE_ANYWAY and (name in _PERMANENT or name.startswith(("INVALID_", "_INVALID")))
    )
    hint = _HINTS.get(name)
    detail = f"{err.str()} ({name})" + (f": {hint}" if hint else "")
    return Outcome(
        Failure(
            f"kafka topic {topic!r}: {scrubber.scrub(detail)}",
            permanent=permanent,
            transient=refused or name in _TRANSIENT,
            setup=refused,
        ),
        producer_broken=name in _PRODUCER_BROKEN or err.fatal(),
    )


def kafka_error_of(exc: BaseException) -> KafkaError | None:
    """The KafkaError a KafkaException carries, if any."""
    from confluent_kafka import KafkaError

    first = exc.args[0] if exc.args else None
    return first if isinstance(first, KafkaError) else None


def kafka_text(exc: BaseException) -> str:
    """The KafkaError text inside a KafkaException, else the exception's own text."""
    err = kafka_error_of(exc)
    if err is not None:
        return f"{err.str()} ({err.name()})"
    return str(exc) or type(exc).__name__
