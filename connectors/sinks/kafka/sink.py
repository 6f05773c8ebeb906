"""The `kafka` sink: its lifecycle (producer handles, the start-up probe, close and discard) over
the publishing of `publishing.Publisher`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from outbox_relay.connectors.sinks.kafka.config import KafkaSinkConfig, partition_order_survives_retries
from outbox_relay.connectors.sinks.kafka.outcomes import kafka_text
from outbox_relay.connectors.sinks.kafka.producer import ProducerHandle
from outbox_relay.connectors.sinks.kafka.publishing import Publisher
from outbox_relay.events import OutboxEvent, PublishResult
from outbox_relay.interfaces import ConnectorError, Sink, SinkFeatures
from outbox_relay.logs import get_logger
from outbox_relay.secrets import MASK, is_secret_key, scrubber

if TYPE_CHECKING:
    from confluent_kafka import Producer

# librdkafka scans for timed-out messages once a second, so reports arrive up to ~1 s after
# message.timeout.ms; the margin keeps our own bound from firing before librdkafka's.
_WAIT_MARGIN_S = 2.0
_PROBE_TIMEOUT_MAX_S = 10.0


class KafkaSink(Sink):
    """Contract (on top of `Sink`): `publish` hands every event of the call to librdkafka at once
    and waits, without blocking the event loop, for every delivery report, at most
    delivery_timeout plus a small margin in total. None means a delivery report without error
    (acks=all by default); a Failure names the topic and is `permanent` when resending the same
    bytes to the same topic cannot succeed. `publish` raises only when the sink is not started."""

    kind = "kafka"

    def __init__(self, config: KafkaSinkConfig) -> None:
        self.config = config
        self._settings = config.producer_settings()
        for secret in config.secrets():  # (also when the config did not come from a file)
            scrubber.remember(secret)
        self._log = get_logger(sink="kafka")
        self._handle: ProducerHandle | None = None
        self._wait_bound = config.delivery_timeout + _WAIT_MARGIN_S + 0.1 * config.delivery_timeout
        self._publisher = Publisher(config, self._log, self._wait_bound)
        self.features = SinkFeatures(
            keeps_order=partition_order_survives_retries(self._settings) and self._publisher.per_aggregate
        )
        self._probe_timeout = min(max(config.delivery_timeout, 1.0), _PROBE_TIMEOUT_MAX_S)

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the producer and make sure the cluster answers a metadata request."""
        if self._handle is not None and self._handle.broken is None:
            return
        self._replace_handle()
        try:
            assert self._handle is not None
            # Asked twice: see `_probe`.
            await asyncio.to_thread(self._probe, self._handle.producer, 2)
        except BaseException:
            await self._drop_handle()
            raise

    async def check(self) -> None:
        handle = self._handle
        if handle is not None and handle.broken is None:
            await asyncio.to_thread(self._probe, handle.producer)
            return
        probe = ProducerHandle(self._settings, self._log)
        try:
            await asyncio.to_thread(self._probe, probe.producer)
        finally:
            probe.retire(0)
            await asyncio.to_thread(probe.join, _PROBE_TIMEOUT_MAX_S)

    async def close(self) -> None:
        """Deliver what is queued for at most delivery_timeout, then drop the producer."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        handle.retire(self.config.delivery_timeout)
        await asyncio.to_thread(handle.join, self._wait_bound)

    async def discard(self) -> None:
        """Purge what librdkafka still queues (sent after the lease was lost, it would reach
        the topic after the new holder's newer events), then drop the producer."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        handle.retire(0)
        await asyncio.to_thread(handle.join, self._wait_bound)

    def describe(self) -> dict[str, object]:
        return {
            "bootstrap_servers": self.config.bootstrap_servers,
            "topic": self.config.topic,
            "key": self.config.key,
            "format": self.config.format,
            "delivery_timeout": self.config.delivery_timeout,
            "producer": {k: (MASK if is_secret_key(k) else v) for k, v in sorted(self._settings.items())},
        }

    # --- publish -------------------------------------------------------------------------------

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        if not events:
            return []
        if self._handle is None:
            raise ConnectorError("kafka sink is not started")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_bound
        results: list[PublishResult] = [None] * len(events)
        todo = list(range(len(events)))
        # One extra round for events refused because the producer went bad (fenced): a fresh
        # producer gets a new producer id and usually delivers them within the same call.
        for _round in range(2):
            handle = self._usable_handle()
            retry = await self._publisher.publish_round(handle, events, todo, results, deadline)
            if not retry or loop.time() >= deadline:
                break
            todo = retry
        return results

    # --- helpers -------------------------------------------------------------------------------

    def _usable_handle(self) -> ProducerHandle:
        handle = self._handle
        if handle is None:
            raise ConnectorError("kafka sink is not started")
        if handle.broken is not None:
            self._replace_handle()
            assert self._handle is not None
            return self._handle
        return handle

    def _replace_handle(self) -> None:
        old = self._handle
        self._handle = ProducerHandle(self._settings, self._log)
        if old is not None:
            # Its in-flight messages may still be acknowledged; their callers are waiting.
            old.retire(self.config.delivery_timeout)

    async def _drop_handle(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.retire(0)
            await asyncio.to_thread(handle.join, _PROBE_TIMEOUT_MAX_S)

    def _probe(self, producer: Producer, requests: int = 1) -> None:
        """Blocking: `requests` metadata requests, each bounded by the probe timeout.

        `start` asks twice: librdkafka answers the first request from a bootstrap connection,
        which it then drops, and the second connects to a broker the cluster advertised. An
        idempotent producer obtains its producer id only from such a broker, and when none is
        up at its creation it waits for a 500 ms retry timer (1 s now and then). Connected
        during start-up, the producer has its id about 50 ms later: measured here, 12 of 12
        starts instead of 10 of 12 with one request and 0 of 12 with none."""
        from confluent_kafka import KafkaException

        where = f"kafka at {self.config.bootstrap_servers}"
        for _request in range(requests):
            try:
                metadata = producer.list_topics(timeout=self._probe_timeout)
            except KafkaException as exc:
                reason = scrubber.scrub(kafka_text(exc))
                within = f"within {self._probe_timeout:g}s"
                raise ConnectorError(f"{where} did not answer {within}: {reason}") from None
            if not metadata.brokers:
                raise ConnectorError(f"{where} answered without any broker in its metadata")
