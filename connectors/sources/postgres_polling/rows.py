"""Rows of the outbox table as events: the columns in the order `queries` selects them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from outbox_relay.connectors.sources.postgres_connect import null_column_defect
from outbox_relay.events import EARLIEST as _EARLIEST
from outbox_relay.events import LATEST as _LATEST
from outbox_relay.events import OutboxEvent, checked_time, headers_from_json


def to_events(
    rows: Sequence[tuple[Any, ...]], *, payload_is_bytes: bool, content_type: str
) -> list[OutboxEvent]:
    """One event per row, in row order; a row that cannot be relayed as it is (a NULL payload,
    headers that are not a JSON object, an unusable creation time) becomes an event with a
    `defect`, so it is dead-lettered instead of stopping the relay. (The hot path of a fetch:
    one loop, locals bound once.)"""
    events: list[OutboxEvent] = []
    append = events.append
    now = time.time()
    for position, event_id, agg_type, agg_id, event_type, payload, headers, created in rows:
        defect = None
        if payload is None:
            body = b""
            defect = "payload is NULL"
        else:
            body = payload if payload_is_bytes else payload.encode()
        if headers is None or headers == "{}":
            header_map: dict[str, str] = {}
        else:
            header_map, problem = headers_from_json(headers)
            defect = defect or problem
        defect = defect or null_column_defect(event_id, agg_type, agg_id, event_type)
        if created is None or not _EARLIEST <= created <= _LATEST:  # (else usable as it is)
            created, problem = checked_time(created, now)
            defect = defect or problem
        append(
            OutboxEvent(
                position,
                # A stand-in that stays unique: the dead-letter table keys on the event id.
                event_id if event_id is not None else f"position-{position}",
                agg_type or "",
                agg_id,
                event_type or "",
                body,
                header_map,
                created,
                ack_token=position,
                content_type=content_type,
                defect=defect,
            )
        )
    return events
