"""The replication connection: the streaming protocol spoken through libpq without blocking the
event loop. IDENTIFY_SYSTEM, START_REPLICATION (waiting, under the relay's one retry policy, for
a stream that just ended to let the slot go), CopyData frames in, standby status updates out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import pq
from psycopg import sql as psql

from outbox_relay.backoff import Backoff, GaveUp, Retrying
from outbox_relay.connectors.sources import pgoutput
from outbox_relay.connectors.sources.postgres_connect import connect
from outbox_relay.connectors.sources.postgres_logical.config import PostgresLogicalConfig
from outbox_relay.connectors.sources.postgres_logical.errors import (
    command_failure,
    explain_start_error,
    slot_in_use,
    stream_ended,
)
from outbox_relay.identifiers import parse_identifier
from outbox_relay.interfaces import ConnectorError
from outbox_relay.pgsession import sever

T = TypeVar("T")

#: How long a new stream waits for the slot to be let go by a stream that just ended.
_SLOT_RELEASE_S = 2.0
#: The waits between START_REPLICATION attempts meanwhile.
_SLOT_RELEASE_BACKOFF = Backoff(initial=0.05, maximum=0.4)
#: The longest wait for a replication command's result before libpq is asked again.
_COMMAND_POLL_S = 10.0


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


async def readable(fd: int, timeout: float) -> None:
    """Return when the socket `fd` has data to read, or after `timeout` seconds."""
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


class ReplicationStream:
    """One `replication=database` connection, before and after START_REPLICATION."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn
        self._pgconn = conn.pgconn

    @classmethod
    async def open(cls, config: PostgresLogicalConfig) -> ReplicationStream:
        """Connect for the streaming protocol (ConnectorError when the database is away)."""
        return cls(await connect(config.dsn, config.connect_timeout, replication=True))

    @property
    def usable(self) -> bool:
        """Whether the connection is neither closed nor broken."""
        return not (self._conn.closed or self._conn.broken)

    @property
    def closed(self) -> bool:
        return self._conn.closed

    @property
    def backend_pid(self) -> int:
        """The server process streaming for this connection (the slot's `active_pid`)."""
        return self._pgconn.backend_pid

    async def close(self) -> None:
        await self._conn.close()

    def sever(self) -> None:
        """Shut the socket down without a word to the server (see `pgsession.sever`): closing
        then waits for nothing on a connection that stopped forwarding."""
        sever(self._conn)

    async def identify_system(self) -> tuple[tuple[str, str], int]:
        """The server's (system identifier, timeline) and the end of its WAL."""
        result = await self._command("IDENTIFY_SYSTEM")
        if result is None or result.status != pq.ExecStatus.TUPLES_OK or result.ntuples != 1:
            raise ConnectorError(f"IDENTIFY_SYSTEM failed: {command_failure(result, self._pgconn)}")
        system, timeline, wal_end = (bytes(result.get_value(0, i) or b"").decode() for i in range(3))
        return (system, timeline), pgoutput.parse_lsn(wal_end)

    async def start(self, config: PostgresLogicalConfig, start: int) -> None:
        """START_REPLICATION of the configured slot and publication from `start`. A stream ended
        a moment ago (the previous lease holder's, which the new holder just ended) may hold the
        slot for a few milliseconds more: a refusal for that is retried for `_SLOT_RELEASE_S`.
        Raises ConnectorError saying why the server refused."""
        command = start_replication_command(config.slot, start, config.publication).as_string(self._conn)
        retrying = Retrying(_SLOT_RELEASE_BACKOFF, give_up_after=_SLOT_RELEASE_S)
        while True:
            result = await self._command(command)
            if result is not None and result.status == pq.ExecStatus.COPY_BOTH:
                return
            message = command_failure(result, self._pgconn)
            if not slot_in_use(message):
                raise ConnectorError(explain_start_error(config, message))
            try:
                delay = retrying.failed(ConnectorError(message))
            except GaveUp:
                raise ConnectorError(explain_start_error(config, message)) from None
            await asyncio.sleep(delay)

    async def _command(self, command: str) -> pq.abc.PGresult | None:
        """Send one replication command and wait, without blocking the loop, for its result.
        Unless the command started streaming, the results after it are read too (libpq takes
        no new command before the last one's results are all read: without this, the attempt
        after a refused START_REPLICATION failed with "sending query failed")."""
        self._pgconn.send_query(command.encode())
        result = await self._next_result()
        if result is not None and result.status != pq.ExecStatus.COPY_BOTH:
            while await self._next_result() is not None:
                pass
        return result

    async def _next_result(self) -> pq.abc.PGresult | None:
        """The next result of the command sent, once it is all received; None after the last."""
        pgconn = self._pgconn
        while True:
            pgconn.consume_input()
            if not pgconn.is_busy():
                return pgconn.get_result()
            await readable(pgconn.socket, _COMMAND_POLL_S)

    # --- streaming -------------------------------------------------------------------------------

    def read_frames(
        self, read: Callable[[bytes, list[T]], bool], into: list[T], limit: int, reply: Callable[[], None]
    ) -> bool:
        """Take in what the socket holds now and hand each CopyData frame buffered to `read`
        (with `into`) until `into` holds `limit` items or no frame is left; `reply` at once when
        a `read` returns True (the server asks for a status update). Whether any frame came (a
        keepalive counts: the server is there). Raises OperationalError when the stream ended.
        (One call per fetch: the frames come from libpq in this loop, not through a call each.)"""
        pgconn = self._pgconn
        pgconn.consume_input()
        get_copy_data = pgconn.get_copy_data
        heard = False
        while len(into) < limit:
            size, frame = get_copy_data(1)
            if size == 0:
                break
            if size < 0:
                raise stream_ended(pgconn)
            heard = True
            if read(bytes(frame), into):
                reply()
        return heard

    def send(self, message: bytes) -> None:
        """Send one CopyData message (a standby status update) and flush it."""
        self._pgconn.put_copy_data(message)
        self._pgconn.flush()

    async def wait_readable(self, timeout: float) -> None:
        """Return when the server sent something, or after `timeout` seconds."""
        await readable(self._pgconn.socket, timeout)
