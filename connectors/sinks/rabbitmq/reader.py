"""Reads back what the `rabbitmq` sink delivered (for the drill and the tests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from outbox_relay.connectors.sinks.rabbitmq.config import RabbitMQSinkConfig
from outbox_relay.interfaces import ConnectorError, Delivered, DeliveryReader


class RabbitMQReader(DeliveryReader):
    """Binds a durable queue of its own to the sink's exchange, so that it receives a copy of
    everything routed there from now on, and drains it. The queue outlives a broker restart (an
    exclusive one would vanish with the connection) and expires 10 minutes after its last use.
    Blocking pika in a worker thread: a reader is for drills, not for the relay's event loop."""

    def __init__(self, config: RabbitMQSinkConfig) -> None:
        self._config = config
        self._connection: Any = None
        self._channel: Any = None
        self._queue = f"outbox-relay-drill-{time.time_ns()}"
        self._keys: set[str] = set()

    def _open(self) -> None:
        import pika

        config = self._config
        self._connection = pika.BlockingConnection(pika.URLParameters(config.url))
        self._channel = self._connection.channel()
        if config.declare:
            self._channel.exchange_declare(config.exchange, exchange_type=config.exchange_type, durable=True)
        self._channel.queue_declare(self._queue, durable=True, arguments={"x-expires": 600_000})
        for key in self._keys:
            self._channel.queue_bind(self._queue, config.exchange, key)

    def _setup(self, fields: Sequence[dict[str, str]]) -> None:
        config = self._config
        if config.exchange_type == "topic":
            self._keys = {"#"}
        elif config.exchange_type == "direct":
            self._keys = {config.routing_key.format_map(f) for f in fields}
        elif config.exchange_type == "fanout":
            self._keys = {""}
        else:  # a copy of every message cannot be had from headers or consistent-hash exchanges
            raise ConnectorError(f"drill cannot read back from a {config.exchange_type} exchange")
        self._open()

    async def start(self, fields: Sequence[dict[str, str]]) -> None:
        await asyncio.to_thread(self._setup, fields)

    def _drain(self) -> list[Delivered]:
        if self._connection is None or not self._connection.is_open:
            self._open()  # the broker restarted: the durable queue kept what arrived meanwhile
        delivered: list[Delivered] = []
        last_tag = None
        while len(delivered) < 10_000:
            # Acknowledged only once recorded: a connection lost mid-drain redelivers (a
            # duplicate in the report) instead of losing the message (a false "lost").
            method, properties, _body = self._channel.basic_get(self._queue, auto_ack=False)
            if method is None:
                break
            last_tag = method.delivery_tag
            raw = properties.headers or {}
            headers = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in raw.items()}
            delivered.append(Delivered(headers, time.time()))
        if last_tag is not None:
            self._channel.basic_ack(last_tag, multiple=True)
        else:
            self._connection.sleep(0.05)  # serves heartbeats while idle
        return delivered

    async def poll(self) -> list[Delivered]:
        try:
            return await asyncio.to_thread(self._drain)
        except Exception:
            self._connection = None  # reconnect on the next poll
            raise

    def _delete(self) -> None:
        if self._connection is None or not self._connection.is_open:
            self._open()
        self._channel.queue_delete(self._queue)
        self._connection.close()

    async def close(self) -> None:
        try:
            await asyncio.to_thread(self._delete)
        except Exception:
            pass  # the queue expires by itself
        self._connection = None
