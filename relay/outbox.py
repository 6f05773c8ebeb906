"""Producer-side helpers: write an event inside the application's own transaction.

    with psycopg.connect(dsn) as conn, conn.transaction():
        conn.execute("UPDATE orders SET status = 'paid' WHERE id = %s", (order_id,))
        write_event(conn, "order", order_id, "OrderPaid", {"order_id": order_id, "amount": 42})

The event becomes visible to the relay exactly when the transaction commits, and never if it
rolls back. Serialize writes per aggregate (lock the aggregate's row first, as above) so that one
aggregate's events commit in position order.

A payload given as JSON text (str or bytes) is written as it is: the server checks it, and the
relay delivers it unchanged (a `json` or `text` column keeps it byte for byte, a `jsonb` column
as PostgreSQL renders it). Any other value is serialized once, with `json.dumps`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from psycopg import AsyncConnection, AsyncCursor, Connection, Cursor, sql
from psycopg.types.json import Jsonb

from outbox_relay import json_span
from outbox_relay.identifiers import parse_table_name

_INSERT = (
    "INSERT INTO {table} (event_id, aggregate_type, aggregate_id, event_type, payload, headers)"
    " VALUES (%s, %s, %s, %s, %s, %s)"
)


@lru_cache(maxsize=64)
def _statement(table: str) -> sql.Composed:
    return sql.SQL(_INSERT).format(table=parse_table_name(table).identifier())


def _json_text(payload: Any) -> str:
    """The payload as JSON text: str and bytes are JSON text already, anything else is
    serialized once (NaN and infinities are not JSON: refused here rather than by the server)."""
    if isinstance(payload, bytes):
        return payload.decode()
    if isinstance(payload, str):
        return payload
    return json.dumps(payload, separators=(",", ":"), allow_nan=False)


def _params(
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Any,
    headers: Mapping[str, str] | None,
    event_id: str | None,
) -> tuple[str, tuple[Any, ...]]:
    event_id = event_id or str(uuid.uuid4())
    return event_id, (
        event_id,
        aggregate_type,
        str(aggregate_id),
        event_type,
        # A str parameter goes untyped: the payload column (jsonb, json or text) parses it.
        _json_text(payload),
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

    `payload` is any JSON-serializable value, or a JSON document as str/bytes (UTF-8 text), for
    a payload column of type json, jsonb or text. (Into a bytea payload column write the row
    yourself with the bytes as a parameter: text sent there is read as bytea's escape format.)
    It does not commit: the caller's transaction decides.
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
     "headers": {"name": "value"}, "payload": <any JSON>}
    The relay delivers the text of the `payload` value exactly as it stands in the message.
    A payload given as JSON text is checked here (no server checks a message): ValueError if it
    is not JSON.
    """
    event_id = event_id or str(uuid.uuid4())
    text = _json_text(payload)
    if isinstance(payload, str | bytes):
        json_span.parse(text.encode())
    content = message_content(event_id, aggregate_type, str(aggregate_id), event_type, text, headers)
    conn_or_cursor.execute("SELECT pg_logical_emit_message(true, %s, %s)", (prefix, content))
    return event_id


def message_content(
    event_id: str,
    aggregate_type: str,
    aggregate_id: str | None,
    event_type: str,
    payload_json: str | bytes,
    headers: Mapping[str, str] | None,
) -> str:
    """The JSON a message-mode event carries (what `postgres-logical` in message mode decodes).
    `payload_json` is JSON text, placed into the message as it is (never parsed here)."""
    envelope = json.dumps(
        {
            "event_id": event_id,
            "aggregate_type": aggregate_type,
            "aggregate_id": aggregate_id,
            "event_type": event_type,
            "headers": dict(headers or {}),
        },
        separators=(",", ":"),
    )
    payload = payload_json.decode() if isinstance(payload_json, bytes) else payload_json
    return f'{envelope[:-1]},"payload":{payload}}}'
