"""Sink `file`: appends JSON lines to a file.

An acknowledgement means the lines were written and flushed to the operating system (they
survive a crash of the relay); with `fsync: true` also forced to disk (they survive a power loss).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import BinaryIO, Literal

from pydantic import Field

from connectors.sinks.jsonlines import encode_lines
from relay.events import OutboxEvent, PublishResult
from relay.interfaces import ConnectorError, Sink
from relay.registry import ConnectorConfig, SinkPlugin


class FileSinkConfig(ConnectorConfig):
    type: Literal["file"]
    path: str = Field(min_length=1, description="File to append JSON lines to; created if missing.")
    fsync: bool = Field(default=False, description="fsync after every batch.")


class FileSink(Sink):
    kind = "file"

    def __init__(self, config: FileSinkConfig) -> None:
        self.config = config
        self._file: BinaryIO | None = None

    async def start(self) -> None:
        try:
            self._file = open(self.config.path, "ab")  # noqa: SIM115 - held open for the sink's life
        except OSError as exc:
            raise ConnectorError(f"cannot open {self.config.path}: {exc.strerror}") from None

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        if self._file is None:
            raise ConnectorError("file sink is not started")
        self._file.write(encode_lines(events))
        self._file.flush()
        if self.config.fsync:
            await asyncio.to_thread(os.fsync, self._file.fileno())
        return [None] * len(events)

    async def check(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.config.path))
        if not os.access(directory, os.W_OK):
            raise ConnectorError(f"cannot write to {directory}")

    async def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            if self.config.fsync:
                os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def describe(self) -> dict[str, object]:
        return {"path": self.config.path, "fsync": self.config.fsync}


plugin = SinkPlugin(type="file", config=FileSinkConfig, factory=FileSink)
