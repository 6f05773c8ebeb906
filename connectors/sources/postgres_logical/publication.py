"""The publication the slot decodes through, and the tables it must publish: exactly the
configured ones. A table it does not publish never reaches the relay; a table it publishes that is
not configured has inserts no event can be made of. Either way events would be skipped, so every
disagreement is found and told in one sentence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql as psql

from outbox_relay.connectors.sources.outbox_table import resolve_table
from outbox_relay.identifiers import (
    IdentifierError,
    QualifiedName,
    parse_identifier,
    parse_table_name,
    printable,
    quote_ident,
)
from outbox_relay.interfaces import ConnectorError


def quoted(name: str) -> str:
    """A server name as SQL writes it, printable in a message."""
    return printable(quote_ident(name))


def shown(pair: tuple[str, str]) -> str:
    """A (schema, table) pair as SQL writes it."""
    return QualifiedName(*pair).display()


def create_publication_sql(publication: str, tables: Sequence[QualifiedName]) -> psql.Composed:
    """CREATE PUBLICATION for these tables, inserts only; without tables (message mode) the
    messages flow through a publication of no table. `publication` as written in the config."""
    scope: psql.Composable = psql.SQL("")
    if tables:
        scope = psql.SQL(" FOR TABLE {}").format(psql.SQL(", ").join(t.identifier() for t in tables))
    # Via the root: a partitioned table's inserts are published under its own name.
    options = "publish = 'insert', publish_via_partition_root = true" if tables else "publish = 'insert'"
    return psql.SQL("CREATE PUBLICATION {}{} WITH ({})").format(
        psql.Identifier(parse_identifier(publication)), scope, psql.SQL(options)
    )


async def resolve_tables(
    conn: psycopg.AsyncConnection[Any], tables: Sequence[str], *, mapped: bool = False
) -> list[tuple[str, str]]:
    """Each configured table (as written in the config) as the server's (schema, table): a
    qualified name exactly, an unqualified one through the connection's search_path, as the
    server resolves names in SQL. Raises ConnectorError naming a table that does not exist (an
    application's with `mapped`, see outbox_table.missing_table; with
    the double-quoted spelling of a table whose name differs only in case) or is no table."""
    pairs: list[tuple[str, str]] = []
    for text in tables:
        try:
            name = parse_table_name(text)
        except IdentifierError as exc:
            raise ConnectorError(f"tables: {printable(text)}: {exc}") from None
        table = await resolve_table(conn, name, mapped=mapped)
        if table.kind not in ("r", "p"):
            raise ConnectorError(f"{table.display()} is not a table: a publication publishes tables only")
        if (table.schema, table.name) not in pairs:
            pairs.append((table.schema, table.name))
    return pairs


@dataclass(frozen=True, slots=True)
class PublicationState:
    """A publication as the server has it."""

    name: str
    all_tables: bool
    inserts: bool
    tables: list[tuple[str, str]]  # as pgoutput names them (the partition root when published via it)


async def publication_state(conn: psycopg.AsyncConnection[Any], name: str) -> PublicationState | None:
    """The publication of this server name; None when there is none."""
    cur = await conn.execute("SELECT puballtables, pubinsert FROM pg_publication WHERE pubname = %s", (name,))
    row = await cur.fetchone()
    if row is None:
        return None
    cur = await conn.execute(
        "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = %s"
        " ORDER BY 1, 2",
        (name,),
    )
    return PublicationState(name, bool(row[0]), bool(row[1]), [(r[0], r[1]) for r in await cur.fetchall()])


async def publication_mismatch(
    conn: psycopg.AsyncConnection[Any], publication: str, tables: Sequence[tuple[str, str]]
) -> str | None:
    """None when the publication (as written in the config) exists and publishes exactly
    `tables` (the server's (schema, table) pairs, see `resolve_tables`), else one sentence that
    says what disagrees: the publication is missing, configured tables it does not publish
    (their inserts would never reach the relay), tables it publishes that are not configured
    (their inserts could not be turned into events). With no tables (message mode) only its
    existence matters."""
    name = parse_identifier(publication)
    state = await publication_state(conn, name)
    if state is None:
        return f"publication {quoted(name)} does not exist (run: outbox-relay init-db)"
    return describe_mismatch(state, tables) if tables else None


def describe_mismatch(state: PublicationState, tables: Sequence[tuple[str, str]]) -> str | None:
    """None when `state` publishes the inserts of exactly `tables`, else why not, in one sentence."""
    problems = [
        problem
        for problem in (_no_inserts(state), _unpublished(state, tables), _unconfigured(state, tables))
        if problem is not None
    ]
    if not problems:
        return None
    return f"publication {quoted(state.name)} does not match the configured tables: {'; '.join(problems)}"


def _no_inserts(state: PublicationState) -> str | None:
    return None if state.inserts else "it does not publish inserts (publish = 'insert' is needed)"


def _unpublished(state: PublicationState, tables: Sequence[tuple[str, str]]) -> str | None:
    missing = [pair for pair in tables if pair not in state.tables]
    if not missing:
        return None
    return (
        f"it does not publish {', '.join(shown(p) for p in missing)}, so their inserts would"
        " never reach the relay (run: outbox-relay init-db to add them)"
    )


def _unconfigured(state: PublicationState, tables: Sequence[tuple[str, str]]) -> str | None:
    if state.all_tables:
        return (
            "it publishes all tables (FOR ALL TABLES), so inserts into tables that are not"
            " configured could not be turned into events (create one FOR TABLE the configured tables)"
        )
    extra = [pair for pair in state.tables if pair not in tables]
    if not extra:
        return None
    return (
        f"it publishes {', '.join(shown(p) for p in extra)}, which tables: does not list, so"
        " their inserts could not be turned into events (add them to tables:, or"
        f" ALTER PUBLICATION {quoted(state.name)} DROP TABLE them)"
    )


async def ensure_publication(
    conn: psycopg.AsyncConnection[Any], publication: str, tables: Sequence[tuple[str, str]]
) -> list[str]:
    """For init-db: create the publication (as written in the config) for `tables` when it does
    not exist, else add the configured tables it lacks. Refused (ConnectorError) when it
    publishes tables that are not configured, all tables, or no inserts: init-db never takes
    anything away from a publication. Returns notes on what it changed."""
    name = parse_identifier(publication)
    state = await publication_state(conn, name)
    if state is None:
        resolved = [QualifiedName(schema, table) for schema, table in tables]
        try:
            await conn.execute(create_publication_sql(publication, resolved))
        except psycopg.errors.DuplicateObject:  # created meanwhile (another init-db)
            state = await publication_state(conn, name)
    if state is None or not tables:
        return []
    problem = describe_mismatch(state, tables)
    if problem and (state.all_tables or not state.inserts or set(state.tables) - set(tables)):
        raise ConnectorError(problem)
    missing = [pair for pair in tables if pair not in state.tables]
    if not missing:
        return []
    await conn.execute(
        psql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
            psql.Identifier(state.name), psql.SQL(", ").join(psql.Identifier(*pair) for pair in missing)
        )
    )
    return [
        f"publication {quoted(state.name)} now also publishes"
        f" {', '.join(shown(pair) for pair in missing)} (ALTER PUBLICATION ... ADD TABLE)"
    ]
