"""The polling source's connections to its table, and the queries built for the table as the
server showed it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import psycopg
from psycopg import sql

from outbox_relay.connectors.sources.outbox_table import ResolvedTable
from outbox_relay.connectors.sources.postgres_connect import connect
from outbox_relay.connectors.sources.postgres_polling import queries
from outbox_relay.connectors.sources.postgres_polling.config import PostgresPollingConfig
from outbox_relay.connectors.sources.postgres_polling.inspection import InspectedTable, inspect_table
from outbox_relay.interfaces import Fence
from outbox_relay.pgsession import bounded, close_quietly

Role = Literal["fetch", "ack", "stats"]
ROLES: tuple[Role, ...] = ("fetch", "ack", "stats")
#: The connections left out of the writers' listing: they never insert (marking takes the lock).
_READ_AND_MARK: tuple[Role, ...] = ("fetch", "ack")


class TableSession:
    """Three connections, each opened when first needed and again once closed or broken: `fetch`
    (reads, sweeps, the writers' listing), `ack` (marks, replays, writes) and `stats` (backlog).

    The table is inspected, and the queries built for it, on the first connection and again on
    the next one after `forget_queries` (a restart: the columns may have changed; a new fence);
    `on_inspected` hears of each inspection."""

    def __init__(
        self, config: PostgresPollingConfig, on_inspected: Callable[[InspectedTable], None], log: Any
    ) -> None:
        self.config = config
        self._log = log
        self.cols = config.columns.names()
        #: The lease term acks are fenced by, once the relay runs under a lease.
        self.fence: Fence | None = None
        #: The table as last inspected.
        self.inspected: InspectedTable | None = None
        self._on_inspected = on_inspected
        self._queries: queries.Queries = {}
        self._conns: dict[Role, psycopg.AsyncConnection[Any]] = {}

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        """A new connection of the source's own (the caller closes it)."""
        return await connect(self.config.dsn, self.config.connect_timeout)

    @property
    def table(self) -> ResolvedTable:
        assert self.inspected is not None, "the table is inspected on the first connection"
        return self.inspected.table

    def forget_queries(self) -> None:
        """Inspect the table and build the queries again on the next connection asked for."""
        self._queries.clear()

    async def inspect(self, conn: psycopg.AsyncConnection[Any]) -> InspectedTable:
        """Inspect the table (see `inspection`) and build the queries for it."""
        inspected = await inspect_table(conn, self.config.table_name(), self.config)
        self.inspected = inspected
        self._queries = queries.build_queries(
            inspected.table,
            self.cols,
            marks=self.config.marks,
            payload_is_bytes=inspected.payload_is_bytes,
            fence=self.fence,
        )
        self._on_inspected(inspected)
        return inspected

    async def conn(self, role: Role) -> psycopg.AsyncConnection[Any]:
        conn = self._conns.get(role)
        if conn is None or conn.closed or conn.broken:
            conn = await self.connect()
            if role == "fetch":
                # Fetches want the partial index in position order and stop at LIMIT. Without
                # fresh statistics (a burst of new rows, autovacuum not yet run) the planner
                # picks a bitmap scan and a sort of every pending row instead: several times
                # slower for each batch. Discouraging both on this session alone keeps the
                # plan stable; a table without a usable index still gets a scan.
                await conn.execute("SET enable_bitmapscan = off")
                await conn.execute("SET enable_seqscan = off")
            self._conns[role] = conn
        # (Also on a connection kept from a failed inspection: the table may exist by now.)
        if not self._queries:
            await self.inspect(conn)
        return conn

    async def run(
        self,
        role: Role,
        query: queries.QueryName | sql.SQL | sql.Composed,
        params: Sequence[Any],
        *,
        prepare: bool | None = None,
    ) -> psycopg.AsyncCursor[Any]:
        """Run a query on one of the connections; `query` may name one of the built queries
        (built once the table was inspected, which connecting does when needed). A query the
        database does not answer within `query_timeout` fails as a lost connection does."""
        conn = await self.conn(role)
        if isinstance(query, str):
            query = self._queries[query]
        try:
            return await self._bounded(conn, conn.execute(query, params, prepare=prepare))
        except psycopg.OperationalError:
            # Drop the connection: the next call reconnects (database restart, network cut).
            await close_quietly(conn)
            raise

    async def _bounded(
        self, conn: psycopg.AsyncConnection[Any], work: Awaitable[psycopg.AsyncCursor[Any]]
    ) -> psycopg.AsyncCursor[Any]:
        """`work` within `query_timeout`. A connection held open by something that stopped
        forwarding fails nothing, and its statement would wait for ever; past the bound the
        connection is severed (a cancel would wait on it too: see `pgsession.bounded`), and the
        caller's retry reconnects. A mark the server still commits later is harmless: marking
        a row twice marks it, and under a lease the statement checks the token itself."""
        timeout = self.config.query_timeout
        if timeout <= 0:
            return await work
        try:
            return await bounded(conn, work, timeout)
        except TimeoutError:
            message = f"database did not answer within {timeout:g}s; reconnecting"
            self._log.warning(message)
            raise psycopg.OperationalError(message) from None

    def own_pids(self) -> list[int]:
        """The server processes of the connections that read and mark rows."""
        return [
            conn.info.backend_pid
            for role in _READ_AND_MARK
            if (conn := self._conns.get(role)) is not None and not conn.closed
        ]

    async def close(self) -> None:
        for role in ROLES:
            conn = self._conns.pop(role, None)
            if conn is not None:
                await conn.close()
