from __future__ import annotations

from pathlib import Path

from connectors.sinks.file import FileSink, FileSinkConfig
from relay.events import OutboxEvent


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
