"""The sink contract, run against the stdout sink, its output redirected to a file as
`outbox-relay run > events.jsonl` does."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from outbox_relay.connectors.sinks.stdout import StdoutSink, StdoutSinkConfig
from outbox_relay.interfaces import Sink
from outbox_relay.testing.sink_contract import SinkBackend, SinkContract
from tests.support import read_lines


def _into_a_dead_pipe() -> Sink:
    dead_read, dead_write = os.pipe()
    os.close(dead_read)  # writing to a pipe nobody reads: EPIPE, as when the consumer died
    return StdoutSink(StdoutSinkConfig(type="stdout"), stream=os.fdopen(dead_write, "wb"))


@pytest.fixture
def sink_backend(tmp_path: Path) -> Iterator[SinkBackend]:
    path = tmp_path / "stdout.jsonl"
    stream: BinaryIO = path.open("wb")
    try:
        yield SinkBackend(
            StdoutSink(StdoutSinkConfig(type="stdout"), stream=stream),
            lambda: read_lines(path),
            _into_a_dead_pipe,
        )
    finally:
        stream.close()


class TestStdoutSink(SinkContract):
    pass
