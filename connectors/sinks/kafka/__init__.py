"""Sink `kafka`: produces every event to a Kafka topic with confluent-kafka (librdkafka).

An acknowledgement is a delivery report without error from a producer configured with
`acks=all` (the default here): every in-sync replica has the message. With
`enable.idempotence=true` (also the default) librdkafka's own retries cannot duplicate or reorder
messages within a partition, so the only duplicates left are the relay's at-least-once re-sends.

`confluent_kafka` is imported inside functions only, so that a config naming this sink validates
(and `check` can say which extra to install) on an installation without the `kafka` extra.

The package: `config` (settings and their checks), `outcomes` (librdkafka's errors as results),
`producer` (one producer and its poll thread), `publishing` (one publish call), `sink` (the
lifecycle) and `reader` (reads deliveries back for the drill and the tests).
"""

from __future__ import annotations

from outbox_relay.connectors.sinks.kafka.config import (
    SAFE_DEFAULTS,
    KafkaSinkConfig,
    ProducerValue,
    validate_offline,
)
from outbox_relay.connectors.sinks.kafka.reader import KafkaReader
from outbox_relay.connectors.sinks.kafka.sink import KafkaSink
from outbox_relay.registry import SinkPlugin

__all__ = [
    "SAFE_DEFAULTS",
    "KafkaReader",
    "KafkaSink",
    "KafkaSinkConfig",
    "ProducerValue",
    "plugin",
    "validate_offline",
]

plugin = SinkPlugin(
    type="kafka",
    config=KafkaSinkConfig,
    factory=KafkaSink,
    requires=("confluent_kafka",),
    extra="kafka",
    reader=KafkaReader,
    validate=validate_offline,
)
