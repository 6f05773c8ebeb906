"""Two outboxes reading one table, slot or publication, as the servers see it.

`relay.config.shared_reads` compares what the config says; two spellings of one server
(`127.0.0.1` and `localhost`, a host name and its address, a service file) or a search_path that
makes `outbox` and `app.outbox` one table escape it. Here each outbox's database is asked: the
cluster's system identifier and the database name say which server and database it is, and a
table is known by its oid as the outbox's own session resolves its name. `check --connect` and
`run` refuse what this finds, as they refuse what the config alone shows.

An outbox whose database does not answer is left out (run retries it, check --connect reports it).
"""

from __future__ import annotations

from typing import Any

import psycopg

from outbox_relay.config import RelayConfig, shared_problem
from outbox_relay.identifiers import QualifiedName
from outbox_relay.pgsession import database_place, session_conninfo, start_session
from outbox_relay.registry import Claim

_CONNECT_TIMEOUT_S = 5


async def shared_reads_on_servers(config: RelayConfig) -> list[str]:
    """One sentence per claim that another outbox also reads, on the servers (empty: none)."""
    seen: dict[tuple[object, ...], tuple[int, Claim]] = {}
    problems: list[str] = []
    for index, outbox in enumerate(config.outboxes):
        claims = outbox.source.claims()
        dsn = outbox.source.database()
        if not claims or dsn is None:
            continue
        try:
            identities = await _identities(str(dsn), claims)
        except (psycopg.Error, OSError):
            continue
        for claim, identity in zip(claims, identities, strict=True):
            first = seen.get(identity)
            if first is None:
                seen[identity] = (index, claim)
            elif first[0] != index:
                problems.append(shared_problem(config, index, claim, first[0], first[1]))
    return problems


async def _identities(dsn: str, claims: list[Claim]) -> list[tuple[object, ...]]:
    """What each claim is on the server: (kind, cluster, database, object)."""
    async with await psycopg.AsyncConnection.connect(
        session_conninfo(dsn), autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S
    ) as conn:
        await start_session(conn)
        cluster = await _cluster(conn, dsn)
        database = conn.info.dbname
        identities: list[tuple[object, ...]] = []
        for claim in claims:
            if claim.kind == "table":
                text = QualifiedName(claim.schema, claim.name).regclass_text()
                row = await (await conn.execute("SELECT to_regclass(%s)::oid::int8", (text,))).fetchone()
                found: Any = row[0] if row and row[0] is not None else ("missing", claim.schema, claim.name)
                identities.append(("table", cluster, database, found))
            elif claim.kind == "replication slot":  # (a slot belongs to the cluster)
                identities.append((claim.kind, cluster, claim.name))
            else:
                identities.append((claim.kind, cluster, database, claim.name))
        return identities


async def _cluster(conn: psycopg.AsyncConnection[Any], dsn: str) -> object:
    """The cluster's system identifier; where the role may not read it, the DSN's server."""
    try:
        row = await (await conn.execute("SELECT system_identifier FROM pg_control_system()")).fetchone()
    except psycopg.Error:
        return database_place(dsn)
    return row[0] if row else database_place(dsn)
