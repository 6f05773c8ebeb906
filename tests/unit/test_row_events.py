"""The rule both PostgreSQL sources apply to turn a row into an event (`row_events`), and that
each source reads its rows through it: the polling source's rows from its select list, the
logical source's inserted tuples in their text form."""

from __future__ import annotations

from outbox_relay.connectors.sources import pgoutput
from outbox_relay.connectors.sources.postgres_logical.decoding import TableShape, row_event
from outbox_relay.connectors.sources.postgres_logical.ledger import Unit
from outbox_relay.connectors.sources.postgres_polling.rows import to_events
from outbox_relay.connectors.sources.row_events import RowFields, rows_as_events
from outbox_relay.events import LATEST

_CREATED = 1_700_000_000.0
_FALLBACK = 1_800_000_000.0
_GOOD: RowFields = (7, "e-7", "order", "o-1", "created", '{"a": 1}', '{"k": "v"}', _CREATED)


def _stand_in(position: int) -> str:
    return f"stand-in-{position}"


def _one(row: RowFields, ack_token: object = None) -> tuple[object, ...]:
    [event] = rows_as_events([row], _FALLBACK, _stand_in, "application/json", ack_token)
    return (
        event.position,
        event.event_id,
        event.aggregate_type,
        event.aggregate_id,
        event.event_type,
        event.payload,
        event.headers,
        event.created_at,
        event.ack_token,
        event.content_type,
        event.defect,
    )


def test_a_whole_row_becomes_its_event_with_text_sent_as_utf8_bytes() -> None:
    assert _one(_GOOD) == (
        7, "e-7", "order", "o-1", "created", b'{"a": 1}', {"k": "v"}, _CREATED, 7, "application/json", None,
    )  # fmt: skip
    assert _one((*_GOOD[:5], b"\x00\xff", *_GOOD[6:]))[5] == b"\x00\xff"


def test_the_ack_token_is_the_position_unless_one_is_given() -> None:
    unit = Unit()
    assert _one(_GOOD)[8] == 7
    assert _one(_GOOD, unit)[8] is unit


def test_empty_headers_read_alike_as_text_bytes_or_null() -> None:
    for empty in ("{}", b"{}", None):
        assert _one((*_GOOD[:6], empty, _CREATED))[6:] == ({}, _CREATED, 7, "application/json", None)


def test_a_row_that_cannot_be_relayed_is_a_defect_giving_the_first_reason() -> None:
    null_payload = (7, None, None, "o-1", "created", None, "[1]", float("inf"))
    event = _one(null_payload)
    assert event[1] == "stand-in-7"  # unique: the dead-letter table keys on it
    assert (event[2], event[5], event[10]) == ("", b"", "payload is NULL")
    assert _one((*_GOOD[:6], "[1]", _CREATED))[10] == "headers must be a JSON object"
    assert _one((7, "e-7", "order", None, "created", "{}", None, _CREATED))[10] == "aggregate id is NULL"
    late = _one((*_GOOD[:7], LATEST + 86_400))
    assert late[7] == _FALLBACK
    assert str(late[10]).startswith("created_at is not a representable time")


def test_a_null_created_at_takes_the_fallback_time_without_a_defect() -> None:
    assert _one((*_GOOD[:7], None))[7:] == (_FALLBACK, 7, "application/json", None)


def test_polling_rows_are_acknowledged_by_position_and_stand_in_by_position() -> None:
    [event] = to_events(
        [(9, None, "order", "o-1", "created", "{}", None, _CREATED)], content_type="text/plain"
    )
    assert (event.event_id, event.ack_token, event.content_type) == ("position-9", 9, "text/plain")
    assert event.defect == "event id is NULL"


def test_logical_tuples_decode_then_follow_the_same_rule() -> None:
    shape = TableShape((0, 1, 2, 3, 4, 5, 6), "application/octet-stream", payload_is_bytea=True)
    unit = Unit()
    values: list[bytes | None] = [None, b"order", b"o-1", b"created", b"\\x00ff", b"{}", None]
    event = row_event(values, shape, 0x10, _FALLBACK, unit)
    assert (event.event_id, event.payload, event.created_at) == (
        f"lsn-{pgoutput.format_lsn(0x10)}",
        b"\x00\xff",
        _FALLBACK,
    )
    assert (event.ack_token, event.defect) == (unit, "event id is NULL")
    broken = row_event(
        [b"e", b"order", b"o-1", b"created", b"\\xzz", None, None], shape, 0x10, _FALLBACK, unit
    )
    assert str(broken.defect).startswith("cannot decode the row")
