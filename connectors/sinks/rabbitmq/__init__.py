"""Sink `rabbitmq`: publishes every event to a RabbitMQ exchange with publisher confirms (pika).

An acknowledgement is a publisher confirm (`basic.ack`) from the broker for that message: RabbitMQ
has routed it to every queue bound for it and, for the durable queues among them (the message is
persistent), written it to disk or to a quorum of replicas. A `basic.nack`, a message returned as
unroutable (`mandatory: true`, the default), a confirm that does not arrive within
`confirm_timeout`, and a connection or channel lost before the confirm are all failures: the
pipeline retries them, so an unconfirmed event is never marked published.

Confirms are pipelined: one call publishes all of its events, then waits once for their confirms
(RabbitMQ acknowledges several delivery tags at a time with `multiple`), instead of one round trip
per message. The connection is pika's asyncio adapter on the relay's own event loop: publishing
only writes frames into a buffer and every callback runs on the loop, so there is no thread and
nothing that blocks.

With `exchange_type: x-consistent-hash` (plugin `rabbitmq_consistent_hash_exchange`) the routing
key defaults to the aggregate id: bind N queues with a weight as binding key (for example `"1"`
each); the exchange hashes the aggregate id, so every aggregate sticks to one queue and its events
stay in order there, while the aggregates spread over the N queues (and their consumers).

`pika` is imported inside functions only, so that a config naming this sink validates (and `check`
can say which extra to install) on an installation without the `rabbitmq` extra.

The package: `config` (settings and their checks), `errors` (pika's and the broker's answers as
sentences and setup problems), `link` (one connection and channel, and the confirms it awaits),
`connection` (opening and closing a link), `sink` (publishing) and `reader` (reads deliveries
back for the drill and the tests).
"""

from __future__ import annotations

from outbox_relay.connectors.sinks.rabbitmq.config import (
    CONSISTENT_HASH_ROUTING_KEY,
    DEFAULT_ROUTING_KEY,
    ExchangeType,
    RabbitMQSinkConfig,
    validate_offline,
)
from outbox_relay.connectors.sinks.rabbitmq.link import message_properties
from outbox_relay.connectors.sinks.rabbitmq.reader import RabbitMQReader
from outbox_relay.connectors.sinks.rabbitmq.sink import RabbitMQSink
from outbox_relay.registry import SinkPlugin

__all__ = [
    "CONSISTENT_HASH_ROUTING_KEY",
    "DEFAULT_ROUTING_KEY",
    "ExchangeType",
    "RabbitMQReader",
    "RabbitMQSink",
    "RabbitMQSinkConfig",
    "message_properties",
    "plugin",
    "validate_offline",
]

plugin = SinkPlugin(
    type="rabbitmq",
    config=RabbitMQSinkConfig,
    factory=RabbitMQSink,
    requires=("pika",),
    extra="rabbitmq",
    reader=RabbitMQReader,
    validate=validate_offline,
)
