"""Sink `stdout`: JSON lines on standard output, the demo's default and the reference sink.

An acknowledgement means the lines were written and flushed to the stdout pipe. Logs go to
stderr, so stdout carries only events.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import BinaryIO, Literal

from outbox_relay.connectors.sinks.jsonlines import encode_lines
from outbox_relay.events import OutboxEvent, PublishResult
from outbox_relay.interfaces import Sink, SinkFeatures
from outbox_relay.registry import ConnectorConfig, SinkPlugin


class StdoutSinkConfig(ConnectorConfig):
    type: Literal["stdout"]


class StdoutSink(Sink):
    kind = "stdout"
    features = SinkFeatures(keeps_order=True)

    def __init__(self, config: StdoutSinkConfig, stream: BinaryIO | None = None) -> None:
        self.config = config
        self._stream = stream

    def _out(self) -> BinaryIO:
        return self._stream if self._stream is not None else sys.stdout.buffer

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        out = self._out()
        out.write(encode_lines(events))
        out.flush()
        return [None] * len(events)

    async def close(self) -> None:
        self._out().flush()


plugin = SinkPlugin(type="stdout", config=StdoutSinkConfig, factory=StdoutSink)
