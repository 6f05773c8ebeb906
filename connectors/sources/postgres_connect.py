"""Opening connections for the PostgreSQL sources: one place for the settings they share and
for turning a connection failure into a one-line error without the password."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg import sql
from pydantic import BaseModel, ConfigDict

from relay.events import OutboxEvent
from relay.interfaces import ConnectorError, Unsupported
from relay.pgsession import refuse_unusable, session_conninfo
from relay.secrets import scrubber


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


class EventColumns(BaseModel):
    """Where an outbox table keeps each field of an event. `headers` and `created_at` may be
    null when the table has no such column."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    event_id: str = "event_id"
    aggregate_type: str = "aggregate_type"
    aggregate_id: str = "aggregate_id"
    event_type: str = "event_type"
    payload: str = "payload"
    headers: str | None = "headers"
    created_at: str | None = "created_at"


async def connect(dsn: str, timeout: float, *, replication: bool = False) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection named `outbox-relay` in pg_stat_activity, with the relay's
    session settings (relay.pgsession: UTF-8, ISO dates in UTC, hex bytea); with `replication`,
    a `replication=database` connection for the streaming protocol. Raises ConnectorError, and
    Unsupported for a database the relay cannot serve."""
    extra: dict[str, Any] = {"replication": "database"} if replication else {}
    try:
        conn = await psycopg.AsyncConnection.connect(
            session_conninfo(dsn),
            autocommit=True,
            connect_timeout=max(1, int(timeout)),
            application_name="outbox-relay",
            **extra,
        )
    except psycopg.Error as exc:
        raise ConnectorError(scrubber.scrub(f"cannot connect to the database: {exc}")) from None
    try:
        refuse_unusable(conn)
    except Unsupported:
        await conn.close()
        raise
    return conn


def insert_event(
    table: str,
    columns: Mapping[str, str | None],
    event: OutboxEvent,
) -> tuple[sql.Composed, list[Any]]:
    """An INSERT that writes `event` into an outbox table with the given column mapping (keys:
    event_id, aggregate_type, aggregate_id, event_type, payload, and optionally headers,
    created_at). Used to put a dead-lettered event back in front of the relay."""
    values: dict[str, Any] = {
        "event_id": event.event_id,
        "aggregate_type": event.aggregate_type,
        "aggregate_id": event.aggregate_id,
        "event_type": event.event_type,
        # Text goes as an untyped literal, so json, jsonb and text columns all accept it.
        "payload": event.payload
        if event.content_type == "application/octet-stream"
        else event.payload.decode(),
        "headers": orjson.dumps(event.headers).decode(),
        "created_at": datetime.fromtimestamp(event.created_at, UTC),
    }
    names = [(columns[key], values[key]) for key in values if columns.get(key)]
    query = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        sql.Identifier(*table.split(".")),
        sql.SQL(", ").join(sql.Identifier(str(name)) for name, _ in names),
        sql.SQL(", ").join(sql.Placeholder() for _ in names),
    )
    return query, [value for _, value in names]
