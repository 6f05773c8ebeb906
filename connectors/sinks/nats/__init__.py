"""Sink `nats`: publishes every event to a NATS JetStream stream (nats-py) and waits for its PubAck.

An acknowledgement is a JetStream PubAck for that message: the stream stored it (on disk with the
default file storage, on a quorum of replicas for a replicated stream). A PubAck that does not
arrive within `ack_timeout`, and a connection lost before it, are transient failures; the
pipeline retries them, so an event without a PubAck is never marked published.

Every message carries `Nats-Msg-Id: <event_id>`. JetStream drops a message whose id it already
stored within the stream's `duplicate_window` (default 2 minutes) and answers with a PubAck marked
`duplicate`: a re-send after a timeout or a relay restart within that window does not reach
consumers twice. Older repeats still can (at-least-once); consumers dedupe by `event_id`.

PubAcks are pipelined: one call publishes all of its events on the connection with a reply
subject each, then waits once for all the PubAcks. (nats-py's `publish_async` does the same, but
in 2.16 a JetStream error reply raises inside its callback and leaves the future unresolved, so a
refused message would look like a timeout; the sink therefore reads the replies itself.)

Reconnecting is nats-py's job (it retries forever, `reconnect_wait` apart); while it reconnects,
publish reports transient failures at once instead of buffering blindly.

`nats` is imported inside methods only, so that a config naming this sink validates (and `check`
can say which extra to install) on an installation without the `nats` extra.

The parts: `config` (the YAML), `subjects` (subject templates and stream subjects, pure),
`sink` (publishing), `pending` (what waits for a PubAck), `outcomes` (what the server's answers
mean, pure), `connection` (connecting, the stream, the client's callbacks).
"""

from __future__ import annotations

from outbox_relay.connectors.sinks.nats.config import NatsSinkConfig, redact_server, stream_subjects_problems
from outbox_relay.connectors.sinks.nats.outcomes import permissions_violation
from outbox_relay.connectors.sinks.nats.sink import NatsSink
from outbox_relay.connectors.sinks.nats.subjects import default_subjects, subject_problem, subjects_collide
from outbox_relay.registry import SinkPlugin

__all__ = [
    "NatsSink",
    "NatsSinkConfig",
    "default_subjects",
    "permissions_violation",
    "plugin",
    "redact_server",
    "stream_subjects_problems",
    "subject_problem",
    "subjects_collide",
]

plugin = SinkPlugin(
    type="nats",
    config=NatsSinkConfig,
    factory=NatsSink,
    requires=("nats",),
    extra="nats",
    validate=stream_subjects_problems,
)
