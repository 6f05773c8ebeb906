"""The outbox table in the database, as both PostgreSQL sources find, check, create and write
it: the table a configured name finds, its columns (and whether the mapped ones are there), the
base types of domains, the default table's DDL, and writing events into it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg import sql

from outbox_relay.connectors.sources.postgres_connect import ColumnNames
from outbox_relay.events import OutboxEvent
from outbox_relay.identifiers import QualifiedName, printable, quote_ident
from outbox_relay.interfaces import ConnectorError
from outbox_relay.secrets import scrubber


@dataclass(frozen=True, slots=True)
class ResolvedTable:
    """A table the server found for a configured name."""

    oid: int
    schema: str
    name: str
    kind: str  # pg_class.relkind

    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    def display(self) -> str:
        return QualifiedName(self.schema, self.name).display()


async def find_table(conn: psycopg.AsyncConnection[Any], table: QualifiedName) -> ResolvedTable | None:
    """The table `table` means on this connection, found as the server finds it (a qualified
    name exactly, an unqualified one through the connection's search_path), or None."""
    cur = await conn.execute(
        "SELECT c.oid::int8, n.nspname, c.relname, c.relkind::text FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
        (table.regclass_text(),),
    )
    row = await cur.fetchone()
    return None if row is None else ResolvedTable(int(row[0]), row[1], row[2], row[3])


async def existing_table(conn: psycopg.AsyncConnection[Any], name: QualifiedName) -> QualifiedName | None:
    """The table the server finds for the configured name, or None: `CREATE TABLE IF NOT EXISTS
    outbox` would create a second table in the first schema of the search_path although the
    name already finds one further along it."""
    found = await find_table(conn, name)
    return None if found is None else QualifiedName(found.schema, found.name)


def missing_table(table: object, *, mapped: bool) -> str:
    """Why `table` is missing and what to do: `init-db` creates a table of the default shape, but
    a table with a columns mapping is the application's (its own migration creates it; one the
    relay made up would collide with it, or hide a mistyped name)."""
    if not mapped:
        return f"table {table} does not exist (run: outbox-relay init-db)"
    return (
        f"table {table} does not exist: with a columns mapping it is the application's table, which"
        " init-db does not create; create it first (outbox-relay init-db --print-sql prints a"
        " CREATE TABLE with the mapped columns)"
    )


async def resolve_table(
    conn: psycopg.AsyncConnection[Any], table: QualifiedName, *, mapped: bool = False
) -> ResolvedTable:
    """The table `table` means on this connection (see `find_table`). Raises ConnectorError
    when there is none (`mapped`: a table with a columns mapping, see `missing_table`), with the
    double-quoted spelling of a table whose name differs only in case."""
    try:
        found = await find_table(conn, table)
        if found is None:
            hint = await _case_hint(conn, table)
    except psycopg.Error as exc:
        raise ConnectorError(scrubber.scrub(f"cannot look up table {table}: {exc}")) from None
    if found is None:
        raise ConnectorError(missing_table(table, mapped=mapped) + hint)
    return found


async def _case_hint(conn: psycopg.AsyncConnection[Any], table: QualifiedName) -> str:
    """When a table differs from `table` only in case: how to write its name instead."""
    if table.schema is None:
        # Where the server would look: the search_path's schemas, in order.
        query = (
            "SELECT NULL::text, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,"
            " unnest(current_schemas(true)) WITH ORDINALITY AS s(name, i)"
            " WHERE n.nspname = s.name AND lower(c.relname) = lower(%s)"
            " AND c.relkind IN ('r', 'p', 'v', 'm', 'f') ORDER BY s.i, c.relname LIMIT 1"
        )
        params: tuple[str, ...] = (table.name,)
    else:
        query = (
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE lower(n.nspname) = lower(%s) AND lower(c.relname) = lower(%s)"
            " AND c.relkind IN ('r', 'p', 'v', 'm', 'f') ORDER BY 1, 2 LIMIT 1"
        )
        params = (table.schema, table.name)
    row = await (await conn.execute(query, params)).fetchone()
    if row is None:
        return ""
    found = QualifiedName(row[0], row[1])
    return (
        f"; there is a table {found}: names without double quotes are folded to lower case,"
        f" write it with its double quotes (in YAML: '{found}')"
    )


def missing_columns(
    table: str, configured: Mapping[str, str | None], names: Mapping[str, str | None], present: Iterable[str]
) -> str | None:
    """None when the table has every mapped column, else the sentence that says which it lacks
    (`configured`: each key's text in the config; `names`: the server's names), with the
    double-quoted spelling of a column whose name differs only in case."""
    present = list(present)
    missing = [key for key, name in names.items() if name is not None and name not in present]
    if not missing:
        return None
    parts = []
    for key in missing:
        name = names[key]
        assert name is not None
        part = f"columns.{key}={configured[key]}"
        alike = [column for column in present if column.lower() == name.lower()]
        if alike:
            part += (
                f" (there is a column {printable(quote_ident(alike[0]))}: write it with its double quotes)"
            )
        parts.append(part)
    return f"table {table} has no column for {', '.join(parts)}"


# Each domain's base type (through domains over domains): a payload column may be declared as a
# domain over bytea or jsonb, and is read as its base type.
_DOMAIN_BASES = """
WITH RECURSIVE chain(domain, base) AS (
    SELECT oid, typbasetype FROM pg_type WHERE typtype = 'd'
  UNION ALL
    SELECT chain.domain, t.typbasetype FROM chain JOIN pg_type t ON t.oid = chain.base WHERE t.typtype = 'd'
)
SELECT chain.domain::int8, chain.base::int8, format_type(chain.base, NULL)
FROM chain JOIN pg_type t ON t.oid = chain.base WHERE t.typtype <> 'd'
"""


async def domain_bases(conn: psycopg.AsyncConnection[Any]) -> dict[int, tuple[int, str]]:
    """domain type oid -> (base type oid, base type name), for every domain in the database."""
    cur = await conn.execute(_DOMAIN_BASES)
    return {int(domain): (int(base), str(name)) for domain, base, name in await cur.fetchall()}


@dataclass(frozen=True, slots=True)
class TableColumn:
    """A column of a table, as pg_attribute has it."""

    name: str
    type_name: str  # format_type(): with its modifier, as \d shows it
    type_oid: int


async def table_columns(conn: psycopg.AsyncConnection[Any], oid: int) -> list[TableColumn]:
    """The columns of the table `oid`, in their order (dropped ones left out)."""
    cur = await conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid::int8 FROM pg_attribute a"
        " WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (oid,),
    )
    return [TableColumn(name, type_name, int(type_oid)) for name, type_name, type_oid in await cur.fetchall()]


def default_table_ddl(table: QualifiedName) -> sql.Composed:
    """The default outbox table of docs/getting-started.md (created by `init-db` of either source
    when the column mapping is the default one)."""
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (\n"
        "  position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n"
        "  event_id       uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,\n"
        "  aggregate_type text        NOT NULL,\n"
        "  aggregate_id   text        NOT NULL,\n"
        "  event_type     text        NOT NULL,\n"
        "  payload        jsonb       NOT NULL,\n"
        "  headers        jsonb       NOT NULL DEFAULT '{{}}',\n"
        "  created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),\n"
        "  published_at   timestamptz\n"
        ")"
    ).format(table.identifier())


# Each field's column in a table `init-db --print-sql` suggests for a columns mapping: the types
# of the default table.
_COLUMN_TYPES = {
    "position": "bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    "event_id": "uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE",
    "aggregate_type": "text NOT NULL",
    "aggregate_id": "text NOT NULL",
    "event_type": "text NOT NULL",
    "payload": "jsonb NOT NULL",
    "headers": "jsonb NOT NULL DEFAULT '{}'",
    "created_at": "timestamptz NOT NULL DEFAULT clock_timestamp()",
    "published_at": "timestamptz",
}


def application_table_sql(table: QualifiedName, columns: Mapping[str, str | None]) -> list[sql.Composed]:
    """For `init-db --print-sql` with a columns mapping: a table the application may create
    where it has none yet (init-db itself never does), its schema included. `columns`: each
    field's column by the server's name, None where the config maps none."""
    lines = sql.SQL(",\n").join(
        sql.SQL("  {} {}").format(sql.Identifier(name), sql.SQL(_COLUMN_TYPES[key]))
        for key, name in columns.items()
        if name is not None
    )
    # (A fixed comment: no name from the config goes into it.)
    comment = sql.SQL(
        "-- The outbox table is the application's (the config maps its columns): init-db does not\n"
        "-- create it. Where it does not exist yet, the application may create it like this:\n"
    )
    create = sql.SQL("CREATE TABLE IF NOT EXISTS {} (\n{}\n)").format(table.identifier(), lines)
    first, *rest = [*schema_sql(table), create]
    return [comment + first, *rest]


def schema_sql(table: QualifiedName) -> list[sql.Composed]:
    """The table's schema, when the name has one (`init-db` runs it only where the schema is
    missing: CREATE SCHEMA IF NOT EXISTS needs the CREATE privilege on the database even when
    the schema is there). Never `public`: every database has it, and a role that may not create
    schemas could not run the statement."""
    if table.schema in (None, "public"):
        return []
    return [sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(table.schema))]


async def schema_missing(conn: psycopg.AsyncConnection[Any], table: QualifiedName) -> bool:
    """Whether the table's name has a schema that does not exist (yet)."""
    if table.schema is None:
        return False
    cur = await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (table.schema,))
    return await cur.fetchone() is None


def insert_event(
    table: sql.Composable,
    columns: Mapping[str, str | None],
    event: OutboxEvent,
) -> tuple[sql.Composed, list[Any]]:
    """An INSERT that writes `event` into an outbox table (an identifier) with the given column
    mapping by the server's names (keys: event_id, aggregate_type, aggregate_id, event_type,
    payload, and optionally headers, created_at). Used to put a dead-lettered event back in
    front of the relay."""
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
        table,
        sql.SQL(", ").join(sql.Identifier(str(name)) for name, _ in names),
        sql.SQL(", ").join(sql.Placeholder() for _ in names),
    )
    return query, [value for _, value in names]


async def write_events(
    conn: psycopg.AsyncConnection[Any],
    table: sql.Composable,
    columns: ColumnNames,
    events: Sequence[OutboxEvent],
    *,
    replace: bool = False,
) -> None:
    """Insert `events` into an outbox table (an identifier) in one transaction, as an
    application would (see `insert_event`); with `replace`, a row with the same event id is
    deleted first (event ids are unique)."""
    mapping = columns.mapping()
    async with conn.transaction():
        for event in events:
            if replace:
                await conn.execute(
                    sql.SQL("DELETE FROM {} WHERE {}::text = %s").format(
                        table, sql.Identifier(columns.event_id)
                    ),
                    (event.event_id,),
                )
            await conn.execute(*insert_event(table, mapping, event))
