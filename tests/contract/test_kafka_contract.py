"""The sink contract, run against the Kafka sink and a Kafka-protocol broker."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from outbox_relay.connectors.sinks.kafka import KafkaSink, KafkaSinkConfig
from outbox_relay.interfaces import Sink
from outbox_relay.testing.sink_contract import Lines, Outage, SinkBackend, SinkContract
from tests.conftest import kafka_message_as_line
from tests.contract.proxy import REFUSING_PORT
from tests.harness.kafka import BOOTSTRAP_ENV_VAR, KafkaBroker, start_kafka_behind
from tests.harness.proxy import SwitchableProxy


def _sink(bootstrap_servers: str, topic: str, delivery_timeout: float) -> Sink:
    return KafkaSink(
        KafkaSinkConfig(
            type="kafka", bootstrap_servers=bootstrap_servers, topic=topic, delivery_timeout=delivery_timeout
        )
    )


def _read_back(kafka: KafkaBroker, topic: str) -> Lines:
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
def _outage(kafka: KafkaBroker, topic: str) -> Iterator[Outage]:
    # A broker of its own, which advertises the proxy's address: a Kafka client connects to the
    # addresses the cluster advertises, so a proxy in front of a shared broker would be bypassed
    # after the bootstrap.
    if os.environ.get(BOOTSTRAP_ENV_VAR):  # (a Kafka container is fine: the broker here is new)
        pytest.skip("an external Kafka cluster cannot be put behind a proxy")
    with SwitchableProxy(REFUSING_PORT) as proxy, start_kafka_behind(proxy) as behind:
        target = behind.port
        assert target is not None
        behind.create_topic(topic, partitions=3)
        yield Outage(
            _sink(behind.bootstrap_servers, topic, 3.0),
            lambda: _read_back(behind, topic),
            refuse=lambda: proxy.switch(REFUSING_PORT),
            silence=proxy.silence,
            restore=lambda: proxy.switch(target),
        )


@pytest.fixture
def sink_backend(kafka: KafkaBroker) -> SinkBackend:
    topic = f"contract-{uuid.uuid4().hex}"  # one per test: nothing to clean up, nothing shared
    kafka.create_topic(topic, partitions=3)  # several partitions, so per-key order is really tested
    return SinkBackend(
        _sink(kafka.bootstrap_servers, topic, 10.0),
        lambda: _read_back(kafka, topic),
        # Port 1 on loopback refuses connections: start() cannot reach any broker.
        lambda: _sink(f"127.0.0.1:{REFUSING_PORT}", topic, 1.0),
        lambda: _outage(kafka, topic),
    )


class TestKafkaSink(SinkContract):
    pass
