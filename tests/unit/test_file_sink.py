from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from outbox_relay.connectors.sinks.file import FileSink, FileSinkConfig
from outbox_relay.connectors.sinks.jsonlines import encode_line
from outbox_relay.events import OutboxEvent
from outbox_relay.interfaces import ConnectorError
from outbox_relay.json_span import member_spans


async def test_a_line_torn_by_a_crash_is_cut_off_before_writing_again(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"event_id": "acked"}\n{"event_id": "torn", "payl')
    sink = FileSink(FileSinkConfig(type="file", path=str(path)))
    await sink.start()
    event = OutboxEvent(7, "again", "order", "o1", "Created", b"{}", {}, 0.0)
    assert await sink.publish([event]) == [None]
    await sink.close()
    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"event_id": "acked"}'
    assert lines[1].startswith(b'{"event_id":"again"')
    assert len(lines) == 2


def test_a_json_payload_written_over_several_lines_stays_one_line_with_the_same_value() -> None:
    pretty = b'{\n  "order": 7,\r\n  "items": ["a",\n "b"]\n}'
    event = OutboxEvent(1, "e-1", "order", "7", "Created", pretty, {}, 0.0)
    line = encode_line(event)
    assert line.count(b"\n") == 1
    assert line.endswith(b"\n")
    assert b"\r" not in line
    assert orjson.loads(line)["payload"] == {"order": 7, "items": ["a", "b"]}


def test_a_json_payload_keeps_its_bytes_and_only_its_raw_line_breaks_become_spaces() -> None:
    payload = b'{\r\n "a": 123456789012345678901234567890,\n "price": 1.10, "n": 1e2, "s": "\\n\\u0000"\n}'
    line = encode_line(OutboxEvent(1, "e-1", "order", "7", "Created", payload, {}, 0.0))
    start, end = member_spans(line[:-1], ["payload"])["payload"]
    assert line[start:end] == payload.replace(b"\r", b" ").replace(b"\n", b" ")


_WRITE_UNTIL_THE_SIZE_LIMIT = """
import asyncio, os, resource, signal, sys
from outbox_relay.connectors.sinks.file import FileSink, FileSinkConfig
from outbox_relay.interfaces import ConnectorError
from tests.sink_support import make_events

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG


async def main(path: str) -> None:
    sink = FileSink(FileSinkConfig(type="file", path=path))
    await sink.start()
    assert await sink.publish(make_events(5, 5)) == [None] * 5
    size = os.path.getsize(path)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 300, hard))  # the next call stops midway
    later = make_events(5, 5, start=6)
    try:
        await sink.publish(later)
    except ConnectorError as exc:
        print("refused:", exc)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    assert await sink.publish(later) == [None] * 5  # the pipeline's retry
    await sink.close()


asyncio.run(main(sys.argv[1]))
"""


def test_a_write_that_fails_midway_leaves_no_torn_line_in_front_of_the_retried_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    done = subprocess.run(  # in a child process: the file size limit applies to the whole process
        [sys.executable, "-c", _WRITE_UNTIL_THE_SIZE_LIMIT, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert "refused: cannot write to" in done.stdout
    assert "File too large" in done.stdout
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [line["position"] for line in lines] == list(range(1, 11))


_CONCURRENT_CALLS_WITH_FSYNC = """
import asyncio, os, resource, signal, sys
from outbox_relay.connectors.sinks.file import FileSink, FileSinkConfig
from outbox_relay.interfaces import ConnectorError
from tests.sink_support import make_events

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


async def main(path: str) -> None:
    sink = FileSink(FileSinkConfig(type="file", path=path, fsync=True))
    await sink.start()
    first, second = make_events(5, 5), make_events(50, 5, start=6)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4000, hard))  # the first call fits, the second not
    results = await asyncio.gather(sink.publish(first), sink.publish(second), return_exceptions=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    await sink.close()
    assert results[0] == [None] * 5, results[0]
    assert isinstance(results[1], ConnectorError), results[1]
    with open(path, "rb") as handle:
        lines = handle.read().splitlines()
    written = {line.split(b'"event_id":"')[1].split(b'"')[0].decode() for line in lines}
    assert written == {e.event_id for e in first}, "an acknowledged call's lines were cut away"
    print("ok")


asyncio.run(main(sys.argv[1]))
"""


def test_a_failed_write_never_cuts_away_the_lines_of_a_call_still_syncing(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", _CONCURRENT_CALLS_WITH_FSYNC, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok" in done.stdout, done.stdout + done.stderr


class _Hung(BaseException):
    """Raised by SIGALRM: start() blocked (opening a FIFO waits for a reader forever)."""


def _hung(signum: int, frame: object) -> None:
    raise _Hung("start() blocked for 5 s")


async def _start_within_5_s(sink: FileSink) -> None:
    # A blocked open() holds the event loop, so asyncio cannot time it out: a signal interrupts it.
    signal.signal(signal.SIGALRM, _hung)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        await sink.start()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


async def test_a_path_that_became_a_fifo_after_loading_is_refused_by_start_without_blocking(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.jsonl"
    sink = FileSink(FileSinkConfig(type="file", path=str(path)))  # (load refuses a FIFO already there)
    os.mkfifo(path)
    with pytest.raises(ConnectorError, match="is a FIFO, not a regular file"):
        await _start_within_5_s(sink)


async def test_a_fifo_with_a_reader_is_refused_by_start_rather_than_written_to(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = FileSink(FileSinkConfig(type="file", path=str(path)))
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(ConnectorError, match="is a FIFO, not a regular file"):
            await _start_within_5_s(sink)
    finally:
        os.close(reader)
        await sink.close()


def test_loading_a_file_sink_whose_path_is_a_fifo_names_the_path_key(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    os.mkfifo(path)
    with pytest.raises(ValidationError) as caught:
        FileSinkConfig(type="file", path=str(path))
    error = caught.value.errors()[0]
    assert error["loc"] == ("path",)
    assert "is a FIFO, not a regular file" in error["msg"]


async def test_a_path_whose_directory_is_missing_or_is_a_directory_is_a_setup_problem_naming_sink_path(
    tmp_path: Path,
) -> None:
    from outbox_relay.interfaces import ConnectorError
    from outbox_relay.problems import setup_problem

    (tmp_path / "file").write_text("")
    for path in (tmp_path / "missing" / "out.jsonl", tmp_path / "later", tmp_path / "file" / "out.jsonl"):
        sink = FileSink(FileSinkConfig(type="file", path=str(path)))
        if path.name == "later":
            path.mkdir()  # (the config refuses a directory: it became one after the config was read)
        try:
            await sink.start()
        except ConnectorError as exc:
            problem = setup_problem(exc)
        else:
            raise AssertionError(f"{path} was opened")
        finally:
            await sink.close()
        assert problem is not None, (path, problem)
        assert problem.kind == "path does not exist", (path, problem)
        assert "sink.path" in problem.fix
