"""The `postgres-logical` source itself: it streams the slot, hands out the events of the
changes it reads (see `decoding`), confirms what the broker acknowledged (see `ledger`) and
delegates checking and creating what it needs in the database to `setup`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql as psql

from outbox_relay.connectors.sources import pgoutput
from outbox_relay.connectors.sources.outbox_table import domain_bases
from outbox_relay.connectors.sources.postgres_logical import setup
from outbox_relay.connectors.sources.postgres_logical.config import PostgresLogicalConfig
from outbox_relay.connectors.sources.postgres_logical.database import SqlConnection
from outbox_relay.connectors.sources.postgres_logical.decoding import ChangeDecoder, message_charmap
from outbox_relay.connectors.sources.postgres_logical.errors import connection_lost
from outbox_relay.connectors.sources.postgres_logical.ledger import Ledger
from outbox_relay.connectors.sources.postgres_logical.reading import ChangeReader
from outbox_relay.connectors.sources.postgres_logical.silence import StreamWatch
from outbox_relay.connectors.sources.postgres_logical.transport import ReplicationStream
from outbox_relay.connectors.sources.postgres_logical.upkeep import PublicationWatch, heartbeats
from outbox_relay.events import OutboxEvent
from outbox_relay.interfaces import BacklogStats, DatabaseSource, Fence, Fenced, Source
from outbox_relay.logs import get_logger


class PostgresLogicalSource(Source, DatabaseSource):
    kind = "postgres-logical"

    def __init__(self, config: PostgresLogicalConfig) -> None:
        self.config = config
        self._log = get_logger(source=self.kind, slot=config.slot)
        self._repl: ReplicationStream | None = None
        self._sql = SqlConnection(config)
        self._fence: Fence | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: The configured tables, as written in the config (`resolve_tables` finds them).
        self.table_names = tuple(config.tables)
        self._decoder = ChangeDecoder(config)
        self._ledger = Ledger((config.dsn, config.slot), self._log)
        self._watch = PublicationWatch(self._sql, config.publication, lambda: self._decoder.tables, self._log)
        self._caught_up = False
        #: The WAL position the relay must reach for `--drain`: a heartbeat written on start.
        self._drain_target = 0
        self._held = 0
        self._reader = ChangeReader(self._decoder, self._ledger)
        self._silent = StreamWatch(config, self._sql, self._log)

    # --- connections --------------------------------------------------------------------------

    async def start(self) -> None:
        sql = await self._sql.get()
        self._decoder.tables = set(await setup.published_tables(sql, self.config))
        self._decoder.domain_bases = await domain_bases(sql)
        if self.config.mode == "message":
            self._decoder.charmap = await message_charmap(sql)
        self._drain_target = await self._sql.heartbeat()
        await self._start_stream()
        if not self._tasks:
            self._start_task(self._status_loop(), "standby-status")
            self._start_task(self._watch.run(), "publication")
            if self.config.heartbeat_interval > 0:
                beating = heartbeats(self._sql, self.config.heartbeat_interval, self._log)
                self._start_task(beating, "heartbeat")

    def _start_task(self, work: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(work, name=f"outbox-relay:{name}"))

    async def _start_stream(self) -> None:
        """Open the replication connection and START_REPLICATION where this relay confirmed up
        to, else (first start, another server) from the slot's confirmed position."""
        stream = await ReplicationStream.open(self.config)
        try:
            await self._silent.restart()
            history, wal_end = await stream.identify_system()
            await stream.start(self.config, self._ledger.resume_position(history, wal_end))
        except Exception:
            await stream.close()
            raise
        self._repl = stream
        self._ledger.restarted()
        self._decoder.reset()
        cfg = self.config
        self._log.info("streaming from replication slot", publication=cfg.publication, mode=cfg.mode)

    async def _stream(self) -> ReplicationStream:
        if self._repl is None or not self._repl.usable:
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
        if self._watch.mismatch is not None:
            raise self._watch.mismatch
        stream = await self._stream()
        limit = min(limit, self.config.batch_size)
        events: list[OutboxEvent] = []
        mark = self._ledger.mark()
        try:
            heard = stream.read_frames(self._reader.read, events, limit, self._send_status)
        except psycopg.Error as exc:
            await self._drop_stream()
            raise connection_lost(exc) from None
        except Exception as exc:
            error = self._reader.failed(exc, events, mark)
            await self._drop_stream()
            raise error from None
        if (silent := self._silent.after_read(heard, stream, self._send_status)) is not None:
            await self._drop_stream()  # (a connection that forwards nothing: see `silence`)
            raise silent
        if self._reader.stuck is not None and not events:
            raise self._reader.stuck
        self._held += len(events)
        ledger = self._ledger
        self._caught_up = (
            len(events) < limit and ledger.current is None and ledger.received >= self._drain_target
        )
        if self._ledger.status_due:
            self._send_status()
        return events

    # --- ack ----------------------------------------------------------------------------------

    def fence_with(self, fence: Fence) -> None:
        self._fence = fence

    async def ack(self, events: Sequence[OutboxEvent]) -> None:
        # (The slot itself fences too: one process streams it at a time, and a new holder ends
        # the stream of the one before; see relay.leadership.)
        if self._fence is not None and not self._fence.valid():
            raise Fenced("the lease ended before these events were confirmed")
        self._ledger.acknowledged(events)
        self._held -= len(events)
        if self._ledger.status_due:
            self._send_status()

    @property
    def unconfirmed(self) -> int:
        return self._ledger.unconfirmed

    @property
    def _confirmed(self) -> int:
        """The flush position that may be confirmed (tests move it to simulate lost WAL)."""
        return self._ledger.confirmed

    @_confirmed.setter
    def _confirmed(self, position: int) -> None:
        self._ledger.confirmed = position

    def _send_status(self, reply: bool = False) -> None:
        stream = self._repl
        if stream is None or stream.closed or (self._fence is not None and not self._fence.valid()):
            return
        ledger = self._ledger
        flushed = ledger.confirmed
        try:
            stream.send(pgoutput.standby_status(ledger.received, flushed, int(time.time() * 1e6), reply))
        except Exception as exc:  # the next fetch notices the broken connection and reconnects
            self._log.debug("standby status not sent", error=str(exc))
            return
        ledger.sent(flushed)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval)
            self._send_status()

    async def replay(self, event: OutboxEvent) -> str:
        return await self._sql.replay(event)

    async def write(self, events: Sequence[OutboxEvent]) -> None:
        await self._sql.write(events)

    # --- waiting ------------------------------------------------------------------------------

    async def wait_for_events(self) -> None:
        stream = self._repl
        if stream is None or stream.closed:
            await asyncio.sleep(self.config.poll_interval)
            return
        await stream.wait_readable(self._silent.wait(self.config.poll_interval))

    # --- backlog, status, checks, DDL ---------------------------------------------------------

    async def backlog(self) -> BacklogStats:
        row = await self._sql.slot_row()
        lag = int(row[0] or 0) if row else 0
        oldest = self._ledger.oldest_outstanding()
        age = max(0.0, time.time() - oldest) if oldest is not None else 0.0
        return BacklogStats(pending=max(self._held, 0), oldest_age_seconds=age, slot_lag_bytes=lag)

    async def status_lines(self) -> list[str]:
        return [await self._sql.slot_status()]

    async def check(self) -> list[str]:
        return await setup.check(self.config)

    def init_sql(self) -> list[psql.Composed]:
        return setup.init_sql(self.config)

    async def init_db(self, conn: psycopg.AsyncConnection[Any]) -> list[str]:
        return await setup.init_db(conn, self.config)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._repl is not None and not self._repl.closed:
            self._ledger.release_acknowledged()
            self._send_status()
        await self._drop_stream()
        await self._sql.close()
