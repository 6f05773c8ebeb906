"""The sink contract, run against the file sink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from outbox_relay.connectors.sinks.file import FileSink, FileSinkConfig
from outbox_relay.testing.sink_contract import SinkBackend, SinkContract
from tests.support import read_lines


class _DiskFull(FileSink):
    """A file sink whose disk fills up once it is started: its file is swapped for /dev/full,
    which fails every write with ENOSPC (the config refuses /dev/full itself: not a file)."""

    async def start(self) -> None:
        await super().start()
        assert self._file is not None
        full = os.open("/dev/full", os.O_WRONLY)
        try:
            os.dup2(full, self._file.fileno())
        finally:
            os.close(full)


@pytest.fixture
def sink_backend(tmp_path: Path) -> SinkBackend:
    path = tmp_path / "events.jsonl"
    return SinkBackend(
        FileSink(FileSinkConfig(type="file", path=str(path))),
        lambda: read_lines(path),
        lambda: _DiskFull(FileSinkConfig(type="file", path=str(tmp_path / "full.jsonl"))),
    )


class TestFileSink(SinkContract):
    pass
