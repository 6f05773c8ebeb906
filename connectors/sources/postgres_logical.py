"""Source `postgres-logical`: streams the WAL through a logical replication slot (pgoutput).

Two modes:
- `table`: INSERTs into the configured outbox table(s) become events (UPDATE/DELETE are not
  published: the publication is `publish = 'insert'`), so the insert-then-delete-in-one-transaction
  pattern works and a Debezium-style table works through `columns:`.
- `message`: `pg_logical_emit_message(true, '<prefix>', '<json>')` becomes an event; nothing is
  written to any table at all. The JSON: {"event_id", "aggregate_type", "aggregate_id",
  "event_type", "payload", "headers"} (see `relay.outbox.emit_event`).

Order is commit order; events of one transaction keep their order. `position` is the WAL
location of the change, which increases along one aggregate's events when its writers are
serialized. Acknowledgement: the flush position confirmed to PostgreSQL only ever moves to the end
of a transaction all of whose events (and of every transaction before it) the broker
acknowledged, so a restart resumes from the slot without skipping anything unacknowledged.
Memory: events are decoded as they are fetched, never a whole transaction at once; the pipeline's
window bounds what is held, the socket holds the rest (a 200,000-event transaction is streamed).
"""

from __future__ import annotations

import asyncio
import codecs
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg import pq
from psycopg import sql as psql
from pydantic import Field, ValidationInfo, field_validator

from outbox_relay import json_span
from outbox_relay.connectors.sources import pgoutput
from outbox_relay.connectors.sources.postgres_connect import (
    EventColumns,
    connect,
    domain_bases,
    insert_event,
    missing_columns,
    null_column_defect,
    resolve_table,
)
from outbox_relay.connectors.sources.postgres_polling import default_table_ddl
from outbox_relay.durations import Duration
from outbox_relay.events import OutboxEvent, checked_time, headers_from_json, member_texts, unencodable
from outbox_relay.identifiers import (
    Identifier,
    IdentifierError,
    QualifiedName,
    TableName,
    parse_identifier,
    parse_table_name,
    printable,
    quote_ident,
)
from outbox_relay.interfaces import BacklogStats, ConnectorError, Fence, Fenced, Source, Unsupported
from outbox_relay.logs import get_logger
from outbox_relay.outbox import message_content
from outbox_relay.pgsession import Dsn, database_place, server_place
from outbox_relay.registry import Claim, ConnectorConfig, SourcePlugin
from outbox_relay.secrets import scrubber

HEARTBEAT_PREFIX = "outbox_relay_heartbeat"
#: (dsn, slot) -> ((system identifier, timeline), position) this process last confirmed: a source
#: built anew in the same process (a new lease term) resumes from there (see `_resume_position`).
_CONFIRMED: dict[tuple[str, str], tuple[tuple[str, str], int]] = {}
_JSON_OIDS = {114, 3802}
_BYTEA_OID = 17
_MESSAGE_MODE = (
    "{key} is read in mode: table only; mode: message takes events from"
    " pg_logical_emit_message (message_prefix), not from tables: remove {key} or use mode: table"
)
#: PostgreSQL's own rule for replication slot names.
_SLOT = r"^[a-z0-9_]{1,63}$"


class LogicalColumns(EventColumns):
    """Column names in `table` mode. A Debezium-style table maps as {event_id: id,
    aggregate_type: aggregatetype, aggregate_id: aggregateid, event_type: type, headers: null,
    created_at: null}."""


class PostgresLogicalConfig(ConnectorConfig):
    type: Literal["postgres-logical"]
    dsn: Dsn = Field(description="libpq connection string or URL; the user needs REPLICATION.")
    slot: str = Field(default="outbox_relay", pattern=_SLOT, description="Lower-case letters, digits and _.")
    publication: Identifier = Field(
        default="outbox_relay", description="A name as in SQL: double-quote a mixed-case one."
    )
    mode: Literal["table", "message"] = "table"
    tables: list[TableName] = Field(
        default=["public.outbox"],
        min_length=1,
        description="name or schema.name as in SQL: unquoted parts fold to lower case, double-quoted"
        " ones are kept as written; an unqualified name is looked up through the search_path.",
    )
    message_prefix: str = Field(default="outbox", min_length=1)
    columns: LogicalColumns = LogicalColumns()
    batch_size: int = Field(default=2000, ge=1, le=100_000, description="Events per fetch at most.")
    poll_interval: Duration = Field(
        default=0.5,
        ge=0.01,
        description="Longest wait for WAL data (at least 10ms: an idle relay must not spin).",
    )
    heartbeat_interval: Duration = Field(
        default=10.0,
        ge=0,
        description="Emit a WAL message this often so an idle slot advances; 0: off (else at least 100ms:"
        " each one writes WAL).",
    )
    status_interval: Duration = Field(
        default=5.0,
        ge=0.1,
        description="Standby status updates at least this often (< wal_sender_timeout; at least 100ms).",
    )
    connect_timeout: Duration = Field(default=5.0, gt=0)

    # (Field validators run only for keys the file sets: the defaults of `tables` and `columns`
    # stay valid in message mode.)
    @field_validator("tables")
    @classmethod
    def _tables_once_in_table_mode(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("mode") == "message":
            raise ValueError(_MESSAGE_MODE.format(key="tables"))
        seen: dict[tuple[str | None, str], int] = {}
        for index, text in enumerate(value):
            table = parse_table_name(text)
            first = seen.setdefault((table.schema, table.name), index)
            if first != index:
                raise ValueError(
                    f"table {table.display()} is listed twice (tables[{first}] and tables[{index}])"
                )
        return value

    @field_validator("columns")
    @classmethod
    def _columns_in_table_mode(cls, value: LogicalColumns, info: ValidationInfo) -> LogicalColumns:
        if info.data.get("mode") == "message":
            raise ValueError(_MESSAGE_MODE.format(key="columns"))
        return value

    @field_validator("heartbeat_interval")
    @classmethod
    def _heartbeat_off_or_sparse(cls, value: float) -> float:
        if 0 < value < 0.1:
            raise ValueError("must be 0 (off) or at least 0.1 (100ms): each heartbeat writes WAL")
        return value

    def lease_scope(self) -> str:
        return f"slot {self.slot}"

    def claims(self) -> list[Claim]:
        database = database_place(self.dsn)
        found = [
            Claim("replication slot", server_place(self.dsn), None, self.slot, "slot", self.slot),
            Claim(
                "publication",
                database,
                None,
                parse_identifier(self.publication),
                "publication",
                quote_ident(parse_identifier(self.publication)),
            ),
        ]
        if self.mode == "table":
            for index, text in enumerate(self.tables):
                table = parse_table_name(text)
                key = f"tables[{index}]"
                found.append(Claim("table", database, table.schema, table.name, key, table.display()))
        return found


class _Unit:
    """One transaction (or one non-transactional message) in commit order."""

    __slots__ = ("closed", "end_lsn", "events", "first_created_at", "outstanding")

    def __init__(self) -> None:
        self.outstanding = 0
        #: Events of it handed out (acknowledged or not).
        self.events = 0
        self.closed = False
        self.end_lsn: int | None = None
        #: `created_at` of its first event: the age of the unit in `backlog()`.
        self.first_created_at: float | None = None


@dataclass(frozen=True, slots=True)
class _TableShape:
    indexes: tuple[int, int, int, int, int, int | None, int | None]
    content_type: str
    payload_is_bytea: bool


class PostgresLogicalSource(Source):
    kind = "postgres-logical"

    def __init__(self, config: PostgresLogicalConfig) -> None:
        self.config = config
        self._log = get_logger(source=self.kind, slot=config.slot)
        self._repl: psycopg.AsyncConnection[Any] | None = None
        self._sql: psycopg.AsyncConnection[Any] | None = None
        self._fence: Fence | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._relations: dict[int, _TableShape | str | None] = {}
        #: The configured tables, as written in the config (`resolve_tables` finds them).
        self.table_names = tuple(config.tables)
        #: (schema, table), as Relation messages name them, of the tables whose inserts become
        #: events: the configured tables as the server resolved them on start.
        self._tables: set[tuple[str, str]] = set()
        self._columns = config.columns.names()
        #: Domain type oid -> its base type: a payload column declared as a domain over bytea.
        self._domain_bases: dict[int, tuple[int, str]] = {}
        self._units: deque[_Unit] = deque()
        self._current: _Unit | None = None
        self._commit_time = 0.0
        self._received = 0  # highest WAL position seen in the stream
        self._confirmed = 0  # flush position that may be confirmed to the server
        self._sent_confirmed = -1
        #: Why the publication no longer matches the config, while it does not.
        self._mismatch: ConnectorError | None = None
        #: (system identifier, timeline) of the server the stream last came from: `_confirmed`
        #: is a position in that server's WAL history only.
        self._history: tuple[str, str] | None = None
        self._caught_up = False
        self._drain_target = 0
        self._held = 0
        #: Events of the units not confirmed yet (see `unconfirmed`).
        self._unconfirmed = 0
        self._current_commit_lsn = 0
        #: The error a change could not get past, and the commit position of its transaction:
        #: a fetch that returns nothing raises it again until a commit at or past it is read.
        self._stuck: tuple[ConnectorError, int] | None = None
        #: Message mode on a database whose encoding is not UTF8: how its bytes decode (see
        #: `_message_charmap`); None when messages are UTF-8 already.
        self._charmap: str | None = None

    # --- connections --------------------------------------------------------------------------

    async def _connect(self, replication: bool) -> psycopg.AsyncConnection[Any]:
        return await connect(self.config.dsn, self.config.connect_timeout, replication=replication)

    async def _sql_conn(self) -> psycopg.AsyncConnection[Any]:
        if self._sql is None or self._sql.closed or self._sql.broken:
            self._sql = await self._connect(replication=False)
        return self._sql

    async def start(self) -> None:
        sql = await self._sql_conn()
        await self._resolve(sql)
        if self.config.mode == "message":
            self._charmap = await _message_charmap(sql)
        # The WAL position the relay must reach for `--drain`: a heartbeat written now.
        cur = await sql.execute("SELECT pg_logical_emit_message(true, %s, '')::text", (HEARTBEAT_PREFIX,))
        row = await cur.fetchone()
        self._drain_target = pgoutput.parse_lsn(row[0]) if row else 0
        await self._start_stream()
        if not self._tasks:
            self._tasks.append(asyncio.create_task(self._status_loop(), name="outbox-relay:standby-status"))
            self._tasks.append(
                asyncio.create_task(self._watch_publication(), name="outbox-relay:publication")
            )
            if self.config.heartbeat_interval > 0:
                self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="outbox-relay:heartbeat"))

    async def _start_stream(self) -> None:
        """Open the replication connection and START_REPLICATION where this relay confirmed up
        to, else (first start, another server) from the slot's confirmed position."""
        cfg = self.config
        conn = await self._connect(replication=True)
        pgconn = conn.pgconn
        try:
            start = await self._resume_position(pgconn)
        except ConnectorError:
            await conn.close()
            raise
        command = start_replication_command(cfg.slot, start, cfg.publication).as_string(conn)
        # A stream ended a moment ago (the previous lease holder's, which the new holder just
        # ended) may hold the slot for a few milliseconds more: a refusal for that is no news.
        give_up_at = time.monotonic() + _SLOT_RELEASE_S
        while True:
            result = await self._command(pgconn, command)
            if result is not None and result.status == pq.ExecStatus.COPY_BOTH:
                break
            message = (result.get_error_message() if result else pgconn.get_error_message()) or "failed"
            if "is active for PID" not in message or time.monotonic() >= give_up_at:
                await conn.close()
                raise ConnectorError(_explain_start_error(cfg, message.strip()))
            await asyncio.sleep(0.1)
        self._repl = conn
        # A transaction cut off by the lost connection will be sent again in full; its events
        # already held are published anyway (they did commit), but it must not confirm anything.
        if self._current is not None:
            self._current.closed = True
            self._current = None
        self._relations.clear()
        self._log.info("streaming from replication slot", publication=cfg.publication, mode=cfg.mode)

    async def _resume_position(self, pgconn: pq.abc.PGconn) -> int:
        """Where to ask the server to start: what this relay confirmed, when the server is the
        one it confirmed it to. A server restarted cleanly before PostgreSQL 17 may have saved
        an older position for the slot and would resend everything since; the server takes the
        later of the two positions. After a failover or a restore (another system or timeline)
        the relay's position means nothing there: the slot's own serves, and confirming starts
        over from what this stream delivers."""
        result = await self._command(pgconn, "IDENTIFY_SYSTEM")
        if result is None or result.status != pq.ExecStatus.TUPLES_OK or result.ntuples != 1:
            message = (result.get_error_message() if result else pgconn.get_error_message()) or "failed"
            raise ConnectorError(f"IDENTIFY_SYSTEM failed: {scrubber.scrub(message.strip())}")
        system, timeline, wal_end = (bytes(result.get_value(0, i) or b"").decode() for i in range(3))
        while pgconn.get_result() is not None:  # (libpq: read results until none is left)
            pass
        history, start = (system, timeline), 0
        if self._history is None and (self.config.dsn, self.config.slot) in _CONFIRMED:
            # A new source in a process that relayed this slot before (a new lease term after a
            # database restart): what it confirmed still holds.
            self._history, self._confirmed = _CONFIRMED[(self.config.dsn, self.config.slot)]
        if self._history == history and self._confirmed <= pgoutput.parse_lsn(wal_end):
            start = self._confirmed
        elif self._history is not None:
            self._log.warning(
                "the database does not hold the position this relay confirmed (failover, restore"
                " or lost WAL?): resuming from the replication slot's own position",
                was=f"system {self._history[0]} timeline {self._history[1]}",
                now=f"system {system} timeline {timeline} wal_end {wal_end}",
                confirmed=pgoutput.format_lsn(self._confirmed),
            )
            self._confirmed, self._sent_confirmed = 0, -1
            for unit in self._units:  # their positions belong to the other history: confirm none
                unit.end_lsn = None
        self._history = history
        return start

    async def _command(self, pgconn: pq.abc.PGconn, command: str) -> pq.abc.PGresult | None:
        """Send one replication command and wait, without blocking the loop, for its result."""
        pgconn.send_query(command.encode())
        while True:
            pgconn.consume_input()
            if not pgconn.is_busy():
                break
            await self._readable(pgconn.socket, 10.0)
        return pgconn.get_result()

    async def _readable(self, fd: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(fd)

    async def _stream(self) -> psycopg.AsyncConnection[Any]:
        if self._repl is None or self._repl.closed or self._repl.broken:
            await self._drop_stream()
            await self._start_stream()
        assert self._repl is not None
        return self._repl

    async def _drop_stream(self) -> None:
        if self._repl is not None:
            await self._repl.close()
            self._repl = None

    # --- fetch --------------------------------------------------------------------------------

    @property
    def caught_up(self) -> bool:
        return self._caught_up

    async def fetch(self, limit: int) -> list[OutboxEvent]:
        if self._mismatch is not None:
            raise self._mismatch
        conn = await self._stream()
        pgconn = conn.pgconn
        limit = min(limit, self.config.batch_size)
        events: list[OutboxEvent] = []
        units_before, current_before = set(map(id, self._units)), self._current
        try:
            pgconn.consume_input()
            while len(events) < limit:
                size, frame = pgconn.get_copy_data(1)
                if size == 0:
                    break
                if size < 0:
                    raise psycopg.OperationalError(
                        scrubber.scrub(pgconn.get_error_message() or "replication stream ended")
                    )
                self._on_frame(bytes(frame), events)
        except psycopg.Error as exc:
            await self._drop_stream()
            raise psycopg.OperationalError(scrubber.scrub(str(exc))) from None
        except Exception as exc:
            # A change this source cannot turn into an event: never read past it. Dropping the
            # stream makes the server send everything after the confirmed position again, so
            # nothing is skipped; the pipeline retries, and the error stays until it is fixed.
            # (Events already taken from the stream this time are handed out on the next
            # fetch again, as they are sent again.)
            error = (
                exc
                if isinstance(exc, ConnectorError)
                else ConnectorError(scrubber.scrub(f"cannot decode the replication stream: {exc!r}"))
            )
            # Until the transaction it failed in is read through, the source is stuck there,
            # also while the stream is quiet after reconnecting (see below).
            self._stuck = (error, self._current_commit_lsn if self._current is not None else self._received)
            await self._drop_stream()
            self._forget_fetch(events, units_before, current_before)
            raise error from None
        if self._stuck is not None and not events:
            raise self._stuck[0]
        self._held += len(events)
        self._caught_up = (
            len(events) < limit and self._current is None and self._received >= self._drain_target
        )
        if self._confirmed != self._sent_confirmed:
            self._send_status()
        return events

    def _forget_fetch(
        self, events: list[OutboxEvent], units_before: set[int], current_before: _Unit | None
    ) -> None:
        """Undo what a failed fetch took from the stream: the server sends it all again after
        the confirmed position. The transactions it began are dropped; the one it continued
        keeps its earlier events (handed out already) but may no longer confirm anything."""
        for event in events:
            unit = event.ack_token
            unit.outstanding -= 1
            unit.events -= 1
            self._unconfirmed -= 1
        kept = deque(unit for unit in self._units if id(unit) in units_before)
        self._unconfirmed -= sum(unit.events for unit in self._units if id(unit) not in units_before)
        self._units = kept
        assert self._unconfirmed >= 0
        if current_before is not None:
            current_before.closed = True
            current_before.end_lsn = None
        self._current = None

    def _on_frame(self, frame: bytes, events: list[OutboxEvent]) -> None:
        parsed = pgoutput.parse_frame(frame)
        if isinstance(parsed, pgoutput.Keepalive):
            self._received = max(self._received, parsed.wal_end)
            if self._current is None and not self._units:
                # Everything sent so far is acknowledged or was never ours: let the slot advance.
                self._confirmed = max(self._confirmed, parsed.wal_end)
            if parsed.reply_requested:
                self._send_status(reply=False)
            return
        if parsed is None:
            return
        self._received = max(self._received, parsed.wal_end, parsed.wal_start)
        message = pgoutput.decode(parsed.payload)
        if isinstance(message, pgoutput.Insert):
            if message.relid not in self._relations:
                raise ConnectorError(f"an insert into relation {message.relid} came before its description")
            if self._current is None:
                raise ConnectorError("an insert came outside of a transaction")
            shape = self._relations[message.relid]
            if isinstance(shape, str):  # a table the config does not name
                raise ConnectorError(shape)
            if shape is not None:  # (None: a table message mode does not read)
                self._hand_out(
                    events, self._row_event(message.values, shape, parsed.wal_start, self._current)
                )
        elif isinstance(message, pgoutput.Begin):
            self._current = _Unit()
            self._units.append(self._current)
            self._commit_time = pgoutput.pg_time_to_epoch(message.commit_time_us)
            self._current_commit_lsn = message.final_lsn
        elif isinstance(message, pgoutput.Commit):
            if self._stuck is not None and message.commit_lsn >= self._stuck[1]:
                self._stuck = None  # read through where it failed: it is fixed
            if self._current is not None:
                self._current.closed = True
                self._current.end_lsn = message.end_lsn
                self._current = None
                self._release_acknowledged()
        elif isinstance(message, pgoutput.Relation):
            self._relations[message.relid] = self._shape(message)
        elif isinstance(message, pgoutput.Message):
            self._on_message(message, parsed.wal_start, events)

    def _on_message(self, message: pgoutput.Message, lsn: int, events: list[OutboxEvent]) -> None:
        if message.prefix != self.config.message_prefix or self.config.mode != "message":
            return
        unit = self._current
        if unit is None or not message.transactional:
            # A non-transactional message is its own unit, confirmed at its own position.
            unit = _Unit()
            unit.closed = True
            unit.end_lsn = message.lsn
            self._units.append(unit)
        self._hand_out(events, self._message_event(message, lsn, unit))

    def _shape(self, relation: pgoutput.Relation) -> _TableShape | str | None:
        """How to read the rows of a published table; None in message mode (tables are not
        read). For a table the config does not name, why its inserts cannot become events: an
        insert into it is an error (skipping it would confirm the slot past it). (Its
        description alone is not: with publish_via_partition_root, PostgreSQL 15 also describes
        a partition whose inserts it sends under the partitioned table's name.)"""
        if self.config.mode != "table":
            return None
        if (relation.namespace, relation.name) not in self._tables:
            configured = ", ".join(sorted(_shown(pair) for pair in self._tables))
            return (
                f"publication {_quoted(parse_identifier(self.config.publication))} publishes table"
                f" {_shown((relation.namespace, relation.name))}, which is not in tables: {configured};"
                " its inserts cannot become events (add it to tables:, or remove it from the publication)"
            )
        cols = self._columns
        index = {name: i for i, name in enumerate(relation.columns)}
        wanted = [cols.event_id, cols.aggregate_type, cols.aggregate_id, cols.event_type, cols.payload]
        missing = [name for name in wanted if name not in index]
        for optional in (cols.headers, cols.created_at):
            if optional is not None and optional not in index:
                missing.append(optional)
        if missing:
            # Not silent: every insert of this table would be lost otherwise; fail loudly instead.
            raise ConnectorError(f"table {relation.qualified_name} has no column(s) {', '.join(missing)}")
        payload_oid = relation.type_oids[index[cols.payload]]
        payload_oid = self._domain_bases.get(payload_oid, (payload_oid, ""))[0]
        return _TableShape(
            (
                index[cols.event_id],
                index[cols.aggregate_type],
                index[cols.aggregate_id],
                index[cols.event_type],
                index[cols.payload],
                index[cols.headers] if cols.headers else None,
                index[cols.created_at] if cols.created_at else None,
            ),
            "application/json"
            if payload_oid in _JSON_OIDS
            else ("application/octet-stream" if payload_oid == _BYTEA_OID else "text/plain; charset=utf-8"),
            payload_oid == _BYTEA_OID,
        )

    def _row_event(
        self, values: list[bytes | None], shape: _TableShape, lsn: int, unit: _Unit
    ) -> OutboxEvent:
        """The event of an inserted row; a row whose values cannot be decoded is not skipped but
        becomes a defect (dead-lettered with its payload bytes as they came)."""
        try:
            return self._table_event(values, shape, lsn, unit)
        except (ValueError, TypeError, IndexError) as exc:  # (UnicodeDecodeError is a ValueError)
            raw = values[shape.indexes[4]] if len(values) > shape.indexes[4] else None
            return OutboxEvent(
                lsn, f"lsn-{pgoutput.format_lsn(lsn)}", "", None, "", bytes(raw or b""), {},
                self._commit_time, ack_token=unit, content_type="application/octet-stream",
                defect=f"cannot decode the row: {exc}",
            )  # fmt: skip

    def _table_event(
        self, values: list[bytes | None], shape: _TableShape, lsn: int, unit: _Unit
    ) -> OutboxEvent:
        i_id, i_type, i_agg, i_event, i_payload, i_headers, i_created = shape.indexes
        defect = None
        payload = values[i_payload]
        if payload is None:
            payload, defect = b"", "payload is NULL"
        elif shape.payload_is_bytea:
            payload = bytes.fromhex(payload[2:].decode())  # text form of bytea: \x0a1b...
        headers: dict[str, str] = {}
        raw_headers = values[i_headers] if i_headers is not None else None
        if raw_headers is not None and raw_headers != b"{}":
            headers, problem = headers_from_json(raw_headers)
            defect = defect or problem
        created: float | None = None
        raw_created = values[i_created] if i_created is not None else None
        if raw_created is not None:
            try:
                created = pgoutput.timestamptz_text_to_epoch(raw_created.decode())
            except ValueError:  # 'infinity', a year past 9999
                created = float("inf")
        created, problem = checked_time(created, self._commit_time)
        event_id, aggregate_type = _text(values[i_id]), _text(values[i_type])
        aggregate_id, event_type = _text(values[i_agg]), _text(values[i_event])
        defect = defect or null_column_defect(event_id, aggregate_type, aggregate_id, event_type) or problem
        return OutboxEvent(
            lsn,
            # A stand-in that stays unique: the dead-letter table keys on the event id.
            event_id if event_id is not None else f"lsn-{pgoutput.format_lsn(lsn)}",
            aggregate_type or "",
            aggregate_id,
            event_type or "",
            payload,
            headers,
            created,
            ack_token=unit,
            content_type=shape.content_type,
            defect=defect,
        )

    def _message_event(self, message: pgoutput.Message, lsn: int, unit: _Unit) -> OutboxEvent:
        content = message.content
        try:
            if self._charmap is not None:  # the database's encoding, to UTF-8 as the server converts
                content = codecs.charmap_decode(content, "strict", self._charmap)[0].encode()
            body = json_span.parse(content)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            # The payload as the application wrote it: its bytes in the message, never re-encoded.
            span = json_span.member_spans(content, ("payload",)).get("payload")
        except ValueError as exc:  # orjson.JSONDecodeError and UnicodeDecodeError are ValueErrors
            reason = f"message is not an outbox event JSON object: {exc}"
            return OutboxEvent(
                lsn, f"lsn-{pgoutput.format_lsn(lsn)}", "", None, "", content, {},
                self._commit_time, ack_token=unit, defect=reason,
            )  # fmt: skip
        defect: str | None = None
        for required in ("event_id", "aggregate_type", "aggregate_id", "event_type"):
            if body.get(required) in (None, ""):
                defect = defect or f"message lacks {required}"
        # Fields and header values as written (a numeric aggregate id keeps its digits).
        fields = member_texts(content, {k: v for k, v in body.items() if k != "payload" and v is not None})
        headers: dict[str, str] = {}
        if isinstance(body.get("headers"), dict):
            start, end = json_span.member_spans(content, ("headers",))["headers"]
            headers = member_texts(content[start:end], body["headers"])
        elif body.get("headers") not in (None, {}):
            defect = defect or "headers must be a JSON object"
        texts = [fields.get(k, "") for k in ("event_id", "aggregate_type", "aggregate_id", "event_type")]
        defect = defect or unencodable([*texts, *headers, *headers.values()])
        return OutboxEvent(
            lsn,
            fields.get("event_id") or f"lsn-{pgoutput.format_lsn(lsn)}",
            fields.get("aggregate_type", ""),
            fields.get("aggregate_id"),
            fields.get("event_type", ""),
            b"null" if span is None else content[span[0] : span[1]],
            headers if defect is None else {},
            self._commit_time,
            ack_token=unit,
            defect=defect,
        )

    # --- ack ----------------------------------------------------------------------------------

    def fence_with(self, fence: Fence) -> None:
        self._fence = fence

    async def ack(self, events: Sequence[OutboxEvent]) -> None:
        # (The slot itself fences too: one process streams it at a time, and a new holder ends
        # the stream of the one before; see relay.leadership.)
        if self._fence is not None and not self._fence.valid():
            raise Fenced("the lease ended before these events were confirmed")
        for event in events:
            event.ack_token.outstanding -= 1
        self._held -= len(events)
        self._release_acknowledged()
        if self._confirmed != self._sent_confirmed:
            self._send_status()

    @property
    def unconfirmed(self) -> int:
        """Events of transactions not confirmed yet, acknowledged or not: a crash now sends them
        again. While the oldest of them is still being read it cannot be confirmed before its
        end, so it does not count then: reading goes on to its end, however large it is."""
        if self._units and self._units[0] is self._current:
            return 0
        return self._unconfirmed

    def _hand_out(self, events: list[OutboxEvent], event: OutboxEvent) -> None:
        """Add `event` to what a fetch returns, counted in its transaction unit (its
        `ack_token`) until acknowledged, and among the unconfirmed events until confirmed."""
        unit: _Unit = event.ack_token
        unit.outstanding += 1
        unit.events += 1
        self._unconfirmed += 1
        if unit.first_created_at is None:
            unit.first_created_at = event.created_at
        events.append(event)

    def _release_acknowledged(self) -> None:
        units = self._units
        while units and units[0].closed and units[0].outstanding <= 0:
            unit = units.popleft()
            self._unconfirmed -= unit.events
            if unit.end_lsn is not None:
                self._confirmed = max(self._confirmed, unit.end_lsn)

    def _send_status(self, reply: bool = False) -> None:
        conn = self._repl
        if conn is None or conn.closed or (self._fence is not None and not self._fence.valid()):
            return
        flushed = self._confirmed
        message = pgoutput.standby_status(self._received, flushed, int(time.time() * 1e6), reply)
        try:
            conn.pgconn.put_copy_data(message)
            conn.pgconn.flush()
            self._sent_confirmed = self._confirmed
            if self._history is not None:
                _CONFIRMED[(self.config.dsn, self.config.slot)] = (self._history, flushed)
        except Exception as exc:  # the next fetch notices the broken connection and reconnects
            self._log.debug("standby status not sent", error=str(exc))

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval)
            self._send_status()

    async def _watch_publication(self) -> None:
        """Every second, check that the publication still publishes exactly the configured
        tables (ALTER PUBLICATION, a table dropped and created again, a migration). PostgreSQL
        decodes an insert with the publication as it was then: inserts into a table while it is
        not published never reach the relay, whatever it confirms later, and nothing in the
        stream tells. So the relay stops, not ready, and says so in the log until the
        publication matches again (the events written meanwhile must be written again)."""
        cfg = self.config
        while True:
            await asyncio.sleep(1.0)
            try:
                sql = await self._sql_conn()
                problem = await publication_mismatch(sql, cfg.publication, sorted(self._tables))
            except Exception as exc:  # the database is away: the stream notices that too
                self._log.debug("publication check failed", error=scrubber.scrub(str(exc)))
                continue
            if problem is not None:
                if self._mismatch is None:
                    self._log.error(
                        "the publication no longer matches the config: inserts it does not publish"
                        " never reach the relay (write them again once it matches); stopped",
                        problem=problem,
                    )
                self._mismatch = ConnectorError(problem)
            elif self._mismatch is not None:
                self._log.info("the publication matches the config again")
                self._mismatch = None

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            try:
                sql = await self._sql_conn()
                await sql.execute("SELECT pg_logical_emit_message(true, %s, '')", (HEARTBEAT_PREFIX,))
            except Exception as exc:
                self._log.warning("heartbeat failed", error=scrubber.scrub(str(exc)))

    async def replay(self, event: OutboxEvent) -> str:
        if self.config.mode == "message":
            await self.write([event])
            return f"emitted {event.event_id} as a WAL message again"
        # A row with the same event_id may still be there (event ids are unique): replace it.
        await self.write([event], replace=True)
        return f"inserted {event.event_id} into {parse_table_name(self.config.tables[0])} again"

    async def write(self, events: Sequence[OutboxEvent], replace: bool = False) -> None:
        cfg = self.config
        conn = await self._sql_conn()
        table = parse_table_name(cfg.tables[0]).identifier()
        async with conn.transaction():
            for event in events:
                if cfg.mode == "message":
                    try:  # (a payload the relay could not read as JSON cannot go into a message)
                        json_span.parse(event.payload)
                    except ValueError as exc:
                        raise ConnectorError(f"event {event.event_id}: payload is not JSON: {exc}") from None
                    content = message_content(
                        event.event_id,
                        event.aggregate_type,
                        event.aggregate_id,
                        event.event_type,
                        event.payload,  # its bytes as they are
                        event.headers,
                    )
                    await conn.execute(
                        "SELECT pg_logical_emit_message(true, %s, %s)", (cfg.message_prefix, content)
                    )
                    continue
                if replace:
                    await conn.execute(
                        psql.SQL("DELETE FROM {} WHERE {}::text = %s").format(
                            table, psql.Identifier(self._columns.event_id)
                        ),
                        (event.event_id,),
                    )
                await conn.execute(*insert_event(table, self._columns.mapping(), event))

    # --- waiting ------------------------------------------------------------------------------

    async def wait_for_events(self) -> None:
        conn = self._repl
        if conn is None or conn.closed:
            await asyncio.sleep(self.config.poll_interval)
            return
        await self._readable(conn.pgconn.socket, self.config.poll_interval)

    # --- backlog, status, checks, DDL ---------------------------------------------------------

    async def _slot_row(self) -> tuple[Any, ...] | None:
        sql = await self._sql_conn()
        cur = await sql.execute(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, active, confirmed_flush_lsn::text,"
            " active_pid FROM pg_replication_slots WHERE slot_name = %s",
            (self.config.slot,),
        )
        return await cur.fetchone()

    async def backlog(self) -> BacklogStats:
        row = await self._slot_row()
        lag = int(row[0] or 0) if row else 0
        # The oldest event read and not yet acknowledged: units are in commit order. (Events the
        # relay has not read yet are newer; their amount shows as slot lag.)
        oldest = next(
            (u.first_created_at for u in self._units if u.outstanding > 0 and u.first_created_at is not None),
            None,
        )
        age = max(0.0, time.time() - oldest) if oldest is not None else 0.0
        return BacklogStats(pending=max(self._held, 0), oldest_age_seconds=age, slot_lag_bytes=lag)

    async def status_lines(self) -> list[str]:
        row = await self._slot_row()
        if row is None:
            return [f"slot {self.config.slot}: missing (run: outbox-relay init-db)"]
        lag, active, confirmed, pid = row
        state = f"active (pid {pid})" if active else "inactive"
        return [f"slot {self.config.slot}: lag_bytes={lag} confirmed_flush_lsn={confirmed} {state}"]

    async def check(self) -> list[str]:
        cfg = self.config
        sql = await self._connect(replication=False)
        try:
            notes: list[str] = []
            wal_level = await (await sql.execute("SHOW wal_level")).fetchone()
            if not wal_level or wal_level[0] != "logical":
                raise ConnectorError(
                    f"wal_level is {wal_level[0] if wal_level else '?'}, logical replication needs"
                    " wal_level = logical (postgresql.conf, then restart PostgreSQL)"
                )
            role = await (
                await sql.execute(
                    "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user"
                )
            ).fetchone()
            if not role or not role[0]:
                raise ConnectorError(
                    "the database user lacks the REPLICATION attribute (ALTER ROLE ... REPLICATION)"
                )
            tables: list[tuple[str, str]] = []
            if cfg.mode == "table":
                tables = await resolve_tables(sql, cfg.tables)
                for schema, name in tables:
                    await self._check_columns(sql, schema, name)
                shown = ", ".join(_shown(pair) for pair in tables)
                notes.append(f"table(s) {shown}: mapping ok")
            problem = await publication_mismatch(sql, cfg.publication, tables)
            if problem:
                raise ConnectorError(problem)
            row = await (
                await sql.execute(
                    "SELECT active, active_pid, plugin FROM pg_replication_slots WHERE slot_name = %s",
                    (cfg.slot,),
                )
            ).fetchone()
            if not row:
                raise ConnectorError(f"replication slot {cfg.slot} is missing (run: outbox-relay init-db)")
            if row[2] != "pgoutput":
                raise ConnectorError(f"replication slot {cfg.slot} uses plugin {row[2]}, not pgoutput")
            notes.append("wal_level logical, REPLICATION granted, publication and slot present")
            if self.config.mode == "message" and await _message_charmap(sql) is not None:
                encoding = sql.info.parameter_status("server_encoding")
                notes.append(f"messages are converted from the database's encoding {encoding} to UTF-8")
            if row[0]:
                notes.append(f"slot {cfg.slot} is in use by pid {row[1]} (another relay is active)")
            return notes
        finally:
            await sql.close()

    async def _check_columns(self, conn: psycopg.AsyncConnection[Any], schema: str, name: str) -> None:
        cur = await conn.execute(
            "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped",
            (schema, name),
        )
        present = [row[0] for row in await cur.fetchall()]
        problem = missing_columns(
            _shown((schema, name)), self.config.columns.model_dump(), self._columns.mapping(), present
        )
        if problem:
            raise ConnectorError(problem)

    async def _resolve(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Find the configured tables as the server does and check that the publication
        publishes exactly them; a mismatch would skip events silently, so it stops the start."""
        cfg = self.config
        tables = await resolve_tables(conn, cfg.tables) if cfg.mode == "table" else []
        problem = await publication_mismatch(conn, cfg.publication, tables)
        if problem:
            raise ConnectorError(problem)
        self._tables = set(tables)
        self._domain_bases = await domain_bases(conn)

    def _table_sql(self) -> list[psql.Composed]:
        if self.config.mode == "table" and self._columns == LogicalColumns().names():
            return [default_table_ddl(parse_table_name(table)) for table in self.config.tables]
        return []

    def _slot_sql(self) -> psql.Composed:
        # Must run outside a transaction that wrote anything: init-db runs each statement alone.
        slot = psql.Literal(self.config.slot)
        return psql.SQL(
            "SELECT pg_create_logical_replication_slot({}, 'pgoutput')"
            " WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {})"
        ).format(slot, slot)

    def init_sql(self) -> list[psql.Composed]:
        cfg = self.config
        tables = [parse_table_name(table) for table in cfg.tables] if cfg.mode == "table" else []
        # (init-db itself creates the publication only when it does not exist: see init_db.)
        return [*self._table_sql(), create_publication_sql(cfg.publication, tables), self._slot_sql()]

    async def init_db(self, conn: psycopg.AsyncConnection[Any]) -> list[str]:
        """The tables (default mapping), then the publication: created for the tables as the
        server resolves them when it does not exist, else completed with the configured tables
        it lacks; refused when it publishes tables that are not configured. Then the slot."""
        cfg = self.config
        notes: list[str] = []
        for table, statement in zip(cfg.tables, self._table_sql(), strict=False):
            # (An unqualified name that finds a table further along the search_path must not
            # get a second one in its first schema.)
            cur = await conn.execute("SELECT to_regclass(%s)", (parse_table_name(table).regclass_text(),))
            found = await cur.fetchone()
            if found is None or found[0] is None:
                await conn.execute(statement)
        tables = await resolve_tables(conn, cfg.tables) if cfg.mode == "table" else []
        name = parse_identifier(cfg.publication)
        state = await _publication_state(conn, name)
        if state is None:
            resolved = [QualifiedName(schema, table) for schema, table in tables]
            try:
                await conn.execute(create_publication_sql(cfg.publication, resolved))
            except psycopg.errors.DuplicateObject:  # created meanwhile (another init-db)
                state = await _publication_state(conn, name)
        if state is not None and tables:
            problem = _mismatch(state, tables)
            missing = [pair for pair in tables if pair not in state.tables]
            if problem and (state.all_tables or not state.inserts or set(state.tables) - set(tables)):
                raise ConnectorError(problem)
            if missing:
                await conn.execute(
                    psql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                        psql.Identifier(state.name),
                        psql.SQL(", ").join(psql.Identifier(*pair) for pair in missing),
                    )
                )
                notes.append(
                    f"publication {_quoted(state.name)} now also publishes"
                    f" {', '.join(_shown(pair) for pair in missing)} (ALTER PUBLICATION ... ADD TABLE)"
                )
        await conn.execute(self._slot_sql())
        return notes

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._repl is not None and not self._repl.closed:
            self._release_acknowledged()
            self._send_status()
        await self._drop_stream()
        if self._sql is not None:
            await self._sql.close()
            self._sql = None


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


async def _message_charmap(conn: psycopg.AsyncConnection[Any]) -> str | None:
    """How to read WAL messages of this database as UTF-8: None when its encoding is UTF8, else
    a decoding table for `codecs.charmap_decode`.

    pgoutput sends a message's content as the raw bytes of the database's encoding (everything
    else it sends is converted to the client encoding, UTF8). For a single-byte encoding (LATIN1,
    WIN1252, KOI8R, ...) the table is the server's own conversion of each byte, asked once, so
    messages read exactly as a `text` column would; a byte the server cannot convert stays
    undefined (such a message becomes a defect and is dead-lettered, never altered). Multi-byte
    encodings other than UTF8 (EUC_JP, EUC_CN, ...) have no such table: message mode refuses
    them (table mode converts everything on the server and works with any encoding)."""
    encoding = conn.info.parameter_status("server_encoding") or "UTF8"
    if encoding == "UTF8":
        return None
    row = await (
        await conn.execute("SELECT pg_encoding_max_length(pg_char_to_encoding(%s))", (encoding,))
    ).fetchone()
    if not row or row[0] != 1:
        raise Unsupported(
            f"message mode cannot read WAL messages of database {conn.info.dbname}: its encoding"
            f" {encoding} is neither UTF8 nor a single-byte encoding, and PostgreSQL sends messages"
            " unconverted; use mode: table, or a database in UTF8"
        )
    table = [chr(byte) for byte in range(128)] + ["\ufffe"] * 128  # U+FFFE: undefined
    convert = "SELECT convert_from(decode(lpad(to_hex(%s::int), 2, '0'), 'hex'), %s)"
    for byte in range(128, 256):
        try:
            converted = await (await conn.execute(convert, (byte, encoding))).fetchone()
        except psycopg.DataError:  # no equivalent in UTF-8
            continue
        if converted and len(converted[0]) == 1:
            table[byte] = converted[0]
    return "".join(table)


async def resolve_tables(conn: psycopg.AsyncConnection[Any], tables: Sequence[str]) -> list[tuple[str, str]]:
    """Each configured table (as written in the config) as the server's (schema, table): a
    qualified name exactly, an unqualified one through the connection's search_path, as the
    server resolves names in SQL. Raises ConnectorError naming a table that does not exist (with
    the double-quoted spelling of a table whose name differs only in case) or is no table."""
    pairs: list[tuple[str, str]] = []
    for text in tables:
        try:
            name = parse_table_name(text)
        except IdentifierError as exc:
            raise ConnectorError(f"tables: {printable(text)}: {exc}") from None
        table = await resolve_table(conn, name)
        if table.kind not in ("r", "p"):
            raise ConnectorError(f"{table.display()} is not a table: a publication publishes tables only")
        if (table.schema, table.name) not in pairs:
            pairs.append((table.schema, table.name))
    return pairs


@dataclass(frozen=True, slots=True)
class _Publication:
    name: str
    all_tables: bool
    inserts: bool
    tables: list[tuple[str, str]]  # as pgoutput names them (the partition root when published via it)


async def _publication_state(conn: psycopg.AsyncConnection[Any], name: str) -> _Publication | None:
    cur = await conn.execute("SELECT puballtables, pubinsert FROM pg_publication WHERE pubname = %s", (name,))
    row = await cur.fetchone()
    if row is None:
        return None
    cur = await conn.execute(
        "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = %s"
        " ORDER BY 1, 2",
        (name,),
    )
    return _Publication(name, bool(row[0]), bool(row[1]), [(r[0], r[1]) for r in await cur.fetchall()])


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
    state = await _publication_state(conn, name)
    if state is None:
        return f"publication {_quoted(name)} does not exist (run: outbox-relay init-db)"
    return _mismatch(state, tables) if tables else None


def _mismatch(state: _Publication, tables: Sequence[tuple[str, str]]) -> str | None:
    shown = _quoted(state.name)
    problems: list[str] = []
    if not state.inserts:
        problems.append("it does not publish inserts (publish = 'insert' is needed)")
    missing = [pair for pair in tables if pair not in state.tables]
    if missing:
        problems.append(
            f"it does not publish {', '.join(_shown(p) for p in missing)}, so their inserts would"
            " never reach the relay (run: outbox-relay init-db to add them)"
        )
    if state.all_tables:
        problems.append(
            "it publishes all tables (FOR ALL TABLES), so inserts into tables that are not"
            " configured could not be turned into events (create one FOR TABLE the configured tables)"
        )
    else:
        extra = [pair for pair in state.tables if pair not in tables]
        if extra:
            problems.append(
                f"it publishes {', '.join(_shown(p) for p in extra)}, which tables: does not list, so"
                " their inserts could not be turned into events (add them to tables:, or"
                f" ALTER PUBLICATION {shown} DROP TABLE them)"
            )
    if not problems:
        return None
    return f"publication {shown} does not match the configured tables: {'; '.join(problems)}"


def _quoted(name: str) -> str:
    return printable(quote_ident(name))


def _shown(pair: tuple[str, str]) -> str:
    return QualifiedName(*pair).display()


class _ReplicationString(psql.Composable):
    """A string literal of the replication protocol's grammar: in single quotes, '' for a quote
    and nothing else (no backslash escapes, no E'...' form, which `psql.Literal` may write)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)

    def as_bytes(self, context: Any = None) -> bytes:
        return ("'" + str(self._obj).replace("'", "''") + "'").encode()


def start_replication_command(slot: str, start: int, publication: str) -> psql.Composed:
    """START_REPLICATION of the slot from `start` with pgoutput reading the publication (as
    written in the config). `publication_names` is a string literal holding a list of
    identifiers: the name is double-quoted as an identifier, then that made a literal."""
    names = '"' + parse_identifier(publication).replace('"', '""') + '"'
    return psql.SQL(
        "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names {}, messages 'true')"
    ).format(psql.Identifier(slot), psql.SQL(pgoutput.format_lsn(start)), _ReplicationString(names))


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


#: How long a new stream waits for the slot to be let go by a stream that just ended.
_SLOT_RELEASE_S = 2.0


def _explain_start_error(config: PostgresLogicalConfig, message: str) -> str:
    message = scrubber.scrub(message)
    if "does not exist" in message and "slot" in message:
        return f"replication slot {config.slot} does not exist (run: outbox-relay init-db): {message}"
    if "is active for PID" in message:
        return (
            f"replication slot {config.slot} is in use by another process (the previous lease"
            " holder's stream, which this relay's role may not end?): " + message
        )
    if "publication" in message and "does not exist" in message:
        return f"publication {config.publication} does not exist (run: outbox-relay init-db): {message}"
    return f"START_REPLICATION failed: {message}"


plugin = SourcePlugin(type="postgres-logical", config=PostgresLogicalConfig, factory=PostgresLogicalSource)
