"""The logical source's ordinary (non-replication) connection and what runs on it: the slot's
row for `backlog` and `status`, heartbeats that let an idle slot advance, and writing events
back (a drill, a replay from the dead-letter store) as an application would."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from outbox_relay import json_span
from outbox_relay.connectors.sources import pgoutput
from outbox_relay.connectors.sources.outbox_table import write_events
from outbox_relay.connectors.sources.postgres_connect import connect
from outbox_relay.connectors.sources.postgres_logical.config import PostgresLogicalConfig
from outbox_relay.events import OutboxEvent
from outbox_relay.identifiers import parse_table_name
from outbox_relay.interfaces import ConnectorError
from outbox_relay.outbox import message_content

HEARTBEAT_PREFIX = "outbox_relay_heartbeat"
_HEARTBEAT = "SELECT pg_logical_emit_message(true, %s, '')::text"


class SqlConnection:
    """One autocommit connection, opened when first needed and again when it broke."""

    def __init__(self, config: PostgresLogicalConfig) -> None:
        self._config = config
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def get(self) -> psycopg.AsyncConnection[Any]:
        """The connection, opened anew when there is none or it is closed or broken. Raises
        ConnectorError when the database cannot be reached."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await connect(self._config.dsn, self._config.connect_timeout)
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def heartbeat(self) -> int:
        """Write a heartbeat message to the WAL; its position. Every stream decodes it, so a
        relay idle in its outbox still confirms the slot forward (and the WAL can be recycled)."""
        row = await (await (await self.get()).execute(_HEARTBEAT, (HEARTBEAT_PREFIX,))).fetchone()
        return pgoutput.parse_lsn(row[0]) if row else 0

    async def slot_row(self) -> tuple[Any, ...] | None:
        """(lag in bytes, active, confirmed_flush_lsn text, active pid) of the configured slot;
        None when it does not exist."""
        cur = await (await self.get()).execute(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, active, confirmed_flush_lsn::text,"
            " active_pid FROM pg_replication_slots WHERE slot_name = %s",
            (self._config.slot,),
        )
        return await cur.fetchone()

    async def slot_status(self) -> str:
        """The slot's line in `outbox-relay status`."""
        row = await self.slot_row()
        if row is None:
            raise ConnectorError(
                f"replication slot {self._config.slot} is missing (run: outbox-relay init-db)"
            )
        lag, active, confirmed, pid = row
        state = f"active (pid {pid})" if active else "inactive"
        return f"slot {self._config.slot}: lag_bytes={lag} confirmed_flush_lsn={confirmed} {state}"

    async def replay(self, event: OutboxEvent) -> str:
        """Write a dead-lettered event again, so the relay reads it again; what was done."""
        if self._config.mode == "message":
            await self.write([event])
            return f"emitted {event.event_id} as a WAL message again"
        # A row with the same event_id may still be there (event ids are unique): replace it.
        await self.write([event], replace=True)
        return f"inserted {event.event_id} into {parse_table_name(self._config.tables[0])} again"

    async def write(self, events: Sequence[OutboxEvent], replace: bool = False) -> None:
        """Write events in one transaction, as an application would: WAL messages in message
        mode, rows of the first configured table in table mode (with `replace`, a row with the
        same event id is deleted first: event ids are unique)."""
        conn = await self.get()
        if self._config.mode == "message":
            async with conn.transaction():
                for event in events:
                    await self._emit(conn, event)
        else:
            table = parse_table_name(self._config.tables[0]).identifier()
            await write_events(conn, table, self._config.columns.names(), events, replace=replace)

    async def _emit(self, conn: psycopg.AsyncConnection[Any], event: OutboxEvent) -> None:
        try:  # (a payload the relay could not read as JSON cannot go into a message)
            json_span.parse(event.payload)
        except ValueError as exc:
            raise ConnectorError(f"event {event.event_id}: payload is not JSON: {exc}") from None
        content = message_content(
            event.event_id,
            event.aggregate_type,
            event.aggregate_id,
            event.event_type,
            event.payload,  # its bytes as they are
            event.headers,
        )
        await conn.execute(
            "SELECT pg_logical_emit_message(true, %s, %s)", (self._config.message_prefix, content)
        )
