"""The sink contract, run against the RabbitMQ sink."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from outbox_relay.connectors.sinks.rabbitmq import RabbitMQSink, RabbitMQSinkConfig
from outbox_relay.interfaces import Sink
from outbox_relay.testing.sink_contract import Lines, SinkBackend, SinkContract
from tests.conftest import rabbit_message_as_line
from tests.contract.proxy import REFUSING_PORT, behind_proxy, port_of, with_port
from tests.harness.rabbitmq import RabbitBroker, declare_queue, delete, drain_queue, queue_depth


@pytest.fixture
def sink_backend(rabbitmq: RabbitBroker) -> Iterator[SinkBackend]:
    exchange, queue = f"contract-{uuid.uuid4().hex}", f"contract-{uuid.uuid4().hex}"

    def sink(url: str) -> Sink:
        return RabbitMQSink(
            RabbitMQSinkConfig(type="rabbitmq", url=url, exchange=exchange, connect_timeout=2)
        )

    def read_back() -> Lines:
        messages = drain_queue(rabbitmq.url, queue, queue_depth(rabbitmq.url, queue), timeout=10)
        return [rabbit_message_as_line(m) for m in messages]

    first = sink(rabbitmq.url)
    declare_queue(rabbitmq.url, queue, exchange, "#", exchange_type="topic")
    try:
        port = port_of(rabbitmq.url)
        yield SinkBackend(
            first,
            read_back,
            # Port 1 on loopback refuses connections: start() cannot reach any broker.
            lambda: sink(f"amqp://guest:guest@127.0.0.1:{REFUSING_PORT}/"),
            lambda: behind_proxy(port, lambda via: sink(with_port(rabbitmq.url, via)), read_back),
        )
    finally:
        delete(rabbitmq.url, queues=[queue], exchanges=[exchange])


class TestRabbitMQSink(SinkContract):
    pass
