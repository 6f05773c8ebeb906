"""The contract every sink passes, whatever the broker behind it.

One backend = one entry in `BACKENDS`: how to build a working sink, how to build one whose
destination is broken, and how to read back what was delivered. Brokers join this list with their
own real servers (Watermill's pub/sub test suite is the model): a backend's parameters name the
fixtures it needs, like a test's, so only the backends that run start a server.

A backend with a server also says how to reach that server through a TCP proxy the test can cut
(`Backend.outage`): what the relay reports while its broker is away is part of the contract."""

from __future__ import annotations

import asyncio
import inspect
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import urlsplit

import pytest
from prometheus_client import REGISTRY

from outbox_relay.config import PipelineConfig, RetryConfig
from outbox_relay.connectors.sinks.file import FileSink, FileSinkConfig
from outbox_relay.connectors.sinks.kafka import KafkaSink, KafkaSinkConfig
from outbox_relay.connectors.sinks.nats import NatsSink, NatsSinkConfig
from outbox_relay.connectors.sinks.rabbitmq import RabbitMQSink, RabbitMQSinkConfig
from outbox_relay.connectors.sinks.redis_streams import RedisSinkConfig, RedisStreamsSink
from outbox_relay.connectors.sinks.stdout import StdoutSink, StdoutSinkConfig
from outbox_relay.connectors.sinks.webhook import WebhookSink, WebhookSinkConfig
from outbox_relay.events import OutboxEvent
from outbox_relay.interfaces import Sink
from outbox_relay.pipeline import Pipeline
from tests.conftest import (
    kafka_message_as_line,
    nats_message_as_line,
    rabbit_message_as_line,
    redis_entry_as_line,
    webhook_request_as_lines,
)
from tests.harness.kafka import KafkaBroker, start_kafka_behind
from tests.harness.nats import NatsServer, read_stream
from tests.harness.proxy import SwitchableProxy
from tests.harness.rabbitmq import RabbitBroker, declare_queue, delete, drain_queue, queue_depth
from tests.harness.redis import RedisServer, unique_prefix
from tests.harness.webhook import WebhookReceiver
from tests.sink_support import ListSource, eventually, make_events
from tests.support import read_lines


@dataclass
class Outage:
    """A sink whose broker is reached through a proxy: `refuse()` makes the broker unreachable
    (open connections cut, new ones refused), `silence()` makes it hang (connections accepted,
    never answered), `restore()` brings it back as it was. `read_back` reads what it delivered."""

    sink: Sink
    read_back: Callable[[], list[dict[str, Any]]]
    refuse: Callable[[], None]
    silence: Callable[[], None]
    restore: Callable[[], None]


@dataclass
class Backend:
    sink: Sink
    read_back: Callable[[], list[dict[str, Any]]]
    broken: Callable[[], Sink]
    #: How to take the broker away and give it back; None only for a sink without a server.
    outage: Callable[[], AbstractContextManager[Outage]] | None


# Port 1 on loopback refuses connections.
_REFUSING_PORT = 1


@contextmanager
def _behind_proxy(
    port: int, sink: Callable[[int], Sink], read_back: Callable[[], list[dict[str, Any]]]
) -> Iterator[Outage]:
    """An outage of the server on `port`: `sink(proxy_port)` builds a sink that reaches it
    through a proxy this test owns (the server itself is never stopped or reconfigured)."""
    with SwitchableProxy(port) as proxy:
        yield Outage(
            sink(proxy.port),
            read_back,
            refuse=lambda: proxy.switch(_REFUSING_PORT),
            silence=proxy.silence,
            restore=lambda: proxy.switch(port),
        )


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit(":", 1)[0] if parts.port is not None else parts.netloc
    return parts._replace(netloc=f"{host}:{port}").geturl()


def _port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, f"{url} names no port"
    return port


class _DiskFull(FileSink):
    """A file sink whose disk fills up once it is started: its file is swapped for /dev/full,
    which fails every write with ENOSPC (the config refuses /dev/full itself: not a file)."""

    async def start(self) -> None:
        await super().start()
        assert self._file is not None
        full = os.open("/dev/full", os.O_WRONLY)
        try:
            os.dup2(full, self._file.fileno())
        finally:
            os.close(full)


def _file_backend(tmp_path: Path) -> Iterator[Backend]:
    path = tmp_path / "events.jsonl"
    yield Backend(
        FileSink(FileSinkConfig(type="file", path=str(path))),
        lambda: read_lines(path),
        lambda: _DiskFull(FileSinkConfig(type="file", path=str(tmp_path / "full.jsonl"))),
        None,  # no server to take away
    )


def _stdout_backend(tmp_path: Path) -> Iterator[Backend]:
    # stdout redirected to a file, as `outbox-relay run > events.jsonl` does.
    path = tmp_path / "stdout.jsonl"
    stream: BinaryIO = path.open("wb")

    def broken() -> Sink:
        dead_read, dead_write = os.pipe()
        os.close(dead_read)  # writing to a pipe nobody reads: EPIPE, as when the consumer died
        return StdoutSink(StdoutSinkConfig(type="stdout"), stream=os.fdopen(dead_write, "wb"))

    try:
        yield Backend(
            StdoutSink(StdoutSinkConfig(type="stdout"), stream=stream),
            lambda: read_lines(path),
            broken,
            None,  # no server to take away
        )
    finally:
        stream.close()


def _kafka_backend(kafka: KafkaBroker) -> Iterator[Backend]:
    topic = f"contract-{uuid.uuid4().hex}"  # one per test: nothing to clean up, nothing shared
    kafka.create_topic(topic, partitions=3)  # several partitions, so per-key order is really tested

    def sink(bootstrap_servers: str, delivery_timeout: float) -> Sink:
        return KafkaSink(
            KafkaSinkConfig(
                type="kafka",
                bootstrap_servers=bootstrap_servers,
                topic=topic,
                delivery_timeout=delivery_timeout,
            )
        )

    def read_back() -> list[dict[str, Any]]:
        # A topic has no end: read until one more message does not come within a second. Every
        # message was acknowledged before read_back is called, so all of them are there already.
        messages = kafka.consume_all(topic, 1, timeout=10)
        while messages:
            more = kafka.consume_all(topic, len(messages) + 1, timeout=1.0)
            if len(more) <= len(messages):
                break
            messages = more
        return [kafka_message_as_line(m) for m in messages]  # by partition then offset

    @contextmanager
    def outage() -> Iterator[Outage]:
        # A broker of its own, which advertises the proxy's address: a Kafka client connects to
        # the addresses the cluster advertises, so a proxy in front of a shared broker would be
        # bypassed after the bootstrap.
        if not kafka.owned:
            pytest.skip("an external Kafka cluster cannot be put behind a proxy")
        with SwitchableProxy(_REFUSING_PORT) as proxy, start_kafka_behind(proxy) as behind:
            target = behind.port
            assert target is not None
            behind.create_topic(topic, partitions=3)

            def behind_read_back() -> list[dict[str, Any]]:
                messages = behind.consume_all(topic, 1, timeout=10)
                while messages:
                    more = behind.consume_all(topic, len(messages) + 1, timeout=1.0)
                    if len(more) <= len(messages):
                        break
                    messages = more
                return [kafka_message_as_line(m) for m in messages]

            yield Outage(
                sink(behind.bootstrap_servers, 3.0),
                behind_read_back,
                refuse=lambda: proxy.switch(_REFUSING_PORT),
                silence=proxy.silence,
                restore=lambda: proxy.switch(target),
            )

    # Port 1 on loopback refuses connections: start() cannot reach any broker.
    yield Backend(sink(kafka.bootstrap_servers, 10.0), read_back, lambda: sink("127.0.0.1:1", 1.0), outage)


def _rabbitmq_backend(rabbitmq: RabbitBroker) -> Iterator[Backend]:
    exchange, queue = f"contract-{uuid.uuid4().hex}", f"contract-{uuid.uuid4().hex}"

    def sink(url: str) -> Sink:
        return RabbitMQSink(
            RabbitMQSinkConfig(type="rabbitmq", url=url, exchange=exchange, connect_timeout=2)
        )

    def read_back() -> list[dict[str, Any]]:
        messages = drain_queue(rabbitmq.url, queue, queue_depth(rabbitmq.url, queue), timeout=10)
        return [rabbit_message_as_line(m) for m in messages]

    first = sink(rabbitmq.url)
    declare_queue(rabbitmq.url, queue, exchange, "#", exchange_type="topic")
    try:
        port = _port_of(rabbitmq.url)
        yield Backend(
            first,
            read_back,
            # Port 1 on loopback refuses connections: start() cannot reach any broker.
            lambda: sink("amqp://guest:guest@127.0.0.1:1/"),
            lambda: _behind_proxy(port, lambda via: sink(_with_port(rabbitmq.url, via)), read_back),
        )
    finally:
        delete(rabbitmq.url, queues=[queue], exchanges=[exchange])


def _nats_backend(nats_server: NatsServer) -> Iterator[Backend]:
    # A stream and subjects of this test's own: the server may be shared.
    stream, prefix = f"CONTRACT_{uuid.uuid4().hex}", f"contract-{uuid.uuid4().hex}"

    def sink(url: str, ack_timeout: float = 5) -> Sink:
        return NatsSink(
            NatsSinkConfig(
                type="nats",
                servers=url,
                stream=stream,
                subject=prefix + ".{aggregate_type}.{event_type}",
                connect_timeout=2,
                ack_timeout=ack_timeout,
            )
        )

    def read_back() -> list[dict[str, Any]]:
        return [
            nats_message_as_line(headers, data) for _, headers, data in read_stream(nats_server.url, stream)
        ]

    try:
        port = _port_of(nats_server.url)
        yield Backend(
            sink(nats_server.url),
            read_back,
            # Port 1 on loopback refuses connections: start() cannot reach any server.
            lambda: sink("nats://127.0.0.1:1"),
            lambda: _behind_proxy(port, lambda via: sink(_with_port(nats_server.url, via), 2), read_back),
        )
    finally:
        nats_server.delete_stream(stream)


def _redis_backend(redis_server: RedisServer) -> Iterator[Backend]:
    prefix = unique_prefix("contract")  # the server may be shared: keys of this test's own

    def sink(url: str) -> Sink:
        return RedisStreamsSink(
            RedisSinkConfig(
                type="redis", url=url, stream=prefix + ".{aggregate_type}", connect_timeout=2, timeout=2
            )
        )

    def read_back() -> list[dict[str, Any]]:
        import redis

        client = redis.Redis.from_url(redis_server.url)
        try:
            return [redis_entry_as_line(fields) for _, fields in client.xrange(f"{prefix}.order")]
        finally:
            client.close()

    try:
        port = _port_of(redis_server.url)
        yield Backend(
            sink(redis_server.url),
            read_back,
            # Port 1 on loopback refuses connections: start() cannot reach any server.
            lambda: sink("redis://127.0.0.1:1/0"),
            lambda: _behind_proxy(port, lambda via: sink(_with_port(redis_server.url, via)), read_back),
        )
    finally:
        redis_server.delete_matching(f"{prefix}*")


def _webhook_backends(mode: Literal["event", "batch"]) -> Callable[..., Iterator[Backend]]:
    def backend(webhook_receiver: WebhookReceiver) -> Iterator[Backend]:
        def sink(url: str, timeout: float = 5) -> Sink:
            return WebhookSink(WebhookSinkConfig(type="webhook", url=url, mode=mode, timeout=timeout))

        def read_back() -> list[dict[str, Any]]:
            # In arrival order: an aggregate's next event is sent only after the previous one was
            # answered, so each aggregate's events arrive in order.
            return [
                line for request in webhook_receiver.received() for line in webhook_request_as_lines(request)
            ]

        port = _port_of(webhook_receiver.url)
        yield Backend(
            sink(webhook_receiver.url),
            read_back,
            # Port 1 on loopback refuses connections: every request fails to connect.
            lambda: sink("http://127.0.0.1:1/hook"),
            lambda: _behind_proxy(
                port, lambda via: sink(_with_port(webhook_receiver.url, via), 2), read_back
            ),
        )

    return backend


BACKENDS: dict[str, Callable[..., Iterator[Backend]]] = {
    "file": _file_backend,
    "stdout": _stdout_backend,
    "kafka": _kafka_backend,
    "rabbitmq": _rabbitmq_backend,
    "nats": _nats_backend,
    "redis": _redis_backend,
    "webhook": _webhook_backends("event"),
    "webhook-batch": _webhook_backends("batch"),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    make = BACKENDS[request.param]
    fixtures = {name: request.getfixturevalue(name) for name in inspect.signature(make).parameters}
    yield from make(**fixtures)


def _events(count: int, aggregates: int, start: int = 1) -> list[OutboxEvent]:
    return make_events(count, aggregates, start, event_id=_positional_id, epoch=1_700_000_000.0)


def _positional_id(position: int) -> str:
    return f"00000000-0000-0000-0000-{position:012d}"


async def test_every_event_is_delivered_with_body_and_all_headers(backend: Backend) -> None:
    events = _events(50, aggregates=5)
    await backend.sink.start()
    assert await backend.sink.publish(events) == [None] * 50
    await backend.sink.close()
    delivered = {m["event_id"]: m for m in backend.read_back()}
    assert set(delivered) == {e.event_id for e in events}
    for event in events:
        message = delivered[event.event_id]
        assert message["payload"] == {"seq": event.position, "text": "café"}
        headers = message["headers"]
        assert headers["traceparent"] == event.headers["traceparent"]
        assert headers["correlation_id"] == "c-1"
        assert headers["event_id"] == event.event_id
        assert headers["event_type"] == "OrderUpdated"
        assert headers["aggregate_type"] == "order"
        assert headers["aggregate_id"] == event.aggregate_id
        assert headers["position"] == str(event.position)
        assert headers["created_at"].startswith("2023-11-14T22:")


async def test_events_of_one_aggregate_arrive_in_publish_order_across_calls(backend: Backend) -> None:
    await backend.sink.start()
    for start in range(1, 400, 40):
        # The pipeline hands one event per aggregate per call; successive calls follow source order.
        assert await backend.sink.publish(_events(40, aggregates=40, start=start)) == [None] * 40
    await backend.sink.close()
    per_aggregate: dict[str, list[int]] = {}
    for message in backend.read_back():
        per_aggregate.setdefault(message["aggregate_id"], []).append(message["position"])
    assert sum(len(p) for p in per_aggregate.values()) == 400
    assert all(positions == sorted(positions) for positions in per_aggregate.values())


async def test_an_order_keeping_sink_stores_runs_of_one_aggregate_in_one_call_in_order(
    backend: Backend,
) -> None:
    if not backend.sink.keeps_order:
        pytest.skip("gets at most one event per aggregate per call")
    events = _events(400, aggregates=8)
    # What the pipeline hands such a sink: each aggregate's events as a run, in source order.
    runs = sorted(events, key=lambda e: (e.aggregate_id or "", e.position))
    await backend.sink.start()
    for start in range(0, 400, 200):
        assert await backend.sink.publish(runs[start : start + 200]) == [None] * 200
    await backend.sink.close()
    per_aggregate: dict[str, list[int]] = {}
    for message in backend.read_back():
        per_aggregate.setdefault(message["aggregate_id"], []).append(message["position"])
    assert sum(len(p) for p in per_aggregate.values()) == 400
    assert all(positions == sorted(positions) for positions in per_aggregate.values())


async def test_a_broken_destination_never_reports_an_acknowledgement(backend: Backend) -> None:
    sink = backend.broken()
    events = _events(10, aggregates=3)
    try:
        await sink.start()
        results = await sink.publish(events)
    except Exception:
        return  # the whole call failed: the pipeline retries every event of it
    finally:
        try:
            await sink.close()
        except Exception:
            pass
    assert len(results) == len(events)
    assert all(result is not None for result in results), "an event was acked that was never delivered"


async def test_close_flushes_everything_that_was_acknowledged(backend: Backend) -> None:
    await backend.sink.start()
    for start in (1, 101, 201):
        await backend.sink.publish(_events(100, aggregates=100, start=start))
    await backend.sink.close()
    assert len(backend.read_back()) == 300


def _sink_up(outbox: str) -> float | None:
    return REGISTRY.get_sample_value("outbox_relay_up", {"outbox": outbox, "component": "sink"})


@pytest.mark.parametrize("how", ["refused", "silent"])
async def test_while_the_broker_is_away_and_events_wait_the_relay_is_not_ready_and_recovers_once_it_is_back(
    backend: Backend, how: str
) -> None:
    """Readiness and `outbox_relay_up{component="sink"}` follow what the broker did: down while
    it refuses connections (or accepts them and never answers) and events wait, up again once
    it is back, with every event delivered once and in order per aggregate."""
    if backend.outage is None:
        pytest.skip("no server to take away")
    outbox = f"contract-{uuid.uuid4().hex[:12]}"  # gauges of this test's own
    with backend.outage() as outage:
        source = ListSource()
        pipeline = Pipeline(
            outbox,
            source,
            outage.sink,
            retry=RetryConfig(initial=0.05, max=0.5),
            tuning=PipelineConfig(stats_interval=0.1),
        )
        stop = asyncio.Event()
        running = asyncio.create_task(pipeline.run(stop))
        try:
            before = _events(10, aggregates=5)
            source.add(before)
            await eventually(lambda: source.pending == 0, 60, "the events before the outage acknowledged")
            assert pipeline.ready and _sink_up(outbox) == 1

            outage.refuse() if how == "refused" else outage.silence()
            during = _events(20, aggregates=5, start=11)
            source.add(during)
            await eventually(
                lambda: not pipeline.ready and _sink_up(outbox) == 0,
                60,
                "the relay not ready and outbox_relay_up{component=sink} 0 while the broker is away",
            )
            # It stays so for as long as the broker is away and events wait, however many
            # publish calls come back with nothing but transient failures meanwhile.
            watch_until = time.monotonic() + 3
            while time.monotonic() < watch_until:
                assert source.pending == 20, "an event was acknowledged while the broker was away"
                assert not pipeline.ready and _sink_up(outbox) == 0, "marked up while the broker is away"
                await asyncio.sleep(0.05)

            outage.restore()
            await eventually(
                lambda: source.pending == 0 and pipeline.ready and _sink_up(outbox) == 1,
                90,
                "every event acknowledged, and ready with outbox_relay_up{component=sink} 1 again",
            )
        finally:
            stop.set()
            await asyncio.wait_for(running, 60)
        delivered = outage.read_back()
    ids = [message["event_id"] for message in delivered]
    assert sorted(ids) == sorted(e.event_id for e in before + during), "lost or repeated events"
    per_aggregate: dict[str, list[int]] = {}
    for message in delivered:
        per_aggregate.setdefault(message["aggregate_id"], []).append(message["position"])
    assert all(positions == sorted(positions) for positions in per_aggregate.values())
