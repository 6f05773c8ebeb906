"""Reads back what the `kafka` sink delivered (for the drill and the tests)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from outbox_relay.connectors.sinks.kafka.config import KafkaSinkConfig
from outbox_relay.interfaces import Delivered, DeliveryReader


class KafkaReader(DeliveryReader):
    """Reads the sink's topics from the beginning of every partition, by explicit assignment (no
    consumer group to join, nothing committed); topics that do not exist yet are assigned as
    soon as they appear."""

    def __init__(self, config: KafkaSinkConfig) -> None:
        self._config = config
        self._topics: set[str] = set()
        self._assigned: set[str] = set()
        self._consumer: Any = None

    async def start(self, fields: Sequence[dict[str, str]]) -> None:
        from confluent_kafka import Consumer

        self._topics = {self._config.topic.format_map(f) for f in fields}
        # Connection and security settings apply to a consumer too; producer tuning does not.
        shared = {
            k: v
            for k, v in self._config.producer_settings().items()
            if k.startswith(("security.", "sasl.", "ssl.", "bootstrap."))
        }
        self._consumer = Consumer(
            {**shared, "group.id": f"outbox-relay-drill-{time.time_ns()}", "enable.auto.commit": False}
        )
        await asyncio.to_thread(self._assign_new)

    def _assign_new(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        missing = self._topics - self._assigned
        if not missing:
            return
        metadata = self._consumer.list_topics(timeout=5)
        partitions = []
        for topic in missing:
            found = metadata.topics.get(topic)
            if found is None or found.error is not None or not found.partitions:
                continue
            partitions += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in found.partitions]
            self._assigned.add(topic)
        if partitions:
            self._consumer.incremental_assign(partitions)

    def _consume(self) -> list[Delivered]:
        self._assign_new()
        delivered: list[Delivered] = []
        for message in self._consumer.consume(num_messages=10_000, timeout=0.2):
            if message.error() is not None:
                continue
            headers = {name: (value or b"").decode() for name, value in message.headers() or []}
            delivered.append(Delivered(headers, time.time()))
        return delivered

    async def poll(self) -> list[Delivered]:
        return await asyncio.to_thread(self._consume)

    async def close(self) -> None:
        if self._consumer is not None:
            await asyncio.to_thread(self._consumer.close)
            self._consumer = None
