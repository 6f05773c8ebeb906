"""How the Kafka sink reads librdkafka's per-message errors: pure classification, no broker."""

from __future__ import annotations

import pytest

pytest.importorskip("confluent_kafka")

from confluent_kafka import KafkaError

from outbox_relay.connectors.sinks.kafka.outcomes import classify
from outbox_relay.events import Failure


def _failure(code: int) -> tuple[Failure, bool]:
    outcome = classify("outbox.orders", KafkaError(code))
    assert isinstance(outcome.result, Failure)
    return outcome.result, outcome.producer_broken


@pytest.mark.parametrize("code", [KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT])
def test_messages_purged_when_a_producer_closes_are_transient_so_they_never_count_toward_dead_lettering(
    code: int,
) -> None:
    failure, _ = _failure(code)
    assert failure.transient
    assert not failure.permanent
    assert "outbox.orders" in failure.reason


def test_a_timed_out_delivery_is_transient_and_an_oversized_message_is_permanent() -> None:
    timed_out, _ = _failure(KafkaError._MSG_TIMED_OUT)
    assert timed_out.transient
    assert not timed_out.permanent
    too_large, _ = _failure(KafkaError.MSG_SIZE_TOO_LARGE)
    assert too_large.permanent
    assert not too_large.transient
    assert "message.max.bytes" in too_large.reason


def test_a_fenced_producer_is_replaced_and_the_event_is_not_blamed() -> None:
    failure, broken = _failure(KafkaError._FENCED)
    assert broken
    assert not failure.permanent


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError._AUTHENTICATION,
    ],
)
def test_an_authorization_or_sasl_refusal_is_a_setup_failure_that_never_dead_letters_the_event(
    code: int,
) -> None:
    failure, _ = _failure(code)
    assert failure.setup
    assert failure.transient
    assert not failure.permanent
    assert "outbox.orders" in failure.reason
    assert KafkaError(code).name() in failure.reason


def test_a_topic_authorization_failure_says_what_the_principal_lacks() -> None:
    failure, _ = _failure(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    assert "may not write to the topic" in failure.reason
    sasl, _ = _failure(KafkaError.SASL_AUTHENTICATION_FAILED)
    assert "sasl.username" in sasl.reason
