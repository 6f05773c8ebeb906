"""Sink `file`: appends JSON lines to a file.

An acknowledgement means the lines were written to the operating system (they survive a crash
of the relay); with `fsync: true` also forced to disk (they survive a power loss). A write that
fails midway (disk full, file size limit) is cut off again, so the file never holds part of a
line in front of the lines written when the call is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import time
from collections.abc import Sequence
from io import FileIO
from typing import Any, Literal

import orjson
from pydantic import Field, field_validator

from outbox_relay.connectors.sinks.jsonlines import encode_lines
from outbox_relay.events import OutboxEvent, PublishResult
from outbox_relay.files import file_kind
from outbox_relay.interfaces import ConnectorError, Delivered, DeliveryReader, Sink, SinkFeatures
from outbox_relay.registry import ConnectorConfig, SinkPlugin


class FileSinkConfig(ConnectorConfig):
    type: Literal["file"]
    path: str = Field(min_length=1, description="File to append JSON lines to; created if missing.")
    fsync: bool = Field(default=False, description="fsync after every batch.")

    @field_validator("path")
    @classmethod
    def _not_a_directory(cls, value: str) -> str:
        if os.path.isdir(value):
            raise ValueError(
                f"{value} is a directory: name a file in it, e.g. {os.path.join(value, 'events.jsonl')}"
            )
        problem = not_a_regular_file(value)
        if problem is not None:
            raise ValueError(problem)
        return value


def not_a_regular_file(path: str, mode: int | None = None) -> str | None:
    """Why the sink cannot append to `path` as a file, or None: it exists (following symlinks)
    and is not a regular file. A FIFO would block the relay on open and on every write."""
    if mode is None:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return None  # (missing: created on start; unreadable: start says why)
    if stat.S_ISREG(mode):
        return None
    return f"{path} is {file_kind(mode)}, not a regular file: the file sink appends to a regular file"


class FileSink(Sink):
    kind = "file"
    features = SinkFeatures(keeps_order=True)

    def __init__(self, config: FileSinkConfig) -> None:
        self.config = config
        # Unbuffered: a failed write must not leave bytes in a buffer that a later write flushes.
        self._file: FileIO | None = None
        #: Where the file ends after the last complete write: a failed write is cut back to it.
        self._size = 0

    async def start(self) -> None:
        path = self.config.path
        problem = not_a_regular_file(path)
        if problem is not None:
            raise ConnectorError(f"cannot append to {problem}")
        # Without blocking: the path may have become a FIFO since, and opening one waits for a
        # reader (forever, the event loop with it); what is opened is checked before any write.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as exc:
            problem = not_a_regular_file(path)
            raise ConnectorError(
                f"cannot append to {problem}" if problem else f"cannot open {path}: {exc.strerror}"
            ) from None
        try:
            mode = os.fstat(fd).st_mode
            problem = not_a_regular_file(path, mode)
            if problem is not None:
                raise ConnectorError(f"cannot append to {problem}")
            os.set_blocking(fd, True)
            _drop_torn_last_line(path)
            self._file = open(fd, "ab", buffering=0, closefd=True)  # noqa: SIM115 - held for the sink's life
            self._size = os.fstat(fd).st_size
        except OSError as exc:
            os.close(fd)
            raise ConnectorError(f"cannot open {path}: {exc.strerror}") from None
        except ConnectorError:
            os.close(fd)
            raise

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        if self._file is None:
            raise ConnectorError("file sink is not started")
        encoded = encode_lines(events)
        data = memoryview(encoded)
        # The write has no await in it, so concurrent calls never interleave their lines; the
        # file's end moves past them before the fsync is awaited, so that another call's failed
        # write cuts back to after them, not into them.
        try:
            while data:  # a raw write may take only part of it
                written = self._file.write(data)
                if not written:  # (a regular file takes something or raises; never spin)
                    raise OSError(errno.EIO, "the write took nothing")
                data = data[written:]
        except OSError as exc:
            self._cut_back()
            raise ConnectorError(f"cannot write to {self.config.path}: {exc.strerror or exc}") from None
        self._size += len(encoded)
        if self.config.fsync:
            try:
                await asyncio.to_thread(os.fsync, self._file.fileno())
            except OSError as exc:  # written, not known to be durable: sent again (a repeat)
                raise ConnectorError(f"cannot sync {self.config.path}: {exc.strerror or exc}") from None
        return [None] * len(events)

    def _cut_back(self) -> None:
        """Drop what a failed write left after the last complete line (if even that fails, the
        next start cuts the torn line)."""
        assert self._file is not None
        with contextlib.suppress(OSError):
            os.ftruncate(self._file.fileno(), self._size)

    async def check(self) -> None:
        path = self.config.path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ConnectorError(f"cannot create {path}: directory {directory} does not exist")
        if os.path.isdir(path):
            raise ConnectorError(f"cannot append to {path}: it is a directory")
        problem = not_a_regular_file(path)
        if problem is not None:
            raise ConnectorError(f"cannot append to {problem}")
        if os.path.exists(path):
            if not os.access(path, os.W_OK):
                raise ConnectorError(f"cannot append to {path}: not writable")
        elif not os.access(directory, os.W_OK | os.X_OK):
            raise ConnectorError(f"cannot create {path}: directory {directory} is not writable")

    async def close(self) -> None:
        if self._file is not None:
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


class JsonLinesTail:
    """The JSON lines appended to a file since the last `read` (a line still being written is
    kept for the next one)."""

    def __init__(self, path: str, offset: int = 0) -> None:
        self._path = path
        self._offset = offset
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        if not os.path.exists(self._path):
            return []
        with open(self._path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        return [orjson.loads(line) for line in lines if line.strip()]


class FileReader(DeliveryReader):
    """Tails the sink's file from its current end."""

    def __init__(self, config: FileSinkConfig) -> None:
        self._path = config.path
        self._tail = JsonLinesTail(self._path)

    async def start(self, fields: Sequence[dict[str, str]]) -> None:
        self._tail = JsonLinesTail(
            self._path, os.path.getsize(self._path) if os.path.exists(self._path) else 0
        )

    async def poll(self) -> list[Delivered]:
        lines = self._tail.read()
        now = time.time()
        return [Delivered(line["headers"], now) for line in lines]


plugin = SinkPlugin(type="file", config=FileSinkConfig, factory=FileSink, reader=FileReader)
