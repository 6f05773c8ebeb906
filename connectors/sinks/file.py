"""Sink `file`: appends JSON lines to a file.

An acknowledgement means the lines were written and flushed to the operating system (they
survive a crash of the relay); with `fsync: true` also forced to disk (they survive a power loss).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from typing import BinaryIO, Literal

import orjson
from pydantic import Field

from connectors.sinks.jsonlines import encode_lines
from relay.events import OutboxEvent, PublishResult
from relay.interfaces import ConnectorError, Delivered, DeliveryReader, Sink
from relay.registry import ConnectorConfig, SinkPlugin


class FileSinkConfig(ConnectorConfig):
    type: Literal["file"]
    path: str = Field(min_length=1, description="File to append JSON lines to; created if missing.")
    fsync: bool = Field(default=False, description="fsync after every batch.")


class FileSink(Sink):
    kind = "file"
    keeps_order = True

    def __init__(self, config: FileSinkConfig) -> None:
        self.config = config
        self._file: BinaryIO | None = None

    async def start(self) -> None:
        try:
            _drop_torn_last_line(self.config.path)
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


def _drop_torn_last_line(path: str) -> None:
    """A relay killed in the middle of a write leaves a partial last line. Its events were never
    acknowledged (the write had not returned), so they will be written again: cut the fragment
    off instead of leaving a corrupt line in front of them."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            chunk = handle.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline != -1:
                end = start + newline + 1
                break
            end = start
        if end != size:
            handle.truncate(end)


class FileReader(DeliveryReader):
    """Tails the sink's file from its current end."""

    def __init__(self, config: FileSinkConfig) -> None:
        self._path = config.path
        self._offset = 0
        self._partial = b""

    async def start(self, fields: Sequence[dict[str, str]]) -> None:
        self._offset = os.path.getsize(self._path) if os.path.exists(self._path) else 0

    async def poll(self) -> list[Delivered]:
        if not os.path.exists(self._path):
            return []
        with open(self._path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        self._offset += len(chunk)
        now = time.time()
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        return [Delivered(orjson.loads(line)["headers"], now) for line in lines if line.strip()]


plugin = SinkPlugin(type="file", config=FileSinkConfig, factory=FileSink, reader=FileReader)
