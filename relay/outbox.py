"""Producer-side helpers: write an event inside the application's own transaction.

    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute("UPDATE orders SET status = 'paid' WHERE id = %s", (order_id,))
        write_event(conn, "order", order_id, "OrderPaid", {"order_id": order_id, "amount": 42})

The event becomes visible to the relay exactly when the transaction commits, and never if it
rolls back. Serialize writes per aggregate (lock the aggregate's row first, as above) so that one
aggregate's events commit in position order.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from psycopg import AsyncConnection, AsyncCursor, Connection, Cursor, sql
from psycopg.types.json import Jsonb

from relay.identifiers import parse_table_name

_INSERT = (
    "INSERT INTO {table} (event_id, aggregate_type, aggregate_id, event_type, payload, headers)"
    " VALUES (%s, %s, %s, %s, %s, %s)"
)


@lru_cache(maxsize=64)
def _statement(table: str) -> sql.Composed:
    return sql.SQL(_INSERT).format(table=parse_table_name(table).identifier())


def _params(
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Any,
    headers: Mapping[str, str] | None,
    event_id: str | None,
) -> tuple[str, tuple[Any, ...]]:
    event_id = event_id or str(uuid.uuid4())
    if isinstance(payload, bytes):
        payload = payload.decode()
    body = Jsonb(json.loads(payload)) if isinstance(payload, str) else Jsonb(payload)
    return event_id, (
        event_id,
        aggregate_type,
        str(aggregate_id),
        event_type,
        body,
        Jsonb(dict(headers or {})),
    )


def write_event(
    conn_or_cursor: Connection[Any] | Cursor[Any],
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Any,
    headers: Mapping[str, str] | None = None,
    *,
    table: str = "public.outbox",
    event_id: str | None = None,
) -> str:
    """Insert one event into the outbox table; returns its event_id.

    `table` is written as in SQL and in the relay's config: `outbox`, `public.outbox`,
    `'"OutBox"'` for a mixed-case name (see relay.identifiers); an unqualified name is found
    through the connection's search_path. A bad name raises relay.identifiers.IdentifierError.

    `payload` is any JSON-serializable value, or a JSON document as str/bytes. It does not commit:
    the caller's transaction decides.
    """
    event_id, params = _params(aggregate_type, aggregate_id, event_type, payload, headers, event_id)
    conn_or_cursor.execute(_statement(table), params)
    return event_id


async def write_event_async(
    conn_or_cursor: AsyncConnection[Any] | AsyncCursor[Any],
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Any,
    headers: Mapping[str, str] | None = None,
    *,
    table: str = "public.outbox",
    event_id: str | None = None,
) -> str:
    """`write_event` for psycopg's async connections and cursors."""
    event_id, params = _params(aggregate_type, aggregate_id, event_type, payload, headers, event_id)
    await conn_or_cursor.execute(_statement(table), params)
    return event_id


def emit_event(
    conn_or_cursor: Connection[Any] | Cursor[Any],
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Any,
    headers: Mapping[str, str] | None = None,
    *,
    prefix: str = "outbox",
    event_id: str | None = None,
) -> str:
    """Write an event as a transactional WAL message, for `postgres-logical` in `message` mode:
    no table, nothing to vacuum. The message is decoded only if the transaction commits.

    The message content (write the same JSON from any language with
    `SELECT pg_logical_emit_message(true, 'outbox', '<json>')`):
    {"event_id": "...", "aggregate_type": "...", "aggregate_id": "...", "event_type": "...",
     "payload": <any JSON>, "headers": {"name": "value"}}
    """
    event_id = event_id or str(uuid.uuid4())
    if isinstance(payload, bytes | str):
        payload = json.loads(payload)
    content = message_content(event_id, aggregate_type, str(aggregate_id), event_type, payload, headers)
    conn_or_cursor.execute("SELECT pg_logical_emit_message(true, %s, %s)", (prefix, content))
    return event_id


def message_content(
    event_id: str,
    aggregate_type: str,
    aggregate_id: str | None,
    event_type: str,
    payload: Any,
    headers: Mapping[str, str] | None,
) -> str:
    """The JSON a message-mode event carries (what `postgres-logical` in message mode decodes)."""
    return json.dumps(
        {
            "event_id": event_id,
            "aggregate_type": aggregate_type,
            "aggregate_id": aggregate_id,
            "event_type": event_type,
            "payload": payload,
            "headers": dict(headers or {}),
        },
        separators=(",", ":"),
    )
