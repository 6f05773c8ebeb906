from __future__ import annotations

from pathlib import Path

import orjson

from connectors.sinks.file import FileSink, FileSinkConfig
from connectors.sinks.jsonlines import encode_line
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


def test_a_json_payload_written_over_several_lines_stays_one_line_with_the_same_value() -> None:
    pretty = b'{\n  "order": 7,\r\n  "items": ["a",\n "b"]\n}'
    event = OutboxEvent(1, "e-1", "order", "7", "Created", pretty, {}, 0.0)
    line = encode_line(event)
    assert line.count(b"\n") == 1 and line.endswith(b"\n") and b"\r" not in line
    assert orjson.loads(line)["payload"] == {"order": 7, "items": ["a", "b"]}
