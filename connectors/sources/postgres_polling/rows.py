"""Rows of the outbox table as events: the columns in the order `queries` selects them, turned
into events by the rule both PostgreSQL sources share (`row_events`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from outbox_relay.connectors.sources.row_events import rows_as_events
from outbox_relay.events import OutboxEvent


def position_stand_in(position: int) -> str:
    """The event id of a row that has none: unique, as the dead-letter table keys on it."""
    return f"position-{position}"


def to_events(rows: Sequence[tuple[Any, ...]], *, content_type: str) -> list[OutboxEvent]:
    """One event per row, in row order, each acknowledged by its position (see
    `row_events.rows_as_events`: a row that cannot be relayed as it is becomes an event with a
    `defect`). The payload comes as bytes from a bytea column, as text from any other."""
    return rows_as_events(rows, time.time(), position_stand_in, content_type)
