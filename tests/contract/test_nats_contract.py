"""The sink contract, run against the NATS JetStream sink."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from outbox_relay.connectors.sinks.nats import NatsSink, NatsSinkConfig
from outbox_relay.interfaces import Sink
from outbox_relay.testing.sink_contract import Lines, SinkBackend, SinkContract
from tests.conftest import nats_message_as_line
from tests.contract.proxy import REFUSING_PORT, behind_proxy, port_of, with_port
from tests.harness.nats import NatsServer, read_stream


@pytest.fixture
def sink_backend(nats_server: NatsServer) -> Iterator[SinkBackend]:
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

    def read_back() -> Lines:
        return [
            nats_message_as_line(headers, data) for _, headers, data in read_stream(nats_server.url, stream)
        ]

    try:
        port = port_of(nats_server.url)
        yield SinkBackend(
            sink(nats_server.url),
            read_back,
            # Port 1 on loopback refuses connections: start() cannot reach any server.
            lambda: sink(f"nats://127.0.0.1:{REFUSING_PORT}"),
            lambda: behind_proxy(port, lambda via: sink(with_port(nats_server.url, via), 2), read_back),
        )
    finally:
        nats_server.delete_stream(stream)


class TestNatsSink(SinkContract):
    pass
