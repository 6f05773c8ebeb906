"""What the polling source finds out about its table before it reads: where the configured name
leads, whether the mapped columns exist, whether the position column can key the reads, how the
payload is typed, and why per-aggregate order may not hold with the table. Also what `check`
says about a session that could read the table but never settle a row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from outbox_relay.connectors.sources.outbox_table import (
    ResolvedTable,
    domain_bases,
    missing_columns,
    missing_table,
    resolve_table,
    table_columns,
)
from outbox_relay.connectors.sources.postgres_polling.config import PostgresPollingConfig
from outbox_relay.identifiers import QualifiedName, quote_ident
from outbox_relay.interfaces import ConnectorError
from outbox_relay.secrets import scrubber

_CONTENT_TYPES = {
    "json": "application/json",
    "jsonb": "application/json",
    "bytea": "application/octet-stream",
}


@dataclass(frozen=True, slots=True)
class InspectedTable:
    """The table the server found for the configured name, as the source reads it."""

    table: ResolvedTable
    column_count: int
    payload_is_bytes: bool
    content_type: str
    #: The increment of the sequence that fills the position column, when one was found.
    position_step: int | None
    #: Why per-aggregate order may not hold with this table, or None.
    position_caveat: str | None


async def inspect_table(
    conn: psycopg.AsyncConnection[Any], name: QualifiedName, config: PostgresPollingConfig
) -> InspectedTable:
    """Find the table as the server does (an unqualified name through the search_path) and check
    that the mapped columns exist and that the position column can key the reads. Raises
    ConnectorError saying what is wrong."""
    cols = config.columns.names()
    table = await resolve_table(conn, name, mapped=config.maps_columns)
    types, type_oids, bases = await _column_types(conn, table)
    if not types:  # (dropped since)
        raise ConnectorError(missing_table(table.display(), mapped=config.maps_columns))
    problem = missing_columns(table.display(), config.columns.model_dump(), cols.mapping(), types)
    if problem:
        raise ConnectorError(problem)
    await _require_a_key_position(conn, table, cols.position)
    # (A payload declared as a domain over bytea or jsonb is read as its base type.)
    payload_type = bases.get(type_oids[cols.payload], (0, types[cols.payload]))[1]
    step, caveat = await _position_sequence(conn, table, cols.position)
    return InspectedTable(
        table=table,
        column_count=len(types),
        payload_is_bytes=payload_type == "bytea",
        content_type=_CONTENT_TYPES.get(payload_type, "text/plain; charset=utf-8"),
        position_step=step,
        position_caveat=caveat,
    )


async def _column_types(
    conn: psycopg.AsyncConnection[Any], table: ResolvedTable
) -> tuple[dict[str, str], dict[str, int], dict[int, tuple[int, str]]]:
    """The table's columns: their type names, their type oids, and the base types of domains."""
    try:
        found = await table_columns(conn, table.oid)
        bases = await domain_bases(conn)
    except psycopg.Error as exc:
        raise ConnectorError(scrubber.scrub(f"cannot inspect table {table.display()}: {exc}")) from None
    types = {column.name: column.type_name for column in found}
    type_oids = {column.name: column.type_oid for column in found}
    return types, type_oids, bases


async def _require_a_key_position(
    conn: psycopg.AsyncConnection[Any], table: ResolvedTable, position: str
) -> None:
    """The relay reads, orders, skips and marks rows by their position: a row without one
    would never be read, two rows with one would be marked together. So the column must be
    NOT NULL and unique on its own (a primary key, or a unique index on it alone)."""
    cur = await conn.execute(
        "SELECT a.attnotnull, EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid"
        " AND i.indisunique AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum AND i.indpred IS NULL)"
        " FROM pg_attribute a WHERE a.attrelid = %s AND a.attname = %s",
        (table.oid, position),
    )
    row = await cur.fetchone()
    assert row is not None  # (the column exists: checked before)
    missing = [what for what, ok in (("NOT NULL", row[0]), ("unique", row[1])) if not ok]
    if missing:
        column = f"{table.display()}.{quote_ident(position)}"
        raise ConnectorError(
            f"the position column {column} must be {' and '.join(missing)} (a primary key, or NOT NULL"
            " with a unique index on it alone): the relay reads, orders and marks rows by it, and"
            " would never read a row without one"
        )


async def _position_sequence(
    conn: psycopg.AsyncConnection[Any], table: ResolvedTable, position: str
) -> tuple[int | None, str | None]:
    """The increment of the sequence that fills the position column (None when there is no
    usable one), and why per-aggregate order may not hold with it, or None: the read cursor
    assumes positions drawn by the INSERT from a sequence that hands out increasing values
    across sessions (see read_cursor). Nothing is ever lost either way."""
    cur = await conn.execute(
        "SELECT s.seqcache, s.seqincrement FROM pg_sequence s"
        " WHERE s.seqrelid = pg_get_serial_sequence(%s::oid::regclass::text, %s)::regclass",
        (table.oid, position),
    )
    row = await cur.fetchone()
    column = f"{table.display()}.{quote_ident(position)}"
    if row is None:
        return None, (
            f"{column} is not filled by an identity or serial sequence: per-aggregate order"
            " assumes each inserting transaction draws its position, increasing, as it inserts"
        )
    if int(row[1]) < 1:
        return None, f"the sequence of {column} counts down: positions must increase"
    if int(row[0]) > 1:
        return int(row[1]), (
            f"the sequence of {column} caches {row[0]} values per session, so positions do not"
            " follow the order in which they are drawn: a late row may be relayed after later rows"
            " of its aggregate (ALTER SEQUENCE ... CACHE 1)"
        )
    return int(row[1]), None


async def _cannot_write(
    conn: psycopg.AsyncConnection[Any], table: ResolvedTable, config: PostgresPollingConfig
) -> str | None:
    """Why `run` could read the table but never settle a row (a read-only session, a role
    without the privilege), or None: said by check rather than found by run."""
    settle = "UPDATE" if config.marks else "DELETE"
    cur = await conn.execute(
        "SELECT current_setting('transaction_read_only') = 'on', current_user,"
        " has_table_privilege(%s::oid, 'SELECT'), has_table_privilege(%s::oid, %s)",
        (table.oid, table.oid, settle),
    )
    row = await cur.fetchone()
    assert row is not None
    read_only, role, can_select, can_settle = row
    if read_only:
        return (
            "the database session is read-only (a standby, or default_transaction_read_only):"
            f" the relay must {settle} published rows; point the DSN at the primary"
        )
    lacking = [name for name, ok in (("SELECT", can_select), (settle, can_settle)) if not ok]
    if lacking:
        return (
            f"permission denied: role {role} lacks {' and '.join(lacking)} on table"
            f" {table.display()} (after_publish: {config.after_publish})"
        )
    return None


async def check_notes(
    conn: psycopg.AsyncConnection[Any], inspected: InspectedTable, config: PostgresPollingConfig
) -> list[str]:
    """What `check` says about the inspected table; raises ConnectorError when `run` could read
    it but never settle a row."""
    table = inspected.table
    notes = [f"table {table.display()}: {inspected.column_count} columns, mapping ok"]
    problem = await _cannot_write(conn, table, config)
    if problem:
        raise ConnectorError(problem)
    if inspected.position_caveat:
        notes.append(f"warning: {inspected.position_caveat}")
    if config.notify:
        if await _has_notify_trigger(conn, table):
            notes.append("NOTIFY trigger present")
        else:
            notes.append("NOTIFY trigger missing: latency falls back to poll_interval (run init-db)")
    return notes


async def _has_notify_trigger(conn: psycopg.AsyncConnection[Any], table: ResolvedTable) -> bool:
    cur = await conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s AND tgname = 'outbox_relay_notify'",
        (table.oid,),
    )
    row = await cur.fetchone()
    return bool(row and row[0])
