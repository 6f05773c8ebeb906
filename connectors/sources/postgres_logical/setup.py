"""What the logical source needs of the database, checked (`check`, and on every start) and
created (`init-db`): wal_level logical, the REPLICATION attribute, the tables with their mapped
columns, a publication of exactly those tables, and the pgoutput slot."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql as psql

from outbox_relay.connectors.sources.outbox_table import (
    application_table_sql,
    default_table_ddl,
    existing_table,
    missing_columns,
    missing_table,
    resolve_table,
    schema_missing,
    schema_sql,
    table_columns,
)
from outbox_relay.connectors.sources.postgres_connect import connect
from outbox_relay.connectors.sources.postgres_logical.config import PostgresLogicalConfig
from outbox_relay.connectors.sources.postgres_logical.decoding import message_charmap
from outbox_relay.connectors.sources.postgres_logical.publication import (
    create_publication_sql,
    ensure_publication,
    publication_mismatch,
    resolve_tables,
    shown,
)
from outbox_relay.identifiers import QualifiedName, parse_table_name
from outbox_relay.interfaces import ConnectorError


async def published_tables(
    conn: psycopg.AsyncConnection[Any], config: PostgresLogicalConfig
) -> list[tuple[str, str]]:
    """The configured tables as the server resolves them (none in message mode), after checking
    that the publication publishes exactly them: a mismatch would skip events silently, so it
    raises ConnectorError."""
    tables = (
        await resolve_tables(conn, config.tables, mapped=config.maps_columns)
        if config.mode == "table"
        else []
    )
    problem = await publication_mismatch(conn, config.publication, tables)
    if problem:
        raise ConnectorError(problem)
    return tables


async def check(config: PostgresLogicalConfig) -> list[str]:
    """Verify everything streaming needs on a connection of its own; notes to print. Raises
    ConnectorError for the first thing missing."""
    sql = await connect(config.dsn, config.connect_timeout)
    try:
        await _check_server(sql)
        notes: list[str] = []
        tables: list[tuple[str, str]] = []
        if config.mode == "table":
            tables = await resolve_tables(sql, config.tables, mapped=config.maps_columns)
            for pair in tables:
                await _check_columns(sql, config, pair)
            notes.append(f"table(s) {', '.join(shown(pair) for pair in tables)}: mapping ok")
        problem = await publication_mismatch(sql, config.publication, tables)
        if problem:
            raise ConnectorError(problem)
        active_pid = await _check_slot(sql, config.slot)
        notes.append("wal_level logical, REPLICATION granted, publication and slot present")
        if config.mode == "message" and await message_charmap(sql) is not None:
            encoding = sql.info.parameter_status("server_encoding")
            notes.append(f"messages are converted from the database's encoding {encoding} to UTF-8")
        if active_pid is not None:
            notes.append(f"slot {config.slot} is in use by pid {active_pid} (another relay is active)")
        return notes
    finally:
        await sql.close()


async def _check_server(sql: psycopg.AsyncConnection[Any]) -> None:
    wal_level = await (await sql.execute("SHOW wal_level")).fetchone()
    if not wal_level or wal_level[0] != "logical":
        raise ConnectorError(
            f"wal_level is {wal_level[0] if wal_level else '?'}, logical replication needs"
            " wal_level = logical (postgresql.conf, then restart PostgreSQL)"
        )
    role = await (
        await sql.execute("SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user")
    ).fetchone()
    if not role or not role[0]:
        raise ConnectorError("the database user lacks the REPLICATION attribute (ALTER ROLE ... REPLICATION)")


async def _check_slot(sql: psycopg.AsyncConnection[Any], slot: str) -> Any:
    """The pid streaming the slot (None when none is); ConnectorError when there is no such
    slot of pgoutput."""
    row = await (
        await sql.execute(
            "SELECT active, active_pid, plugin FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        )
    ).fetchone()
    if not row:
        raise ConnectorError(f"replication slot {slot} is missing (run: outbox-relay init-db)")
    if row[2] != "pgoutput":
        raise ConnectorError(f"replication slot {slot} uses plugin {row[2]}, not pgoutput")
    return row[1] if row[0] else None


async def _check_columns(
    conn: psycopg.AsyncConnection[Any], config: PostgresLogicalConfig, table: tuple[str, str]
) -> None:
    found = await resolve_table(conn, QualifiedName(*table))
    present = [column.name for column in await table_columns(conn, found.oid)]
    configured = config.columns.model_dump()
    problem = missing_columns(shown(table), configured, config.columns.names().mapping(), present)
    if problem:
        raise ConnectorError(problem)


def _table_sql(
    config: PostgresLogicalConfig, table: QualifiedName, create_schema: bool
) -> list[psql.Composed]:
    """A default outbox table (in its schema, with `create_schema`); with a columns mapping, the
    application's table as a suggestion (init-db never runs it: see `init_db`)."""
    if config.maps_columns:
        return application_table_sql(table, config.columns.names().mapping())
    return [*(schema_sql(table) if create_schema else []), default_table_ddl(table)]


def _slot_sql(slot: str) -> psql.Composed:
    # Must run outside a transaction that wrote anything: init-db runs each statement alone.
    name = psql.Literal(slot)
    return psql.SQL(
        "SELECT pg_create_logical_replication_slot({}, 'pgoutput')"
        " WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {})"
    ).format(name, name)


def init_sql(config: PostgresLogicalConfig) -> list[psql.Composed]:
    """The statements `init-db --print-sql` shows."""
    tables = [parse_table_name(table) for table in config.tables] if config.mode == "table" else []
    # (init-db itself creates the publication only when it does not exist: see init_db.)
    creates = [statement for table in tables for statement in _table_sql(config, table, True)]
    return [*creates, create_publication_sql(config.publication, tables), _slot_sql(config.slot)]


async def init_db(conn: psycopg.AsyncConnection[Any], config: PostgresLogicalConfig) -> list[str]:
    """The tables (default mapping), then the publication: created for the tables as the
    server resolves them when it does not exist, else completed with the configured tables
    it lacks; refused when it publishes tables that are not configured. Then the slot."""
    for text in config.tables if config.mode == "table" else []:
        # (An unqualified name that finds a table further along the search_path must not
        # get a second one in its first schema.)
        table = parse_table_name(text)
        if await existing_table(conn, table) is not None:
            continue
        if config.maps_columns:
            raise ConnectorError(missing_table(table, mapped=True))
        for statement in _table_sql(config, table, await schema_missing(conn, table)):
            await conn.execute(statement)
    tables = (
        await resolve_tables(conn, config.tables, mapped=config.maps_columns)
        if config.mode == "table"
        else []
    )
    notes = await ensure_publication(conn, config.publication, tables)
    await conn.execute(_slot_sql(config.slot))
    return notes
