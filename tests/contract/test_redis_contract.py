"""The sink contract, run against the Redis Streams sink."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
import redis

from outbox_relay.connectors.sinks.redis_streams import RedisSinkConfig, RedisStreamsSink
from outbox_relay.interfaces import Sink
from outbox_relay.testing.sink_contract import Lines, SinkBackend, SinkContract
from tests.conftest import redis_entry_as_line
from tests.contract.proxy import REFUSING_PORT, behind_proxy, port_of, with_port
from tests.harness.redis import RedisServer, unique_prefix


@pytest.fixture
def sink_backend(redis_server: RedisServer) -> Iterator[SinkBackend]:
    prefix = unique_prefix("contract")  # the server may be shared: keys of this test's own

    def sink(url: str) -> Sink:
        return RedisStreamsSink(
            RedisSinkConfig(
                type="redis", url=url, stream=prefix + ".{aggregate_type}", connect_timeout=2, timeout=2
            )
        )

    def read_back() -> Lines:
        client = redis.Redis.from_url(redis_server.url)
        try:
            # (a client without decode_responses: bytes throughout)
            entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(f"{prefix}.order"))
            return [redis_entry_as_line(fields) for _, fields in entries]
        finally:
            client.close()

    try:
        port = port_of(redis_server.url)
        yield SinkBackend(
            sink(redis_server.url),
            read_back,
            # Port 1 on loopback refuses connections: start() cannot reach any server.
            lambda: sink(f"redis://127.0.0.1:{REFUSING_PORT}/0"),
            lambda: behind_proxy(port, lambda via: sink(with_port(redis_server.url, via)), read_back),
        )
    finally:
        redis_server.delete_matching(f"{prefix}*")


class TestRedisStreamsSink(SinkContract):
    pass
