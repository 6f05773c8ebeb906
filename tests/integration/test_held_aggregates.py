"""Held aggregates: an aggregate whose first event the broker keeps refusing waits in the
dead-letter table, in order, instead of in memory, so the source advances (the replication slot
is confirmed past it) and every other aggregate flows; its events go out in order once the
first one goes through or is purged. Real PostgreSQL; a real Kafka where the refusal is real."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from outbox_relay.assembly import build_source
from outbox_relay.config import parse_config
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import ConnectorError, Sink, SinkFeatures
from outbox_relay.outbox import write_event
from outbox_relay.runner import set_up_database
from tests.conftest import consume_event_ids, kafka_headers, run_cli
from tests.harness.kafka import KafkaBroker
from tests.support import (
    dead_letters,
    pipeline_with_sink,
    relay_config,
    run_relay_until,
    slot_confirmed,
    wal_insert_position,
    write_config,
)


def _logical(config: dict[str, Any], dsn: str) -> dict[str, Any]:
    config["outboxes"][0]["source"] = {"type": "postgres-logical", "dsn": dsn, "poll_interval": "100ms"}
    return config


async def _init_db(config: dict[str, Any]) -> None:
    outbox = parse_config(config, "t.yaml", {}).outboxes[0]
    await set_up_database(outbox, build_source(outbox, 0))


def _insert_others(dsn: str, count: int, aggregates: int) -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)"
            " SELECT 'order', 'other-' || (i %% %s), 'Updated', jsonb_build_object('i', i)"
            " FROM generate_series(1, %s) AS i RETURNING event_id::text",
            (aggregates, count),
        ).fetchall()
    return {row[0] for row in rows}


def _held(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT event_id, state FROM outbox_relay_dead_letters ORDER BY position"
        ).fetchall()
    return [(row[0], row[1]) for row in rows]


async def test_block_holds_a_refused_aggregate_in_the_store_so_the_slot_advances_and_purging_releases_it(
    dsn: str, kafka: KafkaBroker, tmp_path: Path
) -> None:
    topic = f"held-{uuid.uuid4().hex[:8]}"
    sink = {
        "type": "kafka",
        "bootstrap_servers": kafka.bootstrap_servers,
        "topic": topic,
        "producer": {"message.max.bytes": 100_000},
    }
    config = _logical(relay_config(dsn, sink), dsn)
    config["outboxes"][0]["dead_letter"] = {"on_poison": "block"}
    config["outboxes"][0]["pipeline"] = {"max_in_flight": 500, "stats_interval": "100ms"}
    await _init_db(config)
    with psycopg.connect(dsn, autocommit=True) as conn:
        big = [write_event(conn, "order", "big", "Huge", {"blob": "x" * 200_000})]
        big += [write_event(conn, "order", "big", "After", {"n": n}) for n in (2, 3)]
    others = _insert_others(dsn, 3000, aggregates=100)
    with psycopg.connect(dsn, autocommit=True) as conn:
        big.append(write_event(conn, "order", "big", "After", {"n": 4}))
    written = wal_insert_position(dsn)

    def held_and_confirmed(_: Any) -> bool:
        return len(_held(dsn)) == 4 and slot_confirmed(dsn) >= written

    await run_relay_until(config, held_and_confirmed, timeout=90)
    assert _held(dsn) == [(event_id, "held") for event_id in big]
    delivered = consume_event_ids(kafka, topic, others, timeout=30)
    assert {kafka_headers(m)["event_id"] for m in delivered} == others, "the other aggregates all flowed"

    path = write_config(tmp_path, config)
    status = run_cli("status", "-c", str(path))
    assert "held=4 held_aggregates=1" in status.stdout, status.stdout + status.stderr
    listed = run_cli("dlq", "list", "-c", str(path)).stdout.splitlines()
    assert [line.split()[1] for line in listed] == big
    assert all("state=held" in line for line in listed)
    purge = run_cli("dlq", "purge", "-c", str(path), "--event-id", big[0])
    assert purge.returncode == 0, purge.stderr

    await run_relay_until(config, lambda _: _held(dsn) == [], timeout=60)
    messages = consume_event_ids(kafka, topic, others | set(big[1:]), timeout=30)
    of_big = [kafka_headers(m)["event_id"] for m in messages if kafka_headers(m)["aggregate_id"] == "big"]
    assert of_big == big[1:], "released in order, once each"


class _RefusesUntil(Sink):
    """Refuses events whose payload has `"poison": true` (a broker's refusal) until `accept` is
    set; records what it delivered, in order."""

    kind = "test"

    def __init__(self, *, transient: bool = False) -> None:
        self.accept = False
        self.transient = transient
        self.delivered: list[OutboxEvent] = []

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        results: list[PublishResult] = []
        for event in events:
            if b'"poison": true' in event.payload and not self.accept:
                results.append(Failure("refused", transient=self.transient))
            else:
                self.delivered.append(event)
                results.append(None)
        await asyncio.sleep(0)
        return results


async def test_held_events_survive_a_restart_and_go_out_in_order_with_the_ones_written_meanwhile(
    dsn: str,
) -> None:
    config = relay_config(dsn, {"type": "stdout"})
    config["outboxes"][0]["dead_letter"] = {"on_poison": "block", "after_attempts": 2}
    config["outboxes"][0]["retry"] = {"initial": "20ms", "max": "100ms"}
    with psycopg.connect(dsn, autocommit=True) as conn:
        x = [write_event(conn, "order", "x", "Poison", {"poison": True})]
        x.append(write_event(conn, "order", "x", "After", {"n": 2}))
    first = _RefusesUntil()
    await run_relay_until(
        config, lambda _: len(_held(dsn)) == 2, pipelines=[pipeline_with_sink(config, first)]
    )
    with psycopg.connect(dsn, autocommit=True) as conn:  # written while no relay runs
        x.append(write_event(conn, "order", "x", "After", {"n": 3}))
    second = _RefusesUntil()
    second.accept = True
    written_while_running: list[str] = []

    def all_out(relay: Any) -> bool:
        if not written_while_running and len(second.delivered) >= 1:
            with psycopg.connect(dsn, autocommit=True) as conn:
                written_while_running.append(write_event(conn, "order", "x", "After", {"n": 4}))
        return len(second.delivered) >= 4 and _held(dsn) == []

    await run_relay_until(config, all_out, pipelines=[pipeline_with_sink(config, second)])
    assert [e.event_id for e in second.delivered] == x + written_while_running
    assert await dead_letters(dsn) == []


async def test_an_aggregate_that_keeps_failing_is_held_when_it_pins_the_slot_and_the_others_flow(
    dsn: str,
) -> None:
    """dead_letter mode, a per-event failure that is not the broker's refusal (transient: it
    never counts toward dead-lettering): the logical source cannot confirm past it, and the
    window fills with confirmed-later events. The aggregate is held; everything else flows."""
    config = _logical(relay_config(dsn, {"type": "stdout"}), dsn)
    config["outboxes"][0]["pipeline"] = {"max_in_flight": 200}
    config["outboxes"][0]["retry"] = {"initial": "50ms", "max": "200ms"}
    await _init_db(config)
    with psycopg.connect(dsn, autocommit=True) as conn:
        poison = write_event(conn, "order", "x", "Poison", {"poison": True})
    others = _insert_others(dsn, 3000, aggregates=50)
    written = wal_insert_position(dsn)
    sink = _RefusesUntil(transient=True)
    started = time.monotonic()

    def others_out(_: Any) -> bool:
        return {e.event_id for e in sink.delivered} >= others and slot_confirmed(dsn) >= written

    await run_relay_until(config, others_out, pipelines=[pipeline_with_sink(config, sink)], timeout=60)
    assert time.monotonic() - started < 60
    assert _held(dsn) == [(poison, "held")]


class _RefusesAggregate(Sink):
    """Fails the events of one aggregate (per event, "try again later") until `accept` is set;
    records every delivery."""

    kind = "test"

    def __init__(self, aggregate: str) -> None:
        self.aggregate, self.accept = aggregate, False
        self.delivered: list[str] = []

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        results: list[PublishResult] = []
        for event in events:
            if event.aggregate_id == self.aggregate and not self.accept:
                results.append(Failure("try again later", transient=True))
            else:
                self.delivered.append(event.event_id)
                results.append(None)
        await asyncio.sleep(0)
        return results


async def test_a_crash_behind_a_failing_aggregate_sends_again_at_most_the_window_and_one_transaction(
    dsn: str,
) -> None:
    """Logical replication confirms a transaction only once all its events and every earlier
    one were acknowledged. Here every transaction has an event of an aggregate the broker keeps
    failing, so without counting acknowledged-but-unconfirmed events in the window, everything
    after its first event would be sent again after a crash."""
    window, per_transaction = 300, 20
    config = _logical(relay_config(dsn, {"type": "stdout"}), dsn)
    config["outboxes"][0]["pipeline"] = {"max_in_flight": window}
    await _init_db(config)
    expected: set[str] = set()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for t in range(200):
            rows = conn.execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)"
                " SELECT 'order', CASE WHEN i = 1 THEN 'failing' ELSE 'ok-' || (i %% 37) END, 'Updated',"
                " jsonb_build_object('t', %s::int, 'i', i) FROM generate_series(1, %s) AS i"
                " RETURNING event_id::text",
                (t, per_transaction),
            ).fetchall()
            expected.update(row[0] for row in rows)
    sink = _RefusesAggregate("failing")
    pipeline = pipeline_with_sink(config, sink)
    stop, crash = asyncio.Event(), asyncio.Event()
    run = asyncio.create_task(pipeline.run(stop, abandon=crash))
    deadline = time.monotonic() + 60
    while len(sink.delivered) < 3000:  # (3,800 events of the other aggregates in all)
        assert time.monotonic() < deadline, "no progress"
        assert not run.done(), "no progress"
        await asyncio.sleep(0.01)
    crash.set()  # as a kill: nothing more is acknowledged or confirmed
    assert await run is False
    before = len(sink.delivered)

    sink.accept = True
    await run_relay_until(
        config,
        lambda _: set(sink.delivered) >= expected,
        pipelines=[pipeline_with_sink(config, sink)],
        timeout=60,
    )
    again = len(sink.delivered[before:]) - len(set(sink.delivered[before:]) - set(sink.delivered[:before]))
    assert again <= window + per_transaction, f"{again} events were sent again"


async def test_a_long_held_aggregate_is_released_in_order_in_calls_of_several_events(dsn: str) -> None:
    config = _logical(relay_config(dsn, {"type": "stdout"}), dsn)
    config["outboxes"][0]["pipeline"] = {"max_in_flight": 200}
    config["outboxes"][0]["retry"] = {"initial": "20ms", "max": "100ms"}
    await _init_db(config)
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)"
            " SELECT 'order', CASE WHEN i % 2 = 0 THEN 'x' ELSE 'other-' || (i % 31) END, 'E',"
            " jsonb_build_object('i', i) FROM generate_series(1, 4000) AS i"
            " RETURNING event_id::text, aggregate_id"
        ).fetchall()
    of_x = [event_id for event_id, aggregate in rows if aggregate == "x"]
    sink = _RefusesAggregate("x")
    sink.features = SinkFeatures(keeps_order=True)
    pipeline = pipeline_with_sink(config, sink)
    calls: list[int] = []
    publish = sink.publish

    async def counting(events: Sequence[OutboxEvent]) -> list[PublishResult]:
        if sink.accept and events and events[0].aggregate_id == "x":
            calls.append(len(events))
        return await publish(events)

    sink.publish = counting  # type: ignore[method-assign]

    def x_held_then_accepted(_: Any) -> bool:
        if not sink.accept and len(_held(dsn)) >= 1000:
            sink.accept = True
        return sink.accept and _held(dsn) == [] and set(of_x) <= set(sink.delivered)

    await run_relay_until(config, x_held_then_accepted, pipelines=[pipeline], timeout=90)
    delivered_x = [event_id for event_id in dict.fromkeys(sink.delivered) if event_id in set(of_x)]
    assert delivered_x == of_x, "released in commit order"
    assert max(calls) > 1, "several held events per call to an order-keeping sink"


class _Outage(Sink):
    """Raises for every call (the broker as a whole is away) until `up` is set."""

    kind = "test"

    def __init__(self) -> None:
        self.up = False
        self.delivered: list[str] = []

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        await asyncio.sleep(0)
        if not self.up:
            raise ConnectorError("the broker does not answer")
        self.delivered.extend(e.event_id for e in events)
        return [None] * len(events)


async def test_an_outage_that_fills_the_window_holds_nothing(dsn: str) -> None:
    """Only an aggregate that fails while the broker takes others is held: in an outage nothing
    goes through, and moving the whole window to the dead-letter table would gain nothing."""
    config = relay_config(dsn, {"type": "stdout"})
    config["outboxes"][0]["pipeline"] = {"max_in_flight": 100}
    config["outboxes"][0]["retry"] = {"initial": "10ms", "max": "50ms"}
    expected = _insert_others(dsn, 500, aggregates=20)
    sink = _Outage()
    started = time.monotonic()

    def outage_then_up(relay: Any) -> bool:
        if not sink.up and time.monotonic() - started > 3:
            assert relay.pipelines[0].held >= 100, "the window filled during the outage"
            assert _held(dsn) == [], "an outage held aggregates"
            sink.up = True
        return set(sink.delivered) >= expected

    await run_relay_until(config, outage_then_up, pipelines=[pipeline_with_sink(config, sink)], timeout=60)
    assert _held(dsn) == []
