"""Source `postgres-polling`: reads the outbox table in `position` order, marks or deletes rows
after the broker acknowledged them, and wakes on NOTIFY so latency is not bound to the poll interval.

Reading order and late commits. Positions come from a sequence, so a transaction can commit a
row whose position is *lower* than rows already read (it drew its position first and committed
later). Each read asks, in one snapshot, for the lowest-positioned unpublished rows above the
highest position read and in the *gaps* below it: positions not seen yet that an open
transaction may still commit, forgotten once no such transaction is left (see `read_cursor`,
which argues why). So a late row is handed out no later than any row of its aggregate written
after it: with one aggregate's writes serialized (its row locked first, as the README asks),
per-aggregate order holds whatever the interleaving and however late a commit is. A sweep from
the very bottom, whenever the relay has caught up (at most every `poll_interval`), finds rows
that reappear elsewhere below the cursor (`dlq replay` un-marks a row; a sequence with a cache
hands out positions out of order): nothing committed is ever skipped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg import sql
from pydantic import Field

from outbox_relay.connectors.sources.postgres_connect import (
    ColumnNames,
    EventColumns,
    ResolvedTable,
    connect,
    domain_bases,
    insert_event,
    missing_columns,
    null_column_defect,
    resolve_table,
)
from outbox_relay.connectors.sources.read_cursor import ReadCursor
from outbox_relay.durations import Duration
from outbox_relay.events import EARLIEST as _EARLIEST
from outbox_relay.events import LATEST as _LATEST
from outbox_relay.events import OutboxEvent, checked_time, headers_from_json
from outbox_relay.identifiers import (
    ColumnName,
    QualifiedName,
    TableName,
    derived_name,
    parse_table_name,
    quote_ident,
)
from outbox_relay.interfaces import BacklogStats, ConnectorError, Fence, Fenced, Source
from outbox_relay.logs import get_logger
from outbox_relay.pgsession import Dsn, database_place
from outbox_relay.registry import Claim, ConnectorConfig, SourcePlugin
from outbox_relay.secrets import scrubber

# Transactions that may still insert rows: those holding the table's RowExclusiveLock (granted;
# a prepared transaction holds it with no pid), except the relay's own connections.
_WRITERS = sql.SQL(
    "SELECT DISTINCT virtualtransaction FROM pg_locks WHERE locktype = 'relation'"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND relation = %s AND mode = 'RowExclusiveLock' AND granted"
    " AND (pid IS NULL OR pid <> ALL(%s::int4[]))"
)
# Fixed text: the channel comes as the trigger's argument, the table name from the server.
_NOTIFY_FUNCTION = sql.Composed(
    [
        sql.SQL(
            "CREATE OR REPLACE FUNCTION outbox_relay_notify() RETURNS trigger LANGUAGE plpgsql AS $$\nBEGIN\n"
            "  PERFORM pg_notify(TG_ARGV[0], TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);\n"
            "  RETURN NULL;\nEND\n$$"
        )
    ]
)


@dataclass(frozen=True, slots=True)
class PollingColumnNames(ColumnNames):
    position: str
    published_at: str | None


class ColumnMapping(EventColumns):
    """Column names of the outbox table, for schemas other than the default one. Polling also
    needs the `position` column, and `published_at` with `after_publish: mark` (it may be null
    with `after_publish: delete`)."""

    position: ColumnName = "position"
    published_at: ColumnName | None = "published_at"

    def names(self) -> PollingColumnNames:
        names: dict[str, Any] = self.server_names()
        return PollingColumnNames(**names)


class PostgresPollingConfig(ConnectorConfig):
    type: Literal["postgres-polling"]
    dsn: Dsn = Field(description="libpq connection string or postgresql:// URL.")
    table: TableName = Field(
        default="public.outbox",
        description="name or schema.name as in SQL: unquoted parts fold to lower case, double-quoted"
        " ones are kept as written; an unqualified name is looked up through the search_path.",
    )
    batch_size: int = Field(default=2000, ge=1, le=100_000, description="Rows per fetch at most.")
    poll_interval: Duration = Field(
        default=0.2,
        ge=0.01,
        description="Fallback when no NOTIFY arrives (at least 10ms: a query each time, an idle relay"
        " must not spin).",
    )
    after_publish: Literal["mark", "delete"] = "mark"
    columns: ColumnMapping = ColumnMapping()
    notify: bool = Field(default=True, description="LISTEN for the trigger that init-db installs.")
    notify_channel: str = Field(default="outbox_relay", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    connect_timeout: Duration = Field(default=5.0, gt=0)

    def table_name(self) -> QualifiedName:
        return parse_table_name(self.table)

    def lease_scope(self) -> str:
        return f"table {parse_table_name(self.table).display()}"

    def lease_resolves(self) -> str | None:
        return self.table

    def claims(self) -> list[Claim]:
        table = parse_table_name(self.table)
        return [Claim("table", database_place(self.dsn), table.schema, table.name, "table", table.display())]


def _text_column(name: str) -> sql.Composable:
    return sql.SQL("{}::text").format(sql.Identifier(name))


class PostgresPollingSource(Source):
    kind = "postgres-polling"

    def __init__(self, config: PostgresPollingConfig) -> None:
        if config.after_publish == "mark" and config.columns.published_at is None:
            raise ConnectorError("columns.published_at is required with after_publish: mark")
        self.config = config
        self._name = config.table_name()
        self._cols = config.columns.names()
        #: The table the server found for the configured name (set by the inspection).
        self._table: ResolvedTable | None = None
        self._log = get_logger(source=self.kind, table=config.table)
        self._fetch_conn: psycopg.AsyncConnection[Any] | None = None
        self._ack_conn: psycopg.AsyncConnection[Any] | None = None
        self._stats_conn: psycopg.AsyncConnection[Any] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._cursor = ReadCursor()
        #: Positions handed out and not acknowledged yet: reads skip them.
        self._held: set[int] = set()
        self._table_oid = 0
        #: Set when the table was inspected: why per-aggregate order may not hold with it.
        self.position_caveat: str | None = None
        self._last_sweep = 0.0
        self._last_read_empty = True
        self._caught_up = False
        self._queries: dict[str, sql.SQL | sql.Composed] = {}
        self._payload_is_bytes = False
        self._content_type = "application/json"
        self._fence: Fence | None = None

    # --- connections --------------------------------------------------------------------------

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        return await connect(self.config.dsn, self.config.connect_timeout)

    async def start(self) -> None:
        self._queries.clear()  # inspect the table again: its columns may have changed since
        await self._conn("fetch")
        if self.position_caveat:
            self._log.warning(
                "per-aggregate order is not guaranteed with this table", reason=self.position_caveat
            )
        if self.config.notify and self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="outbox-relay:listen")

    async def _inspect_table(self, conn: psycopg.AsyncConnection[Any]) -> dict[str, str]:
        """Find the table as the server does (an unqualified name through the search_path),
        check that the mapped columns exist, and build the queries for their types."""
        cfg, cols = self.config, self._cols
        table = await resolve_table(conn, self._name)
        try:
            cur = await conn.execute(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid::int8 FROM pg_attribute a"
                " WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                (table.oid,),
            )
            found = await cur.fetchall()
            types = {name: type_name for name, type_name, _ in found}
            type_oids = {name: int(oid) for name, _, oid in found}
            bases = await domain_bases(conn)
        except psycopg.Error as exc:
            raise ConnectorError(scrubber.scrub(f"cannot inspect table {table.display()}: {exc}")) from None
        if not types:
            raise ConnectorError(f"table {table.display()} does not exist (run: outbox-relay init-db)")
        problem = missing_columns(table.display(), cfg.columns.model_dump(), cols.mapping(), types)
        if problem:
            raise ConnectorError(problem)
        await self._require_a_key_position(conn, table)
        self._table_oid = table.oid
        # (A payload declared as a domain over bytea or jsonb is read as its base type.)
        payload_type = bases.get(type_oids[cols.payload], (0, types[cols.payload]))[1]
        self._payload_is_bytes = payload_type == "bytea"
        self._content_type = {
            "json": "application/json",
            "jsonb": "application/json",
            "bytea": "application/octet-stream",
        }.get(payload_type, "text/plain; charset=utf-8")
        self._table = table
        self._build_queries()
        self.position_caveat = await self._position_caveat(conn, table)
        return types

    async def _require_a_key_position(self, conn: psycopg.AsyncConnection[Any], table: ResolvedTable) -> None:
        """The relay reads, orders, skips and marks rows by their position: a row without one
        would never be read, two rows with one would be marked together. So the column must be
        NOT NULL and unique on its own (a primary key, or a unique index on it alone)."""
        cur = await conn.execute(
            "SELECT a.attnotnull, EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = a.attrelid"
            " AND i.indisunique AND i.indnkeyatts = 1 AND i.indkey[0] = a.attnum AND i.indpred IS NULL)"
            " FROM pg_attribute a WHERE a.attrelid = %s AND a.attname = %s",
            (table.oid, self._cols.position),
        )
        row = await cur.fetchone()
        assert row is not None  # (the column exists: checked before)
        missing = [what for what, ok in (("NOT NULL", row[0]), ("unique", row[1])) if not ok]
        if missing:
            column = f"{table.display()}.{quote_ident(self._cols.position)}"
            raise ConnectorError(
                f"the position column {column} must be {' and '.join(missing)} (a primary key, or NOT NULL"
                " with a unique index on it alone): the relay reads, orders and marks rows by it, and"
                " would never read a row without one"
            )

    async def _position_caveat(self, conn: psycopg.AsyncConnection[Any], table: ResolvedTable) -> str | None:
        """Why per-aggregate order may not hold with this table, or None: the read cursor
        assumes positions drawn by the INSERT from a sequence that hands out increasing values
        across sessions (see read_cursor). Nothing is ever lost either way. Also tells the
        cursor the sequence's increment."""
        cur = await conn.execute(
            "SELECT s.seqcache, s.seqincrement FROM pg_sequence s"
            " WHERE s.seqrelid = pg_get_serial_sequence(%s::oid::regclass::text, %s)::regclass",
            (table.oid, self._cols.position),
        )
        row = await cur.fetchone()
        column = f"{table.display()}.{quote_ident(self._cols.position)}"
        if row is None:
            return (
                f"{column} is not filled by an identity or serial sequence: per-aggregate order"
                " assumes each inserting transaction draws its position, increasing, as it inserts"
            )
        if int(row[1]) < 1:
            return f"the sequence of {column} counts down: positions must increase"
        self._cursor.step = int(row[1])
        if int(row[0]) > 1:
            return (
                f"the sequence of {column} caches {row[0]} values per session, so positions do not"
                " follow the order in which they are drawn: a late row may be relayed after later rows"
                " of its aggregate (ALTER SEQUENCE ... CACHE 1)"
            )
        return None

    def _build_queries(self) -> None:
        cfg, cols = self.config, self._cols
        assert self._table is not None
        table = self._table.identifier()
        pos = sql.Identifier(cols.position)
        payload = sql.Identifier(cols.payload) if self._payload_is_bytes else _text_column(cols.payload)
        created = (
            sql.SQL("extract(epoch from {})::float8").format(sql.Identifier(cols.created_at))
            if cols.created_at
            else sql.SQL("extract(epoch from now())::float8")
        )
        select = sql.SQL(", ").join(
            [
                sql.SQL("{}::int8").format(pos),
                _text_column(cols.event_id),
                _text_column(cols.aggregate_type),
                _text_column(cols.aggregate_id),
                _text_column(cols.event_type),
                payload,
                _text_column(cols.headers) if cols.headers else sql.SQL("NULL::text"),
                created,
            ]
        )
        unpublished = (
            sql.SQL("{} IS NULL").format(sql.Identifier(cols.published_at))
            if cols.published_at and cfg.after_publish == "mark"
            else sql.SQL("true")
        )
        base = sql.SQL("SELECT {select} FROM {table} WHERE {unpublished} AND {pos} ").format(
            select=select, table=table, unpublished=unpublished, pos=pos
        )
        # Above the highest position read, lowest first: the read while there is no gap.
        self._queries["read"] = base + sql.SQL("> %s ORDER BY {} LIMIT %s").format(pos)
        # The same, with the rows in the gaps (first, last): an index probe each (OFFSET 0 keeps
        # the planner from turning the probes into a scan of the whole table), merged in
        # position order. (In the gaps' subquery the table's own columns come first: a column
        # named like the gap's fields cannot be mistaken for them.)
        in_gaps = sql.SQL(
            "SELECT r.* FROM unnest(%s::int8[], %s::int8[]) AS outbox_relay_gap(first, last),"
            " LATERAL ({base} BETWEEN outbox_relay_gap.first AND outbox_relay_gap.last OFFSET 0) AS r"
        ).format(base=base)
        self._queries["read_gaps"] = sql.SQL(
            "SELECT * FROM (({in_gaps} ORDER BY 1 LIMIT %s) UNION ALL ({base} > %s ORDER BY {pos} LIMIT %s))"
            " AS rows ORDER BY 1 LIMIT %s"
        ).format(in_gaps=in_gaps, base=base, pos=pos)
        # Everything up to a position, unpublished and not held: the sweep. (`= ANY` of a
        # constant array is hashed by PostgreSQL 14 and later; see `_sweep`.)
        self._queries["sweep"] = base + sql.SQL(
            "<= %s AND NOT ({} = ANY(%s::int8[])) ORDER BY {} LIMIT %s"
        ).format(pos, pos)
        if cfg.after_publish == "mark":
            assert cols.published_at is not None
            self._queries["ack"] = sql.SQL("UPDATE {} SET {} = now() WHERE {} = ANY(%s)").format(
                table, sql.Identifier(cols.published_at), pos
            )
        else:
            self._queries["ack"] = sql.SQL("DELETE FROM {} WHERE {} = ANY(%s)").format(table, pos)
        if self._fence is not None:
            # Under a lease, rows are marked only while the lease's token is this relay's, in
            # the same statement: a holder that lost the lease marks nothing, and says so.
            self._queries["ack"] = sql.SQL(
                "WITH fence AS (SELECT FROM {lease} WHERE lease = %s AND token = %s),"
                " acked AS ({ack} AND EXISTS (SELECT FROM fence) RETURNING NULL)"
                " SELECT EXISTS (SELECT FROM fence)"
            ).format(lease=parse_table_name(self._fence.table).identifier(), ack=self._queries["ack"])
        # The age of the first pending row by position: one index probe, where min(created_at)
        # read every pending row's heap tuple each stats round (a million with a big backlog).
        oldest = (
            sql.SQL(
                "COALESCE((SELECT CASE WHEN isfinite({created})"
                " THEN extract(epoch from now() - {created})::float8 END"
                " FROM {table} WHERE {unpublished} ORDER BY {pos} LIMIT 1), 0)"
            ).format(created=sql.Identifier(cols.created_at), table=table, unpublished=unpublished, pos=pos)
            if cols.created_at
            else sql.SQL("0::float8")
        )
        self._queries["backlog"] = sql.SQL("SELECT count(*), {} FROM {} WHERE {}").format(
            oldest, table, unpublished
        )

    async def _conn(self, which: Literal["fetch", "ack", "stats"]) -> psycopg.AsyncConnection[Any]:
        attr = f"_{which}_conn"
        conn: psycopg.AsyncConnection[Any] | None = getattr(self, attr)
        if conn is None or conn.closed or conn.broken:
            conn = await self._connect()
            if which == "fetch":
                # Fetches want the partial index in position order and stop at LIMIT. Without
                # fresh statistics (a burst of new rows, autovacuum not yet run) the planner
                # picks a bitmap scan and a sort of every pending row instead: several times
                # slower for each batch. Discouraging both on this session alone keeps the
                # plan stable; a table without a usable index still gets a scan.
                await conn.execute("SET enable_bitmapscan = off")
                await conn.execute("SET enable_seqscan = off")
            setattr(self, attr, conn)
        # (Also on a connection kept from a failed inspection: the table may exist by now.)
        if not self._queries:
            await self._inspect_table(conn)
        return conn

    async def _run(
        self,
        which: Literal["fetch", "ack", "stats"],
        query: str | sql.SQL | sql.Composed,
        params: Sequence[Any],
        *,
        prepare: bool | None = None,
    ) -> psycopg.AsyncCursor[Any]:
        """Run a query on one of the connections; `query` may name one of the built queries
        (built once the table was inspected, which connecting does when needed)."""
        conn = await self._conn(which)
        if isinstance(query, str):
            query = self._queries[query]
        try:
            return await conn.execute(query, params, prepare=prepare)
        except psycopg.OperationalError:
            # Drop the connection: the next call reconnects (database restart, network cut).
            await conn.close()
            raise

    # --- fetch --------------------------------------------------------------------------------

    @property
    def caught_up(self) -> bool:
        return self._caught_up

    async def fetch(self, limit: int) -> list[OutboxEvent]:
        limit = min(limit, self.config.batch_size)
        cursor = self._cursor
        above, gaps = cursor.begin_read()
        try:
            if gaps:
                firsts, lasts = [g[0] for g in gaps], [g[1] for g in gaps]
                cur = await self._run("fetch", "read_gaps", (firsts, lasts, limit, above, limit, limit))
            else:
                cur = await self._run("fetch", "read", (above, limit))
            rows = await cur.fetchall()
        except BaseException:
            cursor.abandon_read()
            raise
        cut_short = len(rows) >= limit
        cursor.end_read([row[0] for row in rows], cut_short)
        events = self._to_events(rows)
        self._caught_up = False
        sweep_due = time.monotonic() - self._last_sweep >= self.config.poll_interval
        if not cut_short and (self._last_read_empty or sweep_due):
            try:
                events.extend(await self._sweep(limit - len(rows)))
            except Exception:
                if events:  # what the read took is handed out; the sweep comes again
                    return events
                raise
        if cursor.wants_writers:
            try:
                cursor.note_writers(await self._writers())
            except Exception as exc:  # (a later listing serves as well: see read_cursor)
                self._log.warning("cannot list the transactions writing the table", error=str(exc))
        self._last_read_empty = not events
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
        cur = await self._run("fetch", "sweep", (cursor.highest, list(self._held), limit), prepare=False)
        rows = await cur.fetchall()
        self._caught_up = len(rows) < limit
        if rows:
            cursor.took(row[0] for row in rows)
            self._log.info(
                "relaying rows found below positions already read", count=len(rows), first_position=rows[0][0]
            )
        return self._to_events(rows)

    async def _writers(self) -> set[str]:
        """The transactions that may still commit rows into the table (see `read_cursor`)."""
        own = [
            c.info.backend_pid for c in (self._fetch_conn, self._ack_conn) if c is not None and not c.closed
        ]
        cur = await self._run("fetch", _WRITERS, (self._table_oid, own))
        return {row[0] for row in await cur.fetchall()}

    def _to_events(self, rows: Sequence[tuple[Any, ...]]) -> list[OutboxEvent]:
        events: list[OutboxEvent] = []
        append = events.append
        held = self._held
        is_bytes = self._payload_is_bytes
        content_type = self._content_type
        now = time.time()
        for position, event_id, agg_type, agg_id, event_type, payload, headers, created in rows:
            defect = None
            if payload is None:
                body = b""
                defect = "payload is NULL"
            else:
                body = payload if is_bytes else payload.encode()
            if headers is None or headers == "{}":
                header_map: dict[str, str] = {}
            else:
                header_map, problem = headers_from_json(headers)
                defect = defect or problem
            defect = defect or null_column_defect(event_id, agg_type, agg_id, event_type)
            if created is None or not _EARLIEST <= created <= _LATEST:  # (else usable as it is)
                created, problem = checked_time(created, now)
                defect = defect or problem
            append(
                OutboxEvent(
                    position,
                    # A stand-in that stays unique: the dead-letter table keys on the event id.
                    event_id if event_id is not None else f"position-{position}",
                    agg_type or "",
                    agg_id,
                    event_type or "",
                    body,
                    header_map,
                    created,
                    ack_token=position,
                    content_type=content_type,
                    defect=defect,
                )
            )
            held.add(position)
        return events

    # --- ack ----------------------------------------------------------------------------------

    def fence_with(self, fence: Fence) -> None:
        self._fence = fence
        self._queries.clear()  # (built again with the fence)

    async def ack(self, events: Sequence[OutboxEvent]) -> None:
        positions = [e.position for e in events]
        fence = self._fence
        if fence is None:
            await self._run("ack", "ack", (positions,))
        else:
            if not fence.valid():
                raise Fenced("the lease ended before these events were marked")
            cur = await self._run("ack", "ack", (fence.key, fence.token, positions))
            row = await cur.fetchone()
            if not row or not row[0]:
                raise Fenced("another relay holds the lease now: these events were not marked")
        self._held.difference_update(positions)

    async def replay(self, event: OutboxEvent) -> str:
        cfg, cols = self.config, self._cols
        conn = await self._conn("ack")
        assert self._table is not None
        if cfg.after_publish == "mark" and cols.published_at:
            # The row is still there: unmark it; the relay picks it up again at its position.
            # (Found by position, the key, then checked by event id: a text comparison of the
            # event id alone would read the whole table.)
            cur = await conn.execute(
                sql.SQL("UPDATE {} SET {} = NULL WHERE {} = %s AND {}::text = %s").format(
                    self._table.identifier(),
                    sql.Identifier(cols.published_at),
                    sql.Identifier(cols.position),
                    sql.Identifier(cols.event_id),
                ),
                (int(event.position), event.event_id),
            )
            if cur.rowcount:
                return f"unmarked row {event.event_id} in {self._table.display()}"
        await self.write([event])
        return f"inserted {event.event_id} into {self._table.display()} again"

    async def write(self, events: Sequence[OutboxEvent]) -> None:
        conn = await self._conn("ack")
        assert self._table is not None
        table = self._table.identifier()
        async with conn.transaction():
            for event in events:
                await conn.execute(*insert_event(table, self._cols.mapping(), event))

    # --- wake-ups -----------------------------------------------------------------------------

    async def wait_for_events(self) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)
        except TimeoutError:
            pass
        self._wake.clear()

    async def _listen(self) -> None:
        """Keep a LISTEN connection; on loss, reconnect with backoff (polling covers the gap)."""
        delay = 0.5
        while True:
            try:
                conn = await self._connect()
                async with conn:
                    await conn.execute(
                        sql.SQL("LISTEN {}").format(sql.Identifier(self.config.notify_channel))
                    )
                    delay = 0.5
                    self._wake.set()  # rows may have arrived while we were not listening
                    async for _ in conn.notifies():
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log.warning("LISTEN connection lost; polling meanwhile", error=str(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    # --- backlog, status, checks, DDL ---------------------------------------------------------

    async def backlog(self) -> BacklogStats:
        cur = await self._run("stats", "backlog", ())
        row = await cur.fetchone()
        assert row is not None
        return BacklogStats(pending=int(row[0]), oldest_age_seconds=max(float(row[1]), 0.0))

    async def status_lines(self) -> list[str]:
        stats = await self.backlog()
        line = f"pending={stats.pending} oldest_age={stats.oldest_age_seconds:.1f}s"
        cols = self._cols
        if self.config.after_publish == "mark" and cols.published_at and self._table is not None:
            query = sql.SQL("SELECT count(*) FROM {} WHERE {} > now() - interval '1 minute'").format(
                self._table.identifier(), sql.Identifier(cols.published_at)
            )
            row = await (await self._run("stats", query, ())).fetchone()
            line += f" published_last_minute={row[0] if row else 0}"
        return [line]

    async def check(self) -> list[str]:
        conn = await self._connect()
        try:
            types = await self._inspect_table(conn)
            assert self._table is not None
            notes = [f"table {self._table.display()}: {len(types)} columns, mapping ok"]
            problem = await self._cannot_write(conn)
            if problem:
                raise ConnectorError(problem)
            if self.position_caveat:
                notes.append(f"warning: {self.position_caveat}")
            if self.config.notify:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s AND tgname = 'outbox_relay_notify'",
                    (self._table.oid,),
                )
                row = await cur.fetchone()
                if row and row[0]:
                    notes.append("NOTIFY trigger present")
                else:
                    notes.append("NOTIFY trigger missing: latency falls back to poll_interval (run init-db)")
            return notes
        finally:
            await conn.close()

    async def _cannot_write(self, conn: psycopg.AsyncConnection[Any]) -> str | None:
        """Why `run` could read the table but never settle a row (a read-only session, a role
        without the privilege), or None: said by check rather than found by run."""
        settle = "UPDATE" if self.config.after_publish == "mark" else "DELETE"
        cur = await conn.execute(
            "SELECT current_setting('transaction_read_only') = 'on', current_user,"
            " has_table_privilege(%s::oid, 'SELECT'), has_table_privilege(%s::oid, %s)",
            (self._table_oid, self._table_oid, settle),
        )
        row = await cur.fetchone()
        assert row is not None and self._table is not None
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
                f" {self._table.display()} (after_publish: {self.config.after_publish})"
            )
        return None

    async def init_db(self, conn: psycopg.AsyncConnection[Any]) -> list[str]:
        """`init_sql()`, on the table the server finds for the configured name when there is
        one: `CREATE TABLE IF NOT EXISTS outbox` would create a second table in the first schema
        of the search_path although the name already finds one further along it."""
        cur = await conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.oid = to_regclass(%s)",
            (self._name.regclass_text(),),
        )
        row = await cur.fetchone()
        existing = QualifiedName(row[0], row[1]) if row else None
        for statement in self.init_sql(existing):
            await conn.execute(statement)
        return []

    def init_sql(self, existing: QualifiedName | None = None) -> list[sql.Composed]:
        """The DDL of `init-db`; on `existing`, the table the configured name finds, when given
        (it is then not created)."""
        cfg, cols = self.config, self._cols
        name = existing or self._name
        table = name.identifier()
        statements: list[sql.Composed] = []
        if cols == ColumnMapping().names() and existing is None:
            statements.append(default_table_ddl(self._name))
        if cols.published_at and cfg.after_publish == "mark":
            statements.append(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({}) WHERE {} IS NULL").format(
                    sql.Identifier(derived_name(name.name, "_unpublished")),
                    table,
                    sql.Identifier(cols.position),
                    sql.Identifier(cols.published_at),
                )
            )
        if cfg.notify:
            statements.extend(
                [
                    _NOTIFY_FUNCTION,
                    sql.SQL("DROP TRIGGER IF EXISTS outbox_relay_notify ON {}").format(table),
                    # One notification per inserting statement: cheap even for bulk inserts.
                    sql.SQL(
                        "CREATE TRIGGER outbox_relay_notify AFTER INSERT ON {} FOR EACH STATEMENT"
                        " EXECUTE FUNCTION outbox_relay_notify({})"
                    ).format(table, sql.Literal(cfg.notify_channel)),
                ]
            )
        return statements

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        for attr in ("_fetch_conn", "_ack_conn", "_stats_conn"):
            conn = getattr(self, attr)
            if conn is not None:
                await conn.close()
                setattr(self, attr, None)


def default_table_ddl(table: QualifiedName) -> sql.Composed:
    """The default outbox table of DESIGN.md (shared by both PostgreSQL sources)."""
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


plugin = SourcePlugin(type="postgres-polling", config=PostgresPollingConfig, factory=PostgresPollingSource)
