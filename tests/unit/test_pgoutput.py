from __future__ import annotations

import struct

from outbox_relay.connectors.sources import pgoutput


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def test_relation_and_insert_messages_decode_to_column_names_and_text_values() -> None:
    relation = (
        b"R"
        + struct.pack("!I", 16385)
        + _cstr("public")
        + _cstr("outbox")
        + b"d"
        + struct.pack("!H", 2)
        + b"\x01" + _cstr("position") + struct.pack("!Ii", 20, -1)
        + b"\x00" + _cstr("payload") + struct.pack("!Ii", 3802, -1)
    )  # fmt: skip
    decoded = pgoutput.decode(relation)
    assert decoded == pgoutput.Relation(16385, "public", "outbox", ("position", "payload"), (20, 3802))
    insert = b"I" + struct.pack("!I", 16385) + b"N" + struct.pack("!H", 3)
    insert += b"t" + struct.pack("!i", 2) + b"42" + b"n" + b"t" + struct.pack("!i", 8) + b'{"a": 1}'
    assert pgoutput.decode(insert) == pgoutput.Insert(16385, [b"42", None, b'{"a": 1}'])


def test_begin_commit_and_transactional_message_carry_their_positions() -> None:
    begin = b"B" + struct.pack("!QqI", 0x1_0000_0100, 5_000_000, 777)
    assert pgoutput.decode(begin) == pgoutput.Begin(0x1_0000_0100, 5_000_000, 777)
    commit = b"C" + struct.pack("!BQQq", 0, 0x1_0000_0100, 0x1_0000_0130, 5_000_000)
    assert pgoutput.decode(commit) == pgoutput.Commit(0x1_0000_0100, 0x1_0000_0130, 5_000_000)
    content = b'{"event_id": "e"}'
    message = b"M" + b"\x01" + struct.pack("!Q", 0xABC) + _cstr("outbox") + struct.pack("!I", len(content))
    assert pgoutput.decode(message + content) == pgoutput.Message(True, 0xABC, "outbox", content)


def test_updates_deletes_and_truncates_are_ignored() -> None:
    for kind in (b"U", b"D", b"T", b"Y", b"O"):
        assert pgoutput.decode(kind + b"\0" * 16) is None


def test_stream_frames_and_the_standby_status_update_round_trip() -> None:
    xlog = b"w" + struct.pack("!QQq", 10, 20, 0) + b"payload"
    assert pgoutput.parse_frame(xlog) == pgoutput.XLogData(10, 20, b"payload")
    keepalive = b"k" + struct.pack("!QqB", 99, 0, 1)
    assert pgoutput.parse_frame(keepalive) == pgoutput.Keepalive(99, True)
    status = pgoutput.standby_status(received=500, flushed=400, now_us=pgoutput.PG_EPOCH_OFFSET_US + 7)
    assert struct.unpack("!cQQQqB", status) == (b"r", 500, 400, 400, 7, 0)


def test_lsn_text_form_and_timestamps_convert() -> None:
    assert pgoutput.parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert pgoutput.format_lsn((0x16 << 32) | 0xB374D848) == "16/B374D848"
    assert pgoutput.pg_time_to_epoch(0) == 946_684_800.0
    assert pgoutput.timestamptz_text_to_epoch("2000-01-01 00:00:01.5+00") == 946_684_801.5
