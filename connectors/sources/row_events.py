"""A row of an outbox table as an event: the rule both PostgreSQL sources apply to the fields
they read (the polling source from a query's rows, the logical source from inserted tuples), so
a row is relayed alike, or is a defect alike, whichever source reads it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from outbox_relay.events import EARLIEST as _EARLIEST
from outbox_relay.events import LATEST as _LATEST
from outbox_relay.events import OutboxEvent, checked_time, headers_from_json

#: The `headers` of a row that has none to give (the default table's column default), as text
#: or as bytes: no need to parse it.
_NO_HEADERS = ("{}", b"{}")


def null_column_defect(
    event_id: object, aggregate_type: object, aggregate_id: object, event_type: object
) -> str | None:
    """Why a row cannot become a publishable event because a column it needs is NULL, or None.
    (Both table sources apply the same rule, so a row is a defect in either mode or in neither.)"""
    if event_id is None:
        return "event id is NULL"
    if aggregate_type is None:
        return "aggregate type is NULL"
    if aggregate_id is None:
        return "aggregate id is NULL"
    if event_type is None:
        return "event type is NULL"
    return None


#: A row's fields as read, in the order of the polling source's select list: position, event id,
#: aggregate type, aggregate id, event type, payload (bytes, or text sent as its UTF-8 bytes),
#: headers (a JSON object as text or bytes), created_at (seconds since the epoch).
RowFields = tuple[
    int, str | None, str | None, str | None, str | None, bytes | str | None, str | bytes | None, float | None
]


def rows_as_events(
    rows: Iterable[RowFields],
    fallback_time: float,
    stand_in_id: Callable[[int], str],
    content_type: str,
    ack_token: Any = None,
) -> list[OutboxEvent]:
    """One event per row, in row order (see `row_as_event`). (The hot path of a polling fetch:
    a comprehension, no list method called per row.)"""
    return [row_as_event(row, fallback_time, stand_in_id, content_type, ack_token) for row in rows]


def row_as_event(
    row: RowFields,
    fallback_time: float,
    stand_in_id: Callable[[int], str],
    content_type: str,
    ack_token: Any = None,
) -> OutboxEvent:
    """The event of one row. A row that cannot be relayed as it is (a NULL payload or mapped
    column, headers that are not a JSON object, an unusable creation time) becomes an event with
    a `defect`, so it is dead-lettered instead of stopping the relay; the first reason found is
    given, in that order. `fallback_time` serves for a NULL `created_at`; a row without an event
    id gets `stand_in_id(position)`, unique, as the dead-letter table keys on the event id. The
    event's `ack_token` is `ack_token`, or its position when that is None. (The logical source
    calls it once per inserted row: each check costs a call only when it finds something.)"""
    position, event_id, aggregate_type, aggregate_id, event_type, payload, headers, created = row
    defect = None
    if payload is None:
        body, defect = b"", "payload is NULL"
    else:
        body = payload.encode() if isinstance(payload, str) else payload
    if headers is None or headers in _NO_HEADERS:
        header_map: dict[str, str] = {}
    else:
        header_map, problem = headers_from_json(headers)
        defect = defect or problem
    if defect is None and None in (event_id, aggregate_type, aggregate_id, event_type):
        defect = null_column_defect(event_id, aggregate_type, aggregate_id, event_type)
    if created is None or not _EARLIEST <= created <= _LATEST:  # (else usable as it is)
        created, problem = checked_time(created, fallback_time)
        defect = defect or problem
    return OutboxEvent(
        position,
        event_id if event_id is not None else stand_in_id(position),
        aggregate_type or "",
        aggregate_id,
        event_type or "",
        body,
        header_map,
        created,
        ack_token=position if ack_token is None else ack_token,
        content_type=content_type,
        defect=defect,
    )
