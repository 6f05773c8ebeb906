"""When a replication stream that says nothing is dead, by the rule of PostgreSQL's own logical
replication worker (`wal_receiver_timeout`): at half of the timeout without a frame of any kind
from the server, ask it for a reply (a standby status update with "reply requested" set); past
the whole of it without one, the stream is dead.

A connection held open by a proxy, a NAT or a firewall that stopped forwarding fails nothing: the
relay's status updates are taken and go nowhere, and the server's frames never come. Without
this rule such a stream is waited on for ever (an idle stream looks the same)."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import Any

import psycopg

from outbox_relay.connectors.sources.postgres_logical.config import PostgresLogicalConfig
from outbox_relay.connectors.sources.postgres_logical.database import SqlConnection
from outbox_relay.connectors.sources.postgres_logical.transport import ReplicationStream
from outbox_relay.pgsession import bounded_query
from outbox_relay.secrets import scrubber


class Due(enum.Enum):
    """What the silence so far calls for."""

    NOTHING = "nothing"
    ASK = "ask"
    DEAD = "dead"


class Silence:
    """How long the server has said nothing, on the monotonic clock the caller passes in
    (`now`). With `timeout` 0 nothing is ever due.

    The stream is dead only once a reply was asked for and half the timeout went by after
    asking, as well as the whole timeout after the last frame: a relay whose window was full
    read nothing for a while, and the frames the server sent meanwhile are still in the socket
    (the caller reads them before it asks what is due)."""

    def __init__(self, timeout: float, now: float) -> None:
        self.timeout = timeout
        self._heard = now
        self._asked: float | None = None

    def heard(self, now: float) -> None:
        """A frame came from the server."""
        self._heard = now
        self._asked = None

    def asked(self, now: float) -> None:
        """A reply was asked for."""
        self._asked = now

    def silent_for(self, now: float) -> float:
        return now - self._heard

    def due(self, now: float) -> Due:
        if self.timeout <= 0:
            return Due.NOTHING
        if self._asked is None:
            return Due.ASK if now - self._heard >= self.timeout / 2 else Due.NOTHING
        if now - self._heard >= self.timeout and now - self._asked >= self.timeout / 2:
            return Due.DEAD
        return Due.NOTHING

    def until_due(self, now: float) -> float:
        """Seconds until something may be due (a wait for data must wake up by then)."""
        if self.timeout <= 0:
            return float("inf")
        if self._asked is None:
            at = self._heard + self.timeout / 2
        else:
            at = max(self._heard + self.timeout, self._asked + self.timeout / 2)
        return max(at - now, 0.0)


#: Ends the server process of a stream the relay gave up on, if it still holds the slot.
_END_ABANDONED = (
    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
    " WHERE slot_name = %s AND active_pid = %s"
)


class StreamWatch:
    """The source's side of the rule: what came on each read, the question at half the timeout,
    giving up on a dead stream, and ending its server process before the next stream starts."""

    def __init__(self, config: PostgresLogicalConfig, sql: SqlConnection, log: Any) -> None:
        self._config = config
        self._sql = sql
        self._log = log
        self._silence = Silence(config.receive_timeout, time.monotonic())
        #: The server process of the stream last given up on (see `restart`).
        self._abandoned_pid: int | None = None

    def wait(self, poll_interval: float) -> float:
        """How long a wait for data may last: it must wake in time for what is due next."""
        return min(poll_interval, self._silence.until_due(time.monotonic()))

    def after_read(
        self, heard: bool, stream: ReplicationStream, send_status: Callable[[bool], None]
    ) -> psycopg.OperationalError | None:
        """A read of the stream took a frame (`heard`) or nothing. At half the timeout of silence
        ask the server for a reply (`send_status(True)`); past the whole of it the stream is
        dead: it is severed, a warning logged, and the error to raise returned (as for a stream
        that ended: the pipeline retries, and the next stream starts from the confirmed
        position)."""
        now = time.monotonic()
        if heard:
            self._silence.heard(now)
            return None
        due = self._silence.due(now)
        if due is Due.ASK:
            send_status(True)
            self._silence.asked(now)
        elif due is Due.DEAD:
            message = f"replication stream silent for {self._silence.silent_for(now):.0f}s; reconnecting"
            self._log.warning(message, receive_timeout=self._silence.timeout)
            self._abandoned_pid = stream.backend_pid
            stream.sever()
            return psycopg.OperationalError(message)
        return None

    async def restart(self) -> None:
        """A new stream starts: the silence starts over, and the server process of the stream
        given up on is ended if it still streams the slot (it would keep the slot, refusing
        START_REPLICATION, until the server's wal_sender_timeout). On the ordinary connection,
        bounded: it may be cut off too. A failure only leaves the slot to the server's timeout."""
        self._silence.heard(time.monotonic())
        pid, self._abandoned_pid = self._abandoned_pid, None
        if pid is None:
            return
        try:
            conn = await self._sql.get()
            await bounded_query(conn, _END_ABANDONED, (self._config.slot, pid), self._config.connect_timeout)
        except Exception as exc:
            self._log.warning(
                "could not end the silent stream's server process; the slot waits for the"
                " server's wal_sender_timeout",
                pid=pid,
                error=scrubber.scrub(str(exc)),
            )
