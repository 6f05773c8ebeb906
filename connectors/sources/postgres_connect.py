"""Opening connections for the PostgreSQL sources: one place for the settings they share and
for turning a connection failure into a one-line error without the password."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg import sql
from pydantic import BaseModel, ConfigDict

from outbox_relay.events import OutboxEvent
from outbox_relay.identifiers import ColumnName, QualifiedName, parse_identifier, printable, quote_ident
from outbox_relay.interfaces import ConnectorError, Unsupported
from outbox_relay.pgsession import session_conninfo, start_session
from outbox_relay.secrets import scrubber


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


@dataclass(frozen=True, slots=True)
class ColumnNames:
    """The mapped columns by the server's names (the config's text parsed as PostgreSQL reads
    it): what statements put in `sql.Identifier` and what is compared with the table's columns."""

    event_id: str
    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload: str
    headers: str | None
    created_at: str | None

    def mapping(self) -> dict[str, str | None]:
        return asdict(self)


class EventColumns(BaseModel):
    """Where an outbox table keeps each field of an event. `headers` and `created_at` may be
    null when the table has no such column. Names follow PostgreSQL's syntax: unquoted ones are
    folded to lower case, write a mixed-case name with its double quotes (`'"EventId"'`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    event_id: ColumnName = "event_id"
    aggregate_type: ColumnName = "aggregate_type"
    aggregate_id: ColumnName = "aggregate_id"
    event_type: ColumnName = "event_type"
    payload: ColumnName = "payload"
    headers: ColumnName | None = "headers"
    created_at: ColumnName | None = "created_at"

    def server_names(self) -> dict[str, str | None]:
        """Each key's column as the server names it (None where the config says null)."""
        return {
            key: None if text is None else parse_identifier(text) for key, text in self.model_dump().items()
        }

    def names(self) -> ColumnNames:
        names: dict[str, Any] = self.server_names()
        return ColumnNames(**names)


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
            **extra,
        )
    except psycopg.Error as exc:
        raise ConnectorError(scrubber.scrub(f"cannot connect to the database: {exc}")) from None
    try:
        await start_session(conn)
    except Unsupported:
        await conn.close()
        raise
    return conn


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


async def resolve_table(conn: psycopg.AsyncConnection[Any], table: QualifiedName) -> ResolvedTable:
    """The table `table` means on this connection, found as the server finds it: a qualified
    name exactly, an unqualified one through the connection's search_path. Raises
    ConnectorError when there is none, with the double-quoted spelling of a table whose name
    differs only in case."""
    try:
        cur = await conn.execute(
            "SELECT c.oid::int8, n.nspname, c.relname, c.relkind::text FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
            (table.regclass_text(),),
        )
        row = await cur.fetchone()
        if row is None:
            hint = await _case_hint(conn, table)
    except psycopg.Error as exc:
        raise ConnectorError(scrubber.scrub(f"cannot look up table {table}: {exc}")) from None
    if row is None:
        raise ConnectorError(f"table {table} does not exist (run: outbox-relay init-db){hint}")
    return ResolvedTable(int(row[0]), row[1], row[2], row[3])


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
