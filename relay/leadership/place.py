"""Where an outbox's lease lives: its table, its row's key, and the rule that puts an unqualified
lease table in the outbox table's schema (`init-db` and the relay both follow it). Also what
`status` says of a lease."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg
from psycopg import sql
from psycopg.abc import Params

from outbox_relay.identifiers import QualifiedName, parse_table_name
from outbox_relay.pgsession import fetch_rows, session_conninfo, start_session


def lease_key(outbox: str, scope: str = "") -> str:
    """The lease row of an outbox: its name and 64 bits of a hash of the name and what it reads
    (its table, its slot), so that two services that name their outboxes alike in one database
    do not take each other's lease."""
    digest = hashlib.blake2b(f"outbox-relay\0{outbox}\0{scope}".encode(), digest_size=8).hexdigest()
    return f"{outbox}/{digest}"


def create_table_sql(table: str) -> sql.Composed:
    """The lease table (`init-db` runs it; the relay too, when the table is missing)."""
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} ("
        " lease text PRIMARY KEY,"
        " outbox text NOT NULL,"
        " holder text,"
        " token bigint NOT NULL DEFAULT 0,"
        " expires_at timestamptz NOT NULL DEFAULT '-infinity',"
        " renewed_at timestamptz,"
        " stale_guard text)"
    ).format(parse_table_name(table).identifier())


def lease_table_in(table: str, outbox_schema: str | None) -> QualifiedName:
    """The lease table `table` names (`lease.table`): as written when qualified, else in the
    outbox table's schema when that is known (None: found through the search_path)."""
    lease_table = parse_table_name(table)
    if lease_table.schema is None and outbox_schema is not None:
        return QualifiedName(outbox_schema, lease_table.name)
    return lease_table


@dataclass(frozen=True)
class LeasePlace:
    """Where an outbox's lease lives: its table (text `parse_table_name` reads back) and row."""

    table: str
    key: str


#: Runs one statement and returns its rows (a BoundedSession's, or a plain connection's).
Query = Callable[[sql.SQL | sql.Composed, Params], Awaitable[list[tuple[Any, ...]]]]


async def locate_lease(query: Query, outbox: str, table: str, scope: str, resolve: str | None) -> LeasePlace:
    """Where the lease of `outbox` lives, names resolved as the server resolves them, so that
    replicas whose config spells the outbox table differently, or whose search_path differs,
    share one lease: the row's key is made of the table the server finds for `resolve` (the
    polling source's table), and an unqualified lease table lives in that table's schema.
    Without `resolve` (a slot names itself exactly), the key is made of `scope` and an
    unqualified lease table is found through the search_path. Raises UndefinedTable when
    `resolve` names no table."""
    if resolve is None:
        return LeasePlace(parse_table_name(table).regclass_text(), lease_key(outbox, scope))
    rows = await query(
        sql.SQL(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.oid = to_regclass(%s)"
        ),
        (parse_table_name(resolve).regclass_text(),),
    )
    if not rows:
        raise psycopg.errors.UndefinedTable(f"table {resolve} does not exist (run outbox-relay init-db)")
    schema, name = str(rows[0][0]), str(rows[0][1])
    return LeasePlace(
        lease_table_in(table, schema).regclass_text(),
        lease_key(outbox, f"table {QualifiedName(schema, name)}"),
    )


async def prepare_lease(query: Query, outbox: str, table: str, scope: str, resolve: str | None) -> LeasePlace:
    """Where the lease lives (`locate_lease`), its table created when it is missing (an older
    `init-db`), as far as this role may, and its row inserted when it is not there yet."""
    place = await locate_lease(query, outbox, table, scope, resolve)
    found = await query(sql.SQL("SELECT to_regclass(%s)"), (place.table,))
    if not found or found[0][0] is None:
        try:
            await query(create_table_sql(place.table), ())
        except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
            pass  # another replica created it at the same moment
        except psycopg.errors.InsufficientPrivilege as exc:
            raise psycopg.errors.InsufficientPrivilege(
                f"the lease table {parse_table_name(place.table)} does not exist and this role"
                f" may not create it (run outbox-relay init-db as a role that may): {exc}"
            ) from None
    await query(
        sql.SQL("INSERT INTO {} (lease, outbox) VALUES (%s, %s) ON CONFLICT (lease) DO NOTHING").format(
            parse_table_name(place.table).identifier()
        ),
        (place.key, outbox),
    )
    return place


async def lease_line(dsn: str, outbox: str, table: str, scope: str, resolve: str | None) -> str:
    """What `status` says of a lease: who holds it, with which token, for how much longer."""
    async with await psycopg.AsyncConnection.connect(
        session_conninfo(dsn), autocommit=True, connect_timeout=10
    ) as conn:
        await start_session(conn)
        place = await locate_lease(partial(fetch_rows, conn), outbox, table, scope, resolve)
        found = await fetch_rows(conn, "SELECT to_regclass(%s)", (place.table,))
        if not found or found[0][0] is None:
            return f"lease: table {table} does not exist yet (init-db creates it; so does the relay)"
        cur = await conn.execute(
            sql.SQL(
                "SELECT holder, token, extract(epoch FROM expires_at - clock_timestamp())::float8"
                " FROM {} WHERE lease = %s"
            ).format(parse_table_name(place.table).identifier()),
            (place.key,),
        )
        lease = await cur.fetchone()
    if lease is None or lease[0] is None:
        return "lease: never held"
    holder, token, left = lease
    if left is None or left <= 0:
        return f"lease: free (last held by {holder}, token {token})"
    return f"lease: held by {holder} (token {token}), {left:.1f}s left unless renewed"
