"""The RabbitMQ sink against a real broker (RELAY_TEST_AMQP_URL, the system node on 127.0.0.1:5672,
or a private node). No mocks: every acknowledgement is a real publisher confirm and every
assertion about a queue reads the messages back. Each test uses its own exchange and queues."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import ValidationError

pytest.importorskip("pika")

from connectors.sinks.rabbitmq import RabbitMQSink, RabbitMQSinkConfig
from relay.events import Failure, OutboxEvent
from relay.interfaces import ConnectorError
from relay.registry import sink_plugins
from tests.harness.rabbitmq import (
    BrokerControlUnavailable,
    RabbitBroker,
    declare_queue,
    delete,
    drain_queue,
    start_rabbitmq,
)
from tests.support import assert_complete_and_ordered

# Short, so that a broken broker costs seconds of test time, not the default 30.
CONFIRM_TIMEOUT = 5.0
CONNECT_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def rabbit() -> Iterator[RabbitBroker]:
    broker = start_rabbitmq()
    try:
        yield broker
    finally:
        broker.close()


@dataclass
class Names:
    """Unique exchange and queue names for one test; everything is deleted afterwards."""

    prefix: str = field(default_factory=lambda: f"relaytest-{uuid.uuid4().hex[:10]}")
    queues: list[str] = field(default_factory=list)

    @property
    def exchange(self) -> str:
        return f"{self.prefix}.x"

    def queue(self, suffix: str = "q") -> str:
        name = f"{self.prefix}.{suffix}"
        self.queues.append(name)
        return name


@pytest.fixture
def names(rabbit: RabbitBroker) -> Iterator[Names]:
    created = Names()
    try:
        yield created
    finally:
        delete(rabbit.url, queues=created.queues, exchanges=[created.exchange])


def _events(aggregate_type: str, count: int, aggregates: int, start: int = 1) -> list[OutboxEvent]:
    return [
        OutboxEvent(
            position=i,
            event_id=str(uuid.uuid4()),
            aggregate_type=aggregate_type,
            aggregate_id=f"order-{i % aggregates}",
            event_type="OrderUpdated",
            payload=b'{"seq": %d, "text": "caf\xc3\xa9"}' % i,
            headers={"traceparent": f"00-trace-{i}-01", "correlation_id": "c-1"},
            created_at=1_700_000_000.25 + i,
        )
        for i in range(start, start + count)
    ]


def _config(url: str, names: Names, **settings: Any) -> RabbitMQSinkConfig:
    values: dict[str, Any] = {
        "type": "rabbitmq",
        "url": url,
        "exchange": names.exchange,
        "confirm_timeout": CONFIRM_TIMEOUT,
        "connect_timeout": CONNECT_TIMEOUT,
        **settings,
    }
    return RabbitMQSinkConfig(**values)


@asynccontextmanager
async def _started_sink(url: str, names: Names, **settings: Any) -> AsyncIterator[RabbitMQSink]:
    sink = RabbitMQSink(_config(url, names, **settings))
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


def _as_delivered(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drained messages in the shape tests.support.assert_complete_and_ordered reads."""
    return [
        {
            "event_id": m["headers"]["event_id"],
            "aggregate_id": m["headers"]["aggregate_id"],
            "position": int(m["headers"]["position"]),
        }
        for m in messages
    ]


async def _relay(
    sink: RabbitMQSink, events: list[OutboxEvent], *, batch: int, deadline_s: float = 30.0
) -> int:
    """Publish the way the pipeline does: at most one event per aggregate per call, the next
    event of an aggregate only after the previous one was acknowledged, failures retried after a
    pause. Returns how many event publications failed (a raising call counts all its events)."""
    lanes: dict[str | None, deque[OutboxEvent]] = {}
    for event in events:
        lanes.setdefault(event.aggregate_id, deque()).append(event)
    failed = 0
    deadline = time.monotonic() + deadline_s
    while any(lanes.values()):
        assert time.monotonic() < deadline, f"events still unacknowledged after {deadline_s:g}s"
        heads = [lane[0] for lane in lanes.values() if lane][:batch]
        try:
            results = await sink.publish(heads)
        except ConnectorError:
            failed += len(heads)
            await asyncio.sleep(0.2)
            continue
        assert len(results) == len(heads)
        for event, result in zip(heads, results, strict=True):
            if result is None:
                lanes[event.aggregate_id].popleft()
            else:
                failed += 1
        if any(result is not None for result in results):
            await asyncio.sleep(0.2)
    return failed


def _require_control(rabbit: RabbitBroker) -> None:
    if not rabbit.controllable:
        pytest.skip(f"{rabbit!r} cannot be stopped and started from here")


# --- delivery -----------------------------------------------------------------------------------


async def test_every_event_is_delivered_with_its_body_properties_and_headers(
    rabbit: RabbitBroker, names: Names
) -> None:
    events = _events("order", 50, aggregates=5)
    events[0].content_type = "text/plain"
    events[0].payload = b"plain text, not JSON"
    async with _started_sink(rabbit.url, names) as sink:
        queue = names.queue()
        declare_queue(rabbit.url, queue, names.exchange, "order.*")
        assert await sink.publish(events) == [None] * 50
    delivered = {m["properties"]["message_id"]: m for m in drain_queue(rabbit.url, queue, 50)}
    assert set(delivered) == {e.event_id for e in events}
    for event in events:
        message = delivered[event.event_id]
        assert message["body"] == event.payload
        assert message["routing_key"] == "order.OrderUpdated"
        assert message["exchange"] == names.exchange
        assert message["properties"] == {
            "message_id": event.event_id,
            "type": "OrderUpdated",
            "timestamp": int(event.created_at),
            "content_type": event.content_type,
            "delivery_mode": 2,
        }
        assert message["headers"] == event.standard_headers()
    assert delivered[events[0].event_id]["properties"]["content_type"] == "text/plain"
    assert delivered[events[1].event_id]["properties"]["content_type"] == "application/json"


async def test_events_of_one_aggregate_reach_the_queue_in_publish_order_across_calls(
    rabbit: RabbitBroker, names: Names
) -> None:
    events = _events("order", 2000, aggregates=200)
    async with _started_sink(rabbit.url, names, routing_key="{aggregate_type}.{aggregate_id}") as sink:
        queue = names.queue()
        declare_queue(rabbit.url, queue, names.exchange, "order.#")
        assert await _relay(sink, events, batch=200) == 0
    delivered = _as_delivered(drain_queue(rabbit.url, queue, 2000))
    assert len(delivered) == 2000
    assert assert_complete_and_ordered(delivered, {e.event_id for e in events}) == 0


async def test_a_consistent_hash_exchange_keeps_each_aggregate_in_one_of_four_queues_in_order(
    rabbit: RabbitBroker, names: Names
) -> None:
    try:
        rabbit.ensure_consistent_hash()
    except BrokerControlUnavailable as exc:
        pytest.skip(str(exc))
    config = _config(rabbit.url, names, exchange_type="x-consistent-hash")
    assert config.routing_key == "{aggregate_id}"
    events = _events("order", 1200, aggregates=60)
    sink = RabbitMQSink(config)
    await sink.start()  # declares the exchange
    try:
        queues = [names.queue(f"q{i}") for i in range(4)]
        for queue in queues:
            # The binding key is the queue's weight (points on the hash ring); 10 points each
            # spread 60 aggregates fairly evenly.
            declare_queue(rabbit.url, queue, names.exchange, "10")
        assert await _relay(sink, events, batch=60) == 0
    finally:
        await sink.close()
    queue_of: dict[str, str] = {}
    total = 0
    for queue in queues:
        delivered = _as_delivered(drain_queue(rabbit.url, queue, 1, timeout=2.0))
        total += len(delivered)
        for message in delivered:
            assert queue_of.setdefault(message["aggregate_id"], queue) == queue, "an aggregate was split"
        assert_complete_and_ordered(delivered, {m["event_id"] for m in delivered})
    assert total == 1200
    assert len(queue_of) == 60
    assert len(set(queue_of.values())) >= 2, "every aggregate hashed to one queue"


async def test_an_unroutable_event_fails_with_a_clear_reason_while_routable_events_of_the_call_are_acked(
    rabbit: RabbitBroker, names: Names
) -> None:
    routable = _events("order", 10, aggregates=10)
    unroutable = _events("invoice", 10, aggregates=10, start=11)
    mixed = [event for pair in zip(routable, unroutable, strict=True) for event in pair]
    async with _started_sink(rabbit.url, names) as sink:
        queue = names.queue()
        declare_queue(rabbit.url, queue, names.exchange, "order.*")
        results = await sink.publish(mixed)
    for event, result in zip(mixed, results, strict=True):
        if event.aggregate_type == "order":
            assert result is None
        else:
            assert isinstance(result, Failure)
            assert not result.permanent  # binding a queue later makes it routable
            assert (
                f"no queue bound for routing key 'invoice.OrderUpdated' on exchange '{names.exchange}'"
                in result.reason
            )
    delivered = drain_queue(rabbit.url, queue, 10, timeout=2.0)
    assert sorted(m["properties"]["message_id"] for m in delivered) == sorted(e.event_id for e in routable)


async def test_with_mandatory_off_an_unroutable_event_is_acked_because_rabbitmq_drops_it_by_design(
    rabbit: RabbitBroker, names: Names
) -> None:
    async with _started_sink(rabbit.url, names, mandatory=False) as sink:
        assert await sink.publish(_events("nobody", 3, aggregates=3)) == [None] * 3


async def test_a_message_the_broker_nacks_is_a_failure_and_never_an_acknowledgement(
    rabbit: RabbitBroker, names: Names
) -> None:
    events = _events("order", 10, aggregates=10)
    async with _started_sink(rabbit.url, names) as sink:
        queue = names.queue()
        # A full queue with overflow reject-publish makes RabbitMQ answer basic.nack.
        declare_queue(
            rabbit.url, queue, names.exchange, "#", {"x-max-length": 4, "x-overflow": "reject-publish"}
        )
        results = await sink.publish(events)
    assert results[:4] == [None] * 4
    for result in results[4:]:
        assert isinstance(result, Failure)
        assert "basic.nack" in result.reason
    delivered = drain_queue(rabbit.url, queue, 4, timeout=2.0)
    assert [m["properties"]["message_id"] for m in delivered] == [e.event_id for e in events[:4]]


async def test_a_channel_closed_by_the_broker_fails_the_call_and_the_next_call_declares_the_exchange_again(
    rabbit: RabbitBroker, names: Names
) -> None:
    async with _started_sink(rabbit.url, names) as sink:
        delete(rabbit.url, exchanges=[names.exchange])  # publishing now closes the channel: 404
        results = await sink.publish(_events("order", 5, aggregates=5))
        assert all(isinstance(r, Failure) and "404 NOT_FOUND - no exchange" in r.reason for r in results)
        queue = names.queue()
        results = await sink.publish(_events("order", 5, aggregates=5, start=6))  # reconnects, declares
        assert all(isinstance(r, Failure) and "unroutable" in r.reason for r in results)
        declare_queue(rabbit.url, queue, names.exchange, "#")
        events = _events("order", 5, aggregates=5, start=11)
        assert await sink.publish(events) == [None] * 5
    delivered = drain_queue(rabbit.url, queue, 5, timeout=2.0)
    assert [m["properties"]["message_id"] for m in delivered] == [e.event_id for e in events]


# --- outages ------------------------------------------------------------------------------------


async def test_a_broker_outage_between_calls_fails_them_and_later_calls_succeed_without_loss(
    rabbit: RabbitBroker, names: Names
) -> None:
    _require_control(rabbit)
    first, second, third = (_events("order", 100, aggregates=100, start=s) for s in (1, 101, 201))
    async with _started_sink(rabbit.url, names) as sink:
        queue = names.queue()
        declare_queue(rabbit.url, queue, names.exchange, "order.*")
        assert await sink.publish(first) == [None] * 100
        await asyncio.to_thread(rabbit.stop)
        try:
            try:
                results = await sink.publish(second)
            except ConnectorError as exc:
                assert "cannot connect: Connection refused" in str(exc)
            else:
                assert all(isinstance(r, Failure) for r in results), "an event was acked by a stopped broker"
            with pytest.raises(ConnectorError):
                await sink.publish(second)  # still down: the reconnect is refused, promptly
        finally:
            await asyncio.to_thread(rabbit.start)
        assert await _relay(sink, second + third, batch=100, deadline_s=20) == 0
    delivered = _as_delivered(drain_queue(rabbit.url, queue, 300))
    assert assert_complete_and_ordered(delivered, {e.event_id for e in first + second + third}) == 0


async def test_a_broker_restart_during_publishing_loses_no_acknowledged_event(
    rabbit: RabbitBroker, names: Names
) -> None:
    _require_control(rabbit)
    aggregates = 200
    events: list[OutboxEvent] = []
    failed = 0
    async with _started_sink(rabbit.url, names) as sink:
        queue = names.queue()
        declare_queue(rabbit.url, queue, names.exchange, "order.*")
        restart = asyncio.create_task(asyncio.to_thread(rabbit.restart))
        rounds_after_restart = 0
        # Round after round (the next event of every aggregate), until the broker went down and
        # came back, and a couple more rounds went through.
        while rounds_after_restart < 3:
            if restart.done():
                restart.result()
                rounds_after_restart += 1
            round_events = _events("order", aggregates, aggregates, start=len(events) + 1)
            events += round_events
            failed += await _relay(sink, round_events, batch=aggregates, deadline_s=30)
            await asyncio.sleep(0.01)
    assert failed > 0, "the restart went unnoticed"
    delivered = _as_delivered(drain_queue(rabbit.url, queue, len(events), timeout=15))
    # Events unconfirmed at the outage may have reached the queue and were sent again: duplicates
    # are allowed (at-least-once); loss and reordering of first deliveries are not.
    duplicates = assert_complete_and_ordered(delivered, {e.event_id for e in events})
    assert duplicates <= failed


# --- secrets, check, close, config --------------------------------------------------------------


async def test_a_password_in_the_url_never_appears_in_errors_logs_or_describe(
    rabbit: RabbitBroker, names: Names, capfd: pytest.CaptureFixture[str]
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    wrong = RabbitMQSink(_config(rabbit.url_for("guest", password), names))
    texts = [repr(wrong.describe())]
    for attempt in (wrong.check, wrong.start, lambda: wrong.publish(_events("order", 2, aggregates=2))):
        with pytest.raises(ConnectorError) as refused:
            await attempt()
        texts.append(str(refused.value))
    assert "refused the login" in texts[1]
    await wrong.close()

    refusing = RabbitMQSink(_config(f"amqp://guest:{password}@127.0.0.1:1/%2F", names))
    with pytest.raises(ConnectorError) as unreachable:
        await refusing.check()
    texts += [str(unreachable.value), repr(refusing.describe())]

    if rabbit.controllable:  # a real login with that password, and a failure on that connection
        user = f"relaytest-{uuid.uuid4().hex[:8]}"
        rabbit.add_user(user, password)
        try:
            async with _started_sink(rabbit.url_for(user, password), names) as sink:
                results = await sink.publish(_events("unbound", 2, aggregates=2))
                reasons = [r.reason for r in results if r is not None]
                texts += [*reasons, repr(sink.describe())]
            assert len(reasons) == 2 and all("unroutable" in r for r in reasons)
        finally:
            rabbit.delete_user(user)

    captured = capfd.readouterr()
    texts += [captured.out, captured.err]
    for text in texts:
        assert password not in text
    assert "***" in texts[0]


async def test_check_refuses_a_missing_exchange_when_declare_is_false_and_accepts_an_existing_one(
    rabbit: RabbitBroker, names: Names
) -> None:
    with pytest.raises(ConnectorError, match=r"no exchange .*\(declare: false needs the exchange"):
        await RabbitMQSink(_config(rabbit.url, names, declare=False)).check()
    await RabbitMQSink(_config(rabbit.url, names)).check()  # declares it
    await RabbitMQSink(_config(rabbit.url, names, declare=False)).check()


async def test_check_names_the_conflict_when_the_exchange_exists_with_another_type(
    rabbit: RabbitBroker, names: Names
) -> None:
    await RabbitMQSink(_config(rabbit.url, names)).check()
    with pytest.raises(ConnectorError, match=r"inequivalent arg 'type'.*exists with other settings"):
        await RabbitMQSink(_config(rabbit.url, names, exchange_type="fanout")).check()


async def test_close_is_clean_idempotent_and_keeps_every_acknowledged_event(
    rabbit: RabbitBroker, names: Names
) -> None:
    sink = RabbitMQSink(_config(rabbit.url, names))
    await sink.close()  # never started: nothing to do
    await sink.start()
    queue = names.queue()
    declare_queue(rabbit.url, queue, names.exchange, "#")
    for start in (1, 101, 201):
        assert await sink.publish(_events("order", 100, aggregates=100, start=start)) == [None] * 100
    started = time.monotonic()
    await sink.close()
    await sink.close()
    assert time.monotonic() - started < 2.0
    assert len(drain_queue(rabbit.url, queue, 300)) == 300


def test_the_sink_is_registered_and_its_config_refuses_bad_settings_with_clear_reasons() -> None:
    assert sink_plugins()["rabbitmq"].config is RabbitMQSinkConfig
    base = {"type": "rabbitmq", "url": "amqp://app:s3cret-pw@mq:5672/%2F"}
    config = RabbitMQSinkConfig(**base)
    assert (config.exchange, config.exchange_type, config.routing_key) == (
        "outbox",
        "topic",
        "{aggregate_type}.{event_type}",
    )
    explicit = RabbitMQSinkConfig(**base, exchange_type="x-consistent-hash", routing_key="{aggregate_type}")
    assert explicit.routing_key == "{aggregate_type}"
    bad = {
        "routing_key": ("{tenant}.events", "unknown field {tenant}; available: event_id, event_type"),
        "url": ("http://mq:5672", "must start with amqp:// or amqps://"),
        "confirm_timeout": ("soon", "is not a duration"),
    }
    for key, (value, reason) in bad.items():
        with pytest.raises(ValidationError, match=reason.replace("{", r"\{").replace("}", r"\}")):
            RabbitMQSinkConfig(**{**base, key: value})
    with pytest.raises(ValidationError, match="heartbeat cannot be set in the URL: use heartbeat"):
        RabbitMQSinkConfig(**{**base, "url": "amqp://mq/%2F?heartbeat=5"})
    with pytest.raises(ValidationError) as invalid:
        RabbitMQSinkConfig(**{**base, "url": "amqps://app:s3cret-pw@mq:notaport/"})
    # relay.config shows only the messages (never the input, which holds the password).
    assert "s3cret-pw" not in " ".join(error["msg"] for error in invalid.value.errors())
