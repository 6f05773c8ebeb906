"""The RabbitMQ sink against a real broker (RELAY_TEST_AMQP_URL, the system node on 127.0.0.1:5672,
or a private node). No mocks: every acknowledgement is a real publisher confirm and every
assertion about a queue reads the messages back. Each test uses its own exchange and queues."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from pydantic import ValidationError

pytest.importorskip("pika")

from outbox_relay.connectors.sinks.rabbitmq import RabbitMQSink, RabbitMQSinkConfig
from outbox_relay.events import Failure
from outbox_relay.interfaces import ConnectorError
from outbox_relay.registry import sink_plugins
from tests.conftest import RabbitNames, private_rabbitmq, rabbit_delivered, rabbit_names, require_control
from tests.harness.rabbitmq import (
    BrokerControlUnavailable,
    RabbitBroker,
    declare_queue,
    delete,
    drain_queue,
)
from tests.sink_support import make_events, relay_events, relay_rounds_during, started_sink
from tests.support import assert_complete_and_ordered

# Short, so that a broken broker costs seconds of test time, not the default 30.
CONFIRM_TIMEOUT = 5.0
CONNECT_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def rabbit() -> Iterator[RabbitBroker]:
    yield from private_rabbitmq()


@pytest.fixture
def names(rabbit: RabbitBroker) -> Iterator[RabbitNames]:
    yield from rabbit_names(rabbit.url)


def _config(url: str, names: RabbitNames, **settings: Any) -> RabbitMQSinkConfig:
    values: dict[str, Any] = {
        "type": "rabbitmq",
        "url": url,
        "exchange": names.exchange,
        "confirm_timeout": CONFIRM_TIMEOUT,
        "connect_timeout": CONNECT_TIMEOUT,
        **settings,
    }
    return RabbitMQSinkConfig(**values)


def _started_sink(url: str, names: RabbitNames, **settings: Any) -> AbstractAsyncContextManager[RabbitMQSink]:
    return started_sink(RabbitMQSink(_config(url, names, **settings)))


# --- delivery -----------------------------------------------------------------------------------


async def test_every_event_is_delivered_with_its_body_properties_and_headers(
    rabbit: RabbitBroker, names: RabbitNames
) -> None:
    events = make_events(50, aggregates=5)
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
    rabbit: RabbitBroker, names: RabbitNames
) -> None:
    events = make_events(2000, aggregates=200)
    async with _started_sink(rabbit.url, names, routing_key="{aggregate_type}.{aggregate_id}") as sink:
        queue = names.queue()
        declare_queue(rabbit.url, queue, names.exchange, "order.#")
        assert await relay_events(sink, events, batch=200, allow_permanent=True) == 0
    delivered = rabbit_delivered(drain_queue(rabbit.url, queue, 2000))
    assert len(delivered) == 2000
    assert assert_complete_and_ordered(delivered, {e.event_id for e in events}) == 0


async def test_a_consistent_hash_exchange_keeps_each_aggregate_in_one_of_four_queues_in_order(
    rabbit: RabbitBroker, names: RabbitNames
) -> None:
    try:
        rabbit.ensure_consistent_hash()
    except BrokerControlUnavailable as exc:
        pytest.skip(str(exc))
    config = _config(rabbit.url, names, exchange_type="x-consistent-hash")
    assert config.routing_key == "{aggregate_id}"
    events = make_events(1200, aggregates=60)
    sink = RabbitMQSink(config)
    await sink.start()  # declares the exchange
    try:
        queues = [names.queue(f"q{i}") for i in range(4)]
        for queue in queues:
            # The binding key is the queue's weight (points on the hash ring); 10 points each
            # spread 60 aggregates fairly evenly.
            declare_queue(rabbit.url, queue, names.exchange, "10")
        assert await relay_events(sink, events, batch=60, allow_permanent=True) == 0
    finally:
        await sink.close()
    queue_of: dict[str, str] = {}
    total = 0
    for queue in queues:
        delivered = rabbit_delivered(drain_queue(rabbit.url, queue, 1, timeout=2.0))
        total += len(delivered)
        for message in delivered:
            assert queue_of.setdefault(message["aggregate_id"], queue) == queue, "an aggregate was split"
        assert_complete_and_ordered(delivered, {m["event_id"] for m in delivered})
    assert total == 1200
    assert len(queue_of) == 60
    assert len(set(queue_of.values())) >= 2, "every aggregate hashed to one queue"


async def test_an_unroutable_event_fails_with_a_clear_reason_while_routable_events_of_the_call_are_acked(
    rabbit: RabbitBroker, names: RabbitNames
) -> None:
    routable = make_events(10, aggregates=10)
    unroutable = make_events(10, aggregates=10, start=11, aggregate_type="invoice")
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
    rabbit: RabbitBroker, names: RabbitNames
) -> None:
    async with _started_sink(rabbit.url, names, mandatory=False) as sink:
        assert await sink.publish(make_events(3, aggregates=3, aggregate_type="nobody")) == [None] * 3


async def test_a_message_a_full_queue_nacks_is_a_transient_failure_and_never_an_acknowledgement(
    rabbit: RabbitBroker, names: RabbitNames
) -> None:
    events = make_events(10, aggregates=10)
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
        # Consumers away must not dead-letter the outbox: a nack never counts against the event.
        assert result.transient
        assert not result.permanent
    delivered = drain_queue(rabbit.url, queue, 4, timeout=2.0)
    assert [m["properties"]["message_id"] for m in delivered] == [e.event_id for e in events[:4]]


async def test_a_channel_closed_by_the_broker_fails_the_call_and_the_next_call_declares_the_exchange_again(
    rabbit: RabbitBroker, names: RabbitNames
) -> None:
    async with _started_sink(rabbit.url, names) as sink:
        delete(rabbit.url, exchanges=[names.exchange])  # publishing now closes the channel: 404
        results = await sink.publish(make_events(5, aggregates=5))
        assert all(isinstance(r, Failure) and "404 NOT_FOUND - no exchange" in r.reason for r in results)
        queue = names.queue()
        results = await sink.publish(make_events(5, aggregates=5, start=6))  # reconnects, declares
        assert all(isinstance(r, Failure) and "unroutable" in r.reason for r in results)
        declare_queue(rabbit.url, queue, names.exchange, "#")
        events = make_events(5, aggregates=5, start=11)
        assert await sink.publish(events) == [None] * 5
    delivered = drain_queue(rabbit.url, queue, 5, timeout=2.0)
    assert [m["properties"]["message_id"] for m in delivered] == [e.event_id for e in events]


@pytest.fixture
def limited_user(rabbit: RabbitBroker) -> Iterator[tuple[str, str]]:
    """A user of the private node whose permissions a test changes; (user, password)."""
    require_control(rabbit)
    user, password = f"relaytest-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    rabbit.add_user(user, password)
    try:
        yield user, password
    finally:
        rabbit.delete_user(user)


async def test_a_user_that_may_not_write_to_the_exchange_fails_events_as_a_setup_problem_until_granted(
    rabbit: RabbitBroker, names: RabbitNames, limited_user: tuple[str, str]
) -> None:
    user, password = limited_user
    rabbit.set_permissions(user, ".*", "^$", ".*")  # may declare, may not publish
    async with _started_sink(rabbit.url_for(user, password), names) as sink:
        queue = names.queue()
        declare_queue(rabbit.url, queue, names.exchange, "#")
        for _ in range(2):  # the refusal closing the channel, then the next call on a new one
            results = await sink.publish(make_events(3, aggregates=3))
            for result in results:
                assert isinstance(result, Failure), "a refused publish is never an acknowledgement"
                assert result.setup, result
                assert result.transient, result
                assert not result.permanent, result
                assert "ACCESS_REFUSED" in result.reason
                assert password not in result.reason
        rabbit.set_permissions(user, ".*", ".*", ".*")  # the operator grants it
        events = make_events(3, aggregates=3, start=10)
        assert await sink.publish(events) == [None] * 3
    delivered = drain_queue(rabbit.url, queue, 3, timeout=2.0)
    assert [m["properties"]["message_id"] for m in delivered] == [e.event_id for e in events]


async def test_a_user_that_may_not_declare_the_exchange_fails_events_as_a_setup_problem_not_an_outage(
    rabbit: RabbitBroker, names: RabbitNames, limited_user: tuple[str, str]
) -> None:
    user, password = limited_user
    rabbit.set_permissions(user, "^$", ".*", ".*")  # may not declare
    sink = RabbitMQSink(_config(rabbit.url_for(user, password), names))
    try:
        results = await sink.publish(make_events(2, aggregates=2))
    finally:
        await sink.close()
    for result in results:
        assert isinstance(result, Failure)
        assert result.setup, result
        assert result.transient, result
        assert not result.permanent, result
        assert "ACCESS_REFUSED" in result.reason
        assert password not in result.reason


# --- outages ------------------------------------------------------------------------------------


async def test_a_broker_outage_between_calls_fails_them_and_later_calls_succeed_without_loss(
    rabbit: RabbitBroker, names: RabbitNames
) -> None:
    require_control(rabbit)
    first, second, third = (make_events(100, aggregates=100, start=s) for s in (1, 101, 201))
    async with _started_sink(rabbit.url, names) as sink:
        queue = names.queue()
        declare_queue(rabbit.url, queue, names.exchange, "order.*")
        assert await sink.publish(first) == [None] * 100
        await asyncio.to_thread(rabbit.stop)
        try:
            # Either outcome is right: the call finds the broker gone while publishing (every
            # event failed) or before it starts (the connection is refused).
            refused: ConnectorError | None = None
            try:
                results = await sink.publish(second)
            except ConnectorError as exc:
                refused = exc
            if refused is not None:
                assert "cannot connect: Connection refused" in str(refused)
            else:
                assert all(isinstance(r, Failure) for r in results), "an event was acked by a stopped broker"
            with pytest.raises(ConnectorError):
                await sink.publish(second)  # still down: the reconnect is refused, promptly
        finally:
            await asyncio.to_thread(rabbit.start)
        assert await relay_events(sink, second + third, batch=100, deadline_s=20, allow_permanent=True) == 0
    delivered = rabbit_delivered(drain_queue(rabbit.url, queue, 300))
    assert assert_complete_and_ordered(delivered, {e.event_id for e in first + second + third}) == 0


async def test_a_broker_restart_during_publishing_loses_no_acknowledged_event(
    rabbit: RabbitBroker, names: RabbitNames
) -> None:
    require_control(rabbit)
    async with _started_sink(rabbit.url, names) as sink:
        queue = names.queue()
        declare_queue(rabbit.url, queue, names.exchange, "order.*")
        # Round after round (the next event of every aggregate), until the broker went down and
        # came back, and a couple more rounds went through.
        events, failed = await relay_rounds_during(sink, rabbit.restart, aggregates=200, allow_permanent=True)
    # The restart happened while rounds were being published (the disturbance returned without
    # error before the last three rounds); whether a round failed depends on timing, so it is
    # not asserted. What is asserted: nothing was lost, and duplicates only for failures.
    delivered = rabbit_delivered(drain_queue(rabbit.url, queue, len(events), timeout=15))
    # Events unconfirmed at the outage may have reached the queue and were sent again: duplicates
    # are allowed (at-least-once); loss and reordering of first deliveries are not.
    duplicates = assert_complete_and_ordered(delivered, {e.event_id for e in events})
    assert duplicates <= failed


# --- secrets, check, close, config --------------------------------------------------------------


async def test_a_password_in_the_url_never_appears_in_errors_logs_or_describe(
    rabbit: RabbitBroker, names: RabbitNames, capfd: pytest.CaptureFixture[str]
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    wrong = RabbitMQSink(_config(rabbit.url_for("guest", password), names))
    texts = [repr(wrong.describe())]
    for attempt in (wrong.check, wrong.start, lambda: wrong.publish(make_events(2, aggregates=2))):
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
                results = await sink.publish(make_events(2, aggregates=2, aggregate_type="unbound"))
                reasons = [r.reason for r in results if r is not None]
                texts += [*reasons, repr(sink.describe())]
            assert len(reasons) == 2
            assert all("unroutable" in r for r in reasons)
        finally:
            rabbit.delete_user(user)

    captured = capfd.readouterr()
    texts += [captured.out, captured.err]
    for text in texts:
        assert password not in text
    assert "***" in texts[0]


async def test_check_refuses_a_missing_exchange_when_declare_is_false_and_accepts_an_existing_one(
    rabbit: RabbitBroker, names: RabbitNames
) -> None:
    with pytest.raises(ConnectorError, match=r"no exchange .*\(declare: false needs the exchange"):
        await RabbitMQSink(_config(rabbit.url, names, declare=False)).check()
    await RabbitMQSink(_config(rabbit.url, names)).check()  # declares it
    await RabbitMQSink(_config(rabbit.url, names, declare=False)).check()


async def test_check_names_the_conflict_when_the_exchange_exists_with_another_type(
    rabbit: RabbitBroker, names: RabbitNames
) -> None:
    await RabbitMQSink(_config(rabbit.url, names)).check()
    with pytest.raises(ConnectorError, match=r"inequivalent arg 'type'.*exists with other settings"):
        await RabbitMQSink(_config(rabbit.url, names, exchange_type="fanout")).check()


async def test_close_is_clean_idempotent_and_keeps_every_acknowledged_event(
    rabbit: RabbitBroker, names: RabbitNames
) -> None:
    sink = RabbitMQSink(_config(rabbit.url, names))
    await sink.close()  # never started: nothing to do
    await sink.start()
    queue = names.queue()
    declare_queue(rabbit.url, queue, names.exchange, "#")
    for start in (1, 101, 201):
        assert await sink.publish(make_events(100, aggregates=100, start=start)) == [None] * 100
    started = time.monotonic()
    await sink.close()
    await sink.close()
    assert time.monotonic() - started < 20.0  # closing does not wait for a confirm timeout
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


async def test_a_reserved_exchange_name_is_a_permission_problem_and_a_wrong_password_a_refused_login(
    rabbit: RabbitBroker, names: RabbitNames
) -> None:
    from outbox_relay.problems import setup_problem

    # RabbitMQ answers both with 403 ACCESS_REFUSED: a channel's refusal is not a login's.
    reserved = RabbitMQSink(_config(rabbit.url, names, exchange=f"amq.relaytest-{uuid.uuid4().hex[:8]}"))
    with pytest.raises(ConnectorError) as refused:
        await reserved.start()
    await reserved.close()
    assert "ACCESS_REFUSED" in str(refused.value), str(refused.value)
    problem = setup_problem(refused.value)
    assert problem is not None, (problem, str(refused.value))
    assert problem.kind == "permission denied", (problem, str(refused.value))

    wrong = RabbitMQSink(_config(rabbit.url_for("guest", f"pw-{uuid.uuid4().hex}"), names))
    with pytest.raises(ConnectorError) as login:
        await wrong.start()
    await wrong.close()
    problem = setup_problem(login.value)
    assert problem is not None, (problem, str(login.value))
    assert problem.kind == "login refused", (problem, str(login.value))
    assert problem.fix == "check the user and password the DSN or URL gives"
