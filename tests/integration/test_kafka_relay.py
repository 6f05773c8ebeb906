"""The relay as an operator runs it (`python -m relay run`, a subprocess) between a real PostgreSQL
and a real Kafka-protocol broker (tansu, or KAFKA_BOOTSTRAP_SERVERS): what arrives on the topic, in
which order, and what gets marked published, also across a hung broker and a kill -9 of the relay.

Messages are read back by partition, in offset order. Every aggregate id is a message key and a
key always lands on one partition, so per-aggregate order is the order within that partition."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import StartRelay, consume_event_ids, kafka_message_as_line, run_cli
from tests.harness.kafka import KafkaBroker
from tests.support import (
    assert_complete_and_ordered,
    event_ids,
    insert_events,
    marked_ids,
    relay_config,
    stop_relay,
    unpublished,
    wait_for,
    write_config,
)

pytest.importorskip("confluent_kafka")

PARTITIONS = 4


def _config(tmp_path: Path, dsn: str, kafka: KafkaBroker, **producer: Any) -> tuple[Path, str]:
    """A relay.yaml relaying to a fresh topic of PARTITIONS partitions; returns (path, topic)."""
    prefix = f"relay-{uuid.uuid4().hex[:12]}"
    sink = kafka.order_sink(
        prefix,
        partitions=PARTITIONS,
        key="{aggregate_id}",
        # Short, so that events waiting on a hung broker fail and are retried within the test.
        delivery_timeout="2s",
        producer=producer,
    )
    config = relay_config(dsn, sink, batch_size=200)
    config["outboxes"][0]["pipeline"] = {"publish_batch_size": 100}
    return write_config(tmp_path, config), f"{prefix}.order"


def _consume(kafka: KafkaBroker, topic: str, wanted: set[str], timeout: float = 20.0) -> list[dict[str, Any]]:
    """Every message on the topic as a file-sink-like dict, by (partition, offset), read until all
    `wanted` event ids are there (duplicates included) or the timeout passes."""
    messages = consume_event_ids(kafka, topic, wanted, timeout, least_wait=1.0)
    return [kafka_message_as_line(m) | {"key": m["key"], "partition": m["partition"]} for m in messages]


def _assert_one_partition_per_aggregate(lines: list[dict[str, Any]]) -> None:
    partitions: dict[str, set[int]] = {}
    for line in lines:
        assert line["key"] == line["aggregate_id"].encode(), "the message key is the aggregate id"
        partitions.setdefault(line["aggregate_id"], set()).add(line["partition"])
    assert all(len(p) == 1 for p in partitions.values()), partitions
    assert len({p for ps in partitions.values() for p in ps}) > 1, "one partition in all proves little"


def test_every_event_arrives_in_order_and_only_delivered_or_dead_lettered_events_are_marked(
    dsn: str, kafka: KafkaBroker, tmp_path: Path, start_relay: StartRelay
) -> None:
    insert_events(dsn, 3_000, aggregates=30)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Larger than the producer's message.max.bytes below: never delivered, dead-lettered.
        row = conn.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)"
            " VALUES ('order', 'too-big', 'OrderUpdated', jsonb_build_object('blob', repeat('x', 200000)))"
            " RETURNING event_id::text"
        ).fetchone()
        assert row is not None
        too_big = row[0]
        rows = conn.execute("SELECT event_id::text, position, payload FROM outbox").fetchall()
    stored = {event_id: (position, payload) for event_id, position, payload in rows}
    deliverable = set(stored) - {too_big}
    config, topic = _config(tmp_path, dsn, kafka, **{"message.max.bytes": 100_000})

    relay = start_relay(config)
    wait_for(lambda: unpublished(dsn) == 0, 30, "every event to be delivered or dead-lettered")
    lines = _consume(kafka, topic, deliverable)
    stop_relay(relay)

    assert assert_complete_and_ordered(lines, deliverable) == 0
    _assert_one_partition_per_aggregate(lines)
    for line in lines:
        position, payload = stored[line["event_id"]]
        assert line["position"] == position
        assert line["payload"] == payload
        assert line["headers"]["traceparent"] == "00-abc-01"  # the row's own headers, passed through
        assert line["event_type"] == "OrderUpdated"
        assert line["aggregate_type"] == "order"
    assert too_big not in {line["event_id"] for line in lines}
    assert marked_ids(dsn) == deliverable | {too_big}, "marked what was acknowledged or parked"
    with psycopg.connect(dsn) as conn:
        parked = conn.execute("SELECT event_id, permanent FROM outbox_relay_dead_letters").fetchall()
    assert parked == [(too_big, True)]


@pytest.mark.slow
def test_a_broker_hung_mid_run_loses_nothing_keeps_per_aggregate_order_and_everything_gets_marked(
    dsn: str, controlled_kafka: KafkaBroker, tmp_path: Path, start_relay: StartRelay
) -> None:
    kafka = controlled_kafka
    total = 30_000
    insert_events(dsn, total, aggregates=100)
    expected = event_ids(dsn)
    config, topic = _config(tmp_path, dsn, kafka)

    relay = start_relay(config)
    wait_for(lambda: unpublished(dsn) < total - 2_000, 30, "the first events to be marked")
    kafka.pause()
    try:
        # A publish call under way when the broker stopped returns once all of its events are
        # settled: it may still mark events acknowledged just before the pause, but only within
        # the sink's wait bound (delivery_timeout 2s + margin). After that nothing may be marked.
        time.sleep(5.0)
        during_pause = unpublished(dsn)
        time.sleep(2.0)  # meanwhile publishes fail, are retried and fail again
        assert unpublished(dsn) == during_pause, "events were marked while the broker answered nothing"
    finally:
        kafka.resume()
    assert during_pause > 0, "the pause happened mid-run"
    wait_for(lambda: unpublished(dsn) == 0, 40, "every event to be marked after the broker resumed")
    stop_relay(relay)

    lines = _consume(kafka, topic, expected)
    duplicates = assert_complete_and_ordered(lines, expected)
    _assert_one_partition_per_aggregate(lines)
    assert duplicates <= 10_000, "repeats are bounded by pipeline.max_in_flight"


@pytest.mark.slow
def test_a_relay_killed_mid_run_then_drained_loses_nothing_and_keeps_per_aggregate_order(
    dsn: str, kafka: KafkaBroker, tmp_path: Path, start_relay: StartRelay
) -> None:
    total = 40_000
    insert_events(dsn, total, aggregates=200)
    expected = event_ids(dsn)
    config, topic = _config(tmp_path, dsn, kafka)

    relay = start_relay(config)
    wait_for(lambda: unpublished(dsn) < total - 5_000, 30, "the first events to be marked")
    os.kill(relay.pid, signal.SIGKILL)
    assert relay.wait(timeout=10) == -signal.SIGKILL
    assert 0 < unpublished(dsn) < total, "the kill happened mid-run"

    result = run_cli("run", "-c", str(config), "--drain", timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert unpublished(dsn) == 0

    lines = _consume(kafka, topic, expected)
    duplicates = assert_complete_and_ordered(lines, expected)
    _assert_one_partition_per_aggregate(lines)
    assert duplicates <= 10_000, "repeats are bounded by pipeline.max_in_flight"
