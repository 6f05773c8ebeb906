"""The relay as an operator runs it (`python -m relay run`, a subprocess) between a real PostgreSQL
and a real RabbitMQ broker: what arrives in the queues, in which order, and what gets marked
published, also through a consistent-hash exchange, with unroutable events, across a broker restart
and across a kill -9 of the relay.

The broker is a private node of this module (or RELAY_TEST_AMQP_URL; the system node only when no
private node can be booted): restarting it then disturbs nobody else's tests, and its
consistent-hash plugin is enabled from the first boot. Every test uses
its own exchange and queues and deletes them afterwards. Messages are read back in queue order, so
per-aggregate order is the order within the queue."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest

pytest.importorskip("pika")

from tests.conftest import (
    RabbitNames,
    StartRelay,
    private_rabbitmq,
    rabbit_delivered,
    rabbit_names,
    require_control,
    run_cli,
)
from tests.harness.rabbitmq import (
    BrokerControlUnavailable,
    RabbitBroker,
    declare_queue,
    drain_queue,
    queue_depth,
)
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

MAX_IN_FLIGHT = 10_000  # pipeline.max_in_flight default: the bound on repeats after a failure


@pytest.fixture(scope="module")
def rabbit() -> Iterator[RabbitBroker]:
    yield from private_rabbitmq()


@pytest.fixture
def names(rabbit: RabbitBroker) -> Iterator[RabbitNames]:
    yield from rabbit_names(rabbit.url)


def _config(
    tmp_path: Path,
    dsn: str,
    rabbit: RabbitBroker,
    names: RabbitNames,
    *,
    on_poison: str | None = None,
    **sink: Any,
) -> Path:
    """A relay.yaml relaying to the test's exchange. `on_poison: block` keeps retrying an event the
    broker refuses instead of parking it in the dead-letter table after a few attempts."""
    settings = {
        "type": "rabbitmq",
        "url": rabbit.url,
        "exchange": names.exchange,
        # Short, so that a broken broker costs seconds of test time, not the default 30.
        "confirm_timeout": "5s",
        "connect_timeout": "3s",
        **sink,
    }
    config = relay_config(dsn, settings)
    if on_poison is not None:
        config["outboxes"][0]["dead_letter"] = {"on_poison": on_poison}
    return write_config(tmp_path, config)


def _logs(tmp_path: Path) -> str:
    return "\n".join(path.read_text(errors="replace") for path in sorted(tmp_path.glob("relay-*.log")))


def _progressed(dsn: str, below: int) -> bool:
    return unpublished(dsn) < below


def _dead_letters(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM outbox_relay_dead_letters").fetchone()
        assert row is not None
        return int(row[0])


def _ids_of(dsn: str, aggregate_type: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        query = "SELECT event_id::text FROM outbox WHERE aggregate_type = %s"
        return {r[0] for r in conn.execute(query, (aggregate_type,))}


def _drain(relay: subprocess.Popen[bytes], tmp_path: Path) -> None:
    try:
        code = relay.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the relay did not drain in time:\n{_logs(tmp_path)[-3000:]}") from None
    assert code == 0, _logs(tmp_path)[-3000:]


def _insert(dsn: str, rows: list[tuple[str, str]]) -> None:
    """One event per (aggregate_type, aggregate_id), in list order, in one transaction."""
    with psycopg.connect(dsn) as conn, conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)"
            " VALUES (%s, %s, 'OrderUpdated', jsonb_build_object('n', 1))",
            rows,
        )


class _Writer:
    """Writes batches of events in a thread, one transaction each, until stopped: the relay then
    works on fresh events before, during and after whatever the test does meanwhile."""

    def __init__(self, dsn: str, batch: int, aggregates: int, pause: float) -> None:
        self._args = (dsn, batch, aggregates, pause)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> _Writer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        dsn, batch, aggregates, pause = self._args
        try:
            while not self._stop.is_set():
                insert_events(dsn, batch, aggregates)
                time.sleep(pause)
        except BaseException as exc:
            self.error = exc


# --- delivery -----------------------------------------------------------------------------------


def test_every_event_arrives_with_body_properties_and_headers_in_order_and_only_confirmed_events_are_marked(
    dsn: str, rabbit: RabbitBroker, names: RabbitNames, tmp_path: Path, start_relay: StartRelay
) -> None:
    insert_events(dsn, 2_000, aggregates=20)
    # The "audit" events go to a queue that refuses every message (length 0, reject-publish):
    # RabbitMQ answers basic.nack, so they are never confirmed and must never be marked (they are
    # retried for ever: on_poison block, not parked as dead letters).
    _insert(dsn, [("audit", f"audit-{i}") for i in range(3)])
    queue, refusing = names.queue(), names.queue("refusing")
    declare_queue(rabbit.url, queue, names.exchange, "order.*", exchange_type="topic")
    declare_queue(
        rabbit.url, refusing, names.exchange, "audit.*", {"x-max-length": 0, "x-overflow": "reject-publish"}
    )
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT event_id::text, position, aggregate_id, payload::text,"
            " extract(epoch from created_at)::float8 FROM outbox WHERE aggregate_type = 'order'"
        ).fetchall()
    stored = {row[0]: row[1:] for row in rows}

    relay = start_relay(_config(tmp_path, dsn, rabbit, names, on_poison="block"))
    wait_for(lambda: unpublished(dsn) == 3, 30, "every order event to be marked")
    messages = drain_queue(rabbit.url, queue, 2_000)
    wait_for(lambda: "basic.nack" in _logs(tmp_path), 10, "the refused events to be reported")
    stop_relay(relay)

    assert assert_complete_and_ordered(rabbit_delivered(messages), set(stored)) == 0
    assert len(messages) == 2_000
    for message in messages:
        event_id = message["properties"]["message_id"]
        position, aggregate_id, payload, created = stored[event_id]
        assert message["body"] == payload.encode(), "the payload bytes, unchanged"
        assert message["exchange"] == names.exchange
        assert message["routing_key"] == "order.OrderUpdated"
        assert message["properties"] == {
            "message_id": event_id,
            "type": "OrderUpdated",
            "timestamp": int(created),
            "content_type": "application/json",
            "delivery_mode": 2,
        }
        assert message["headers"] == {
            "traceparent": "00-abc-01",  # the row's own headers, passed through
            "event_id": event_id,
            "event_type": "OrderUpdated",
            "aggregate_type": "order",
            "aggregate_id": aggregate_id,
            "position": str(position),
            "created_at": datetime.fromtimestamp(created, UTC).isoformat(),
        }
    assert queue_depth(rabbit.url, refusing) == 0
    assert marked_ids(dsn) == set(stored), "marked exactly what the broker confirmed"


def test_through_a_consistent_hash_exchange_each_aggregate_lands_in_one_of_four_queues_in_order(
    dsn: str, rabbit: RabbitBroker, names: RabbitNames, tmp_path: Path, start_relay: StartRelay
) -> None:
    try:
        rabbit.ensure_consistent_hash()
    except BrokerControlUnavailable as exc:
        pytest.skip(str(exc))
    insert_events(dsn, 3_000, aggregates=100)
    expected = event_ids(dsn)
    queues = [names.queue(f"q{i}") for i in range(4)]
    for queue in queues:
        # The binding key is the queue's weight (points on the hash ring).
        declare_queue(rabbit.url, queue, names.exchange, "10", exchange_type="x-consistent-hash")

    # No routing_key: the x-consistent-hash default hashes the aggregate id.
    relay = start_relay(_config(tmp_path, dsn, rabbit, names, exchange_type="x-consistent-hash"), "--drain")
    _drain(relay, tmp_path)
    assert unpublished(dsn) == 0

    queue_of: dict[str, str] = {}
    everything: list[dict[str, Any]] = []
    for queue in queues:
        messages = drain_queue(rabbit.url, queue, queue_depth(rabbit.url, queue), timeout=10)
        delivered = rabbit_delivered(messages)
        assert all(m["routing_key"] == d["aggregate_id"] for m, d in zip(messages, delivered, strict=True))
        for message in delivered:
            assert queue_of.setdefault(message["aggregate_id"], queue) == queue, "an aggregate was split"
        assert assert_complete_and_ordered(delivered, {m["event_id"] for m in delivered}) == 0
        everything += delivered
    assert len(everything) == 3_000
    assert {m["event_id"] for m in everything} == expected
    assert len(queue_of) == 100
    assert len(set(queue_of.values())) == 4, "the aggregates spread over all four queues"


def test_unroutable_events_are_reported_and_not_marked_while_other_aggregates_flow_then_relayed_once_bound(
    dsn: str, rabbit: RabbitBroker, names: RabbitNames, tmp_path: Path, start_relay: StartRelay
) -> None:
    # Interleaved, so that unroutable events sit before, between and after the routable ones.
    _insert(dsn, [("invoice" if i % 4 == 0 else "order", f"agg-{i % 40}") for i in range(2_000)])
    ids = {kind: _ids_of(dsn, kind) for kind in ("order", "invoice")}
    assert len(ids["invoice"]) == 500
    orders = names.queue("orders")
    declare_queue(rabbit.url, orders, names.exchange, "order.*", exchange_type="topic")

    # on_poison block: an unroutable event is retried until a queue is bound for it, never
    # dead-lettered; once it counts as poison, it and the rest of its aggregate wait held (in
    # order) in the dead-letter table, where the relay keeps retrying it.
    relay = start_relay(_config(tmp_path, dsn, rabbit, names, on_poison="block"))
    wait_for(lambda: unpublished(dsn, where="aggregate_type = 'order'") == 0, 30, "the routable events")
    wait_for(lambda: "unroutable" in _logs(tmp_path), 10, "the unroutable events to be reported")
    time.sleep(0.5)  # several retry rounds (retry.max is 200ms)
    assert _waiting_invoices(dsn) == ids["invoice"], "each is waiting: in the outbox, or held"
    assert _dead(dsn) == 0
    delivered = rabbit_delivered(drain_queue(rabbit.url, orders, 1_500))
    assert assert_complete_and_ordered(delivered, ids["order"]) == 0
    assert len(delivered) == 1_500
    log = _logs(tmp_path)
    assert f"no queue bound for routing key 'invoice.OrderUpdated' on exchange '{names.exchange}'" in log

    # They were retried, not dropped: once a queue is bound for them they arrive, in order.
    invoices = names.queue("invoices")
    declare_queue(rabbit.url, invoices, names.exchange, "invoice.*")
    wait_for(lambda: unpublished(dsn) == 0 and _held(dsn) == 0, 30, "the formerly unroutable events")
    delivered = rabbit_delivered(drain_queue(rabbit.url, invoices, 500))
    stop_relay(relay)
    assert assert_complete_and_ordered(delivered, ids["invoice"]) == 0


def _waiting_invoices(dsn: str) -> set[str]:
    """Invoice events not marked published, or held in the dead-letter table."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT event_id::text FROM outbox WHERE aggregate_type = 'invoice' AND published_at IS NULL"
            " UNION SELECT event_id FROM outbox_relay_dead_letters WHERE state = 'held'"
        ).fetchall()
    return {row[0] for row in rows}


def _held(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM outbox_relay_dead_letters WHERE state = 'held'").fetchone()
    return int(row[0]) if row else -1


def _dead(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM outbox_relay_dead_letters WHERE state = 'dead'").fetchone()
    return int(row[0]) if row else -1


# --- failures -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_broker_restart_mid_run_loses_nothing_keeps_per_aggregate_order_and_everything_gets_marked(
    dsn: str, rabbit: RabbitBroker, names: RabbitNames, tmp_path: Path, start_relay: StartRelay
) -> None:
    require_control(rabbit)
    queue = names.queue()
    declare_queue(rabbit.url, queue, names.exchange, "order.*", exchange_type="topic")
    relay = start_relay(_config(tmp_path, dsn, rabbit, names))
    with _Writer(dsn, batch=50, aggregates=100, pause=0.02) as writer:
        wait_for(lambda: len(marked_ids(dsn)) >= 1_000, 30, "the first events to be marked")
        rabbit.stop()
        try:
            # Whatever the broker confirmed before it went down is marked within moments; after
            # that nothing can be confirmed, so nothing more may be marked.
            time.sleep(1.0)
            while_down = len(marked_ids(dsn))
            time.sleep(1.0)
            assert len(marked_ids(dsn)) == while_down, "events were marked while the broker was down"
        finally:
            rabbit.start()
        wait_for(lambda: len(marked_ids(dsn)) > while_down + 1_000, 30, "publishing to resume")
        writer.stop()
    wait_for(lambda: unpublished(dsn) == 0, 30, "every event to be marked after the restart")
    stop_relay(relay)

    expected = event_ids(dsn)
    messages = drain_queue(rabbit.url, queue, len(expected), timeout=20)
    duplicates = assert_complete_and_ordered(rabbit_delivered(messages), expected)
    assert duplicates <= MAX_IN_FLIGHT, "repeats are bounded by pipeline.max_in_flight"
    log = _logs(tmp_path)
    assert "connection to RabbitMQ lost" in log
    assert "broker reachable again" in log
    assert _dead_letters(dsn) == 0, "an outage says nothing about the events: none may be parked"


@pytest.mark.slow
def test_a_relay_killed_mid_run_then_drained_loses_nothing_and_keeps_per_aggregate_order(
    dsn: str, rabbit: RabbitBroker, names: RabbitNames, tmp_path: Path, start_relay: StartRelay
) -> None:
    total = 30_000
    insert_events(dsn, total, aggregates=200)
    expected = event_ids(dsn)
    queue = names.queue()
    declare_queue(rabbit.url, queue, names.exchange, "order.*", exchange_type="topic")
    config = _config(tmp_path, dsn, rabbit, names)

    kills = 0
    for marked in (3_000, 12_000):
        relay = start_relay(config)
        wait_for(partial(_progressed, dsn, total - marked), 30, f"{marked} events to be marked")
        os.kill(relay.pid, signal.SIGKILL)
        assert relay.wait(timeout=10) == -signal.SIGKILL
        kills += 1
    assert 0 < unpublished(dsn) < total, "the kills happened mid-run"

    result = run_cli("run", "-c", str(config), "--drain", timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert unpublished(dsn) == 0

    messages = drain_queue(rabbit.url, queue, total, timeout=20)
    duplicates = assert_complete_and_ordered(rabbit_delivered(messages), expected)
    assert duplicates <= kills * MAX_IN_FLIGHT, "repeats are bounded by pipeline.max_in_flight"
