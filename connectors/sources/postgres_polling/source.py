"""The `postgres-polling` source itself: fetch (read, sweep, the writers' listing), ack, replay
and the operator's calls. What it uses: `session` (connections, inspection, queries), `rows`
(rows as events), `in_flight` (what is out with the broker), `listener` (NOTIFY), `ddl`, and
the read cursor of `read_cursor`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from outbox_relay.connectors.sources.outbox_table import (
    existing_table,
    missing_table,
    schema_missing,
    write_events,
)
from outbox_relay.connectors.sources.postgres_polling import queries
from outbox_relay.connectors.sources.postgres_polling.config import PostgresPollingConfig
from outbox_relay.connectors.sources.postgres_polling.ddl import init_statements
from outbox_relay.connectors.sources.postgres_polling.in_flight import HeldPositions
from outbox_relay.connectors.sources.postgres_polling.inspection import InspectedTable, check_notes
from outbox_relay.connectors.sources.postgres_polling.listener import WakeUps
from outbox_relay.connectors.sources.postgres_polling.rows import to_events
from outbox_relay.connectors.sources.postgres_polling.session import TableSession
from outbox_relay.connectors.sources.read_cursor import ReadCursor
from outbox_relay.events import OutboxEvent
from outbox_relay.identifiers import QualifiedName
from outbox_relay.interfaces import BacklogStats, ConnectorError, DatabaseSource, Fence, Fenced, Source
from outbox_relay.logs import get_logger


class PostgresPollingSource(Source, DatabaseSource):
    kind = "postgres-polling"

    def __init__(self, config: PostgresPollingConfig) -> None:
        if config.marks and config.columns.published_at is None:
            raise ConnectorError("columns.published_at is required with after_publish: mark")
        self.config = config
        self._log = get_logger(source=self.kind, table=config.table)
        self._session = TableSession(config, self._on_table_inspected, self._log)
        self._wake_ups = WakeUps(self._session.connect, config.notify_channel, self._log)
        self._cursor = ReadCursor()
        self._held = HeldPositions()
        #: Set when the table was inspected: why per-aggregate order may not hold with it.
        self.position_caveat: str | None = None
        self._last_sweep = 0.0
        self._last_read_empty = True
        self._caught_up = False

    async def start(self) -> None:
        self._session.forget_queries()  # inspect the table again: its columns may have changed
        await self._session.conn("fetch")
        if self.position_caveat:
            self._log.warning(
                "per-aggregate order is not guaranteed with this table", reason=self.position_caveat
            )
        if self.config.notify:
            self._wake_ups.listen_in_background()

    def _on_table_inspected(self, inspected: InspectedTable) -> None:
        """The table was inspected: tell the read cursor the step of its positions."""
        if inspected.position_step is not None:
            self._cursor.step = inspected.position_step
        self.position_caveat = inspected.position_caveat

    # --- fetch --------------------------------------------------------------------------------

    @property
    def caught_up(self) -> bool:
        return self._caught_up

    async def fetch(self, limit: int) -> list[OutboxEvent]:
        limit = min(limit, self.config.batch_size)
        rows = await self._read(limit)
        cut_short = len(rows) >= limit
        self._cursor.end_read([row[0] for row in rows], cut_short)
        events = self._hand_out(rows)
        self._caught_up = False
        sweep_due = time.monotonic() - self._last_sweep >= self.config.poll_interval
        if not cut_short and (self._last_read_empty or sweep_due):
            try:
                events.extend(await self._sweep(limit - len(rows)))
            except Exception:
                if events:  # what the read took is handed out; the sweep comes again
                    return events
                raise
        if self._cursor.wants_writers:
            await self._note_writers()
        self._last_read_empty = not events
        return events

    async def _read(self, limit: int) -> list[tuple[Any, ...]]:
        """The lowest-positioned unpublished rows in the cursor's gaps and above it, from one
        snapshot (see `read_cursor`); the cursor's read is abandoned when the query fails."""
        cursor = self._cursor
        above, gaps = cursor.begin_read()
        try:
            if gaps:
                firsts, lasts = [g[0] for g in gaps], [g[1] for g in gaps]
                params = (firsts, lasts, limit, above, limit, limit)
                cur = await self._session.run("fetch", "read_gaps", params)
            else:
                cur = await self._session.run("fetch", "read", (above, limit))
            return await cur.fetchall()
        except BaseException:
            cursor.abandon_read()
            raise

    def _hand_out(self, rows: Sequence[tuple[Any, ...]]) -> list[OutboxEvent]:
        """The rows as events, held from now on (see `in_flight`: before any other await)."""
        inspected = self._session.inspected
        assert inspected is not None
        events = to_events(rows, content_type=inspected.content_type)
        self._held.hand_out(row[0] for row in rows)
        return events

    async def _sweep(self, limit: int) -> list[OutboxEvent]:
        """Every unpublished row up to the highest position read that is not held, from the very
        bottom: rows outside the gaps appear only when a row is un-marked (`dlq replay`) or
        positions are not drawn in order. (Rows above are for the next read.)"""
        if limit <= 0:
            return []
        self._last_sweep = time.monotonic()
        cursor = self._cursor
        # (Never prepared: planned with its arguments, the array of held positions is a constant
        # that PostgreSQL hashes, not a parameter it scans for every row.)
        params = (cursor.highest, self._held.skip_list(), limit)
        rows = await (await self._session.run("fetch", "sweep", params, prepare=False)).fetchall()
        self._caught_up = len(rows) < limit
        if rows:
            cursor.took(row[0] for row in rows)
            self._log.info(
                "relaying rows found below positions already read", count=len(rows), first_position=rows[0][0]
            )
        return self._hand_out(rows)

    async def _note_writers(self) -> None:
        """Tell the cursor which transactions may still commit rows into the table."""
        session = self._session
        try:
            cur = await session.run("fetch", queries.WRITERS, (session.table.oid, session.own_pids()))
            self._cursor.note_writers({row[0] for row in await cur.fetchall()})
        except Exception as exc:  # (a later listing serves as well: see read_cursor)
            self._log.warning("cannot list the transactions writing the table", error=str(exc))

    # --- ack ----------------------------------------------------------------------------------

    def fence_with(self, fence: Fence) -> None:
        self._session.fence = fence
        self._session.forget_queries()  # (built again with the fence)

    async def ack(self, events: Sequence[OutboxEvent]) -> None:
        positions = [e.position for e in events]
        fence = self._session.fence
        if fence is None:
            await self._session.run("ack", "ack", (positions,))
        else:
            if not fence.valid():
                raise Fenced("the lease ended before these events were marked")
            cur = await self._session.run("ack", "ack", (fence.key, fence.token, positions))
            row = await cur.fetchone()
            if not row or not row[0]:
                raise Fenced("another relay holds the lease now: these events were not marked")
        self._held.settled(positions)

    async def replay(self, event: OutboxEvent) -> str:
        conn = await self._session.conn("ack")
        table, cols = self._session.table, self._session.cols
        if self.config.marks and cols.published_at:
            # The row is still there: unmark it; the relay picks it up again at its position.
            cur = await conn.execute(queries.unmark_query(table, cols), (int(event.position), event.event_id))
            if cur.rowcount:
                return f"unmarked row {event.event_id} in {table.display()}"
        await self.write([event])
        return f"inserted {event.event_id} into {table.display()} again"

    async def write(self, events: Sequence[OutboxEvent]) -> None:
        conn = await self._session.conn("ack")
        await write_events(conn, self._session.table.identifier(), self._session.cols, events)

    # --- wake-ups, backlog, status, checks, DDL -----------------------------------------------

    async def wait_for_events(self) -> None:
        await self._wake_ups.wait(self.config.poll_interval)

    async def backlog(self) -> BacklogStats:
        row = await (await self._session.run("stats", "backlog", ())).fetchone()
        assert row is not None
        return BacklogStats(pending=int(row[0]), oldest_age_seconds=max(float(row[1]), 0.0))

    async def status_lines(self) -> list[str]:
        stats = await self.backlog()
        line = f"pending={stats.pending} oldest_age={stats.oldest_age_seconds:.1f}s"
        published_at, inspected = self._session.cols.published_at, self._session.inspected
        if self.config.marks and published_at and inspected is not None:
            query = queries.published_last_minute_query(inspected.table, published_at)
            row = await (await self._session.run("stats", query, ())).fetchone()
            line += f" published_last_minute={row[0] if row else 0}"
        return [line]

    async def check(self) -> list[str]:
        conn = await self._session.connect()
        try:
            return await check_notes(conn, await self._session.inspect(conn), self.config)
        finally:
            await conn.close()

    async def init_db(self, conn: psycopg.AsyncConnection[Any]) -> list[str]:
        """`init_sql()`, on the table the server finds for the configured name when there is
        one (see `outbox_table.existing_table`)."""
        name = self.config.table_name()
        existing = await existing_table(conn, name)
        if existing is None and self.config.maps_columns:
            raise ConnectorError(missing_table(name, mapped=True))
        create_schema = await schema_missing(conn, name)
        for statement in init_statements(self.config, existing, create_schema=create_schema):
            await conn.execute(statement)
        return []

    def init_sql(self, existing: QualifiedName | None = None) -> list[sql.Composed]:
        """The DDL of `init-db`; on `existing`, the table the configured name finds, when given
        (it is then not created)."""
        return init_statements(self.config, existing)

    async def close(self) -> None:
        await self._wake_ups.stop()
        await self._session.close()
