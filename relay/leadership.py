"""Leadership: exactly one active relay per outbox, however many replicas run.

The lease is a session-level PostgreSQL advisory lock held on a dedicated connection. Standbys
try to take it every second. The lock is released the moment the holder's session ends: a
SIGKILLed process's socket closes at once, `pg_terminate_backend` ends the session at once, and
a cut network is noticed by the server's TCP keepalives, tightened on this session to a few
seconds. The holder checks its session every `check_interval`; when the check fails it abandons
its work before a standby could have taken over (the standby needs the server to let go first).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import psycopg

from relay import metrics
from relay.backoff import Backoff
from relay.interfaces import Unsupported
from relay.logs import get_logger
from relay.pgsession import session_conninfo, start_session
from relay.problems import SetupProblems
from relay.secrets import scrubber

_RECONNECT = Backoff(initial=0.5, maximum=5.0)


def lock_key(outbox: str, scope: str = "") -> tuple[int, int]:
    """The advisory lock key of an outbox, stable across processes: 64 bits of a hash of the
    outbox's name and what it reads (its table, its slot), so that two services that name their
    outboxes alike in one database do not take each other's lease, and no two names share one
    (a 32-bit checksum of the name alone let both happen)."""
    digest = hashlib.blake2b(f"outbox-relay\0{outbox}\0{scope}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "big", signed=True), int.from_bytes(digest[4:], "big", signed=True)


class LeaseLost(Exception):
    """The lease's session failed: another replica may be active now."""


class Lease:
    def __init__(
        self,
        dsn: str,
        outbox: str,
        check_interval: float = 1.0,
        acquire_interval: float = 1.0,
        scope: str = "",
    ) -> None:
        self._dsn = dsn
        self._key = lock_key(outbox, scope)
        self._check_interval = check_interval
        self._acquire_interval = acquire_interval
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._log = get_logger(outbox=outbox)
        #: A login the database refuses, a database that does not exist: said as such.
        self.problems = SetupProblems(outbox, self._log)
        self.held = False
        self._database_ok = False
        self._m_database_up = metrics.UP.labels(outbox, "database")

    @property
    def database_ok(self) -> bool:
        """Whether the last attempt reached the database: a standby that cannot is not ready to
        take over (and `outbox_relay_up{component="database"}` says the same as /readyz)."""
        return self._database_ok

    @database_ok.setter
    def database_ok(self, ok: bool) -> None:
        self._database_ok = ok
        self._m_database_up.set(1 if ok else 0)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            session_conninfo(self._dsn),
            autocommit=True,
            connect_timeout=5,
            application_name="outbox-relay lease",
            # Client side: notice a dead server within seconds too.
            keepalives=1,
            keepalives_idle=2,
            keepalives_interval=1,
            keepalives_count=3,
        )
        try:
            await start_session(conn)  # (a database no relay can serve: say so instead of standing by)
        except Unsupported:
            await conn.close()
            raise
        # Server side: end this session (and free the lock) soon after the network to us is cut.
        for setting in ("tcp_keepalives_idle = 2", "tcp_keepalives_interval = 1", "tcp_keepalives_count = 2"):
            await conn.execute(f"SET {setting}")
        return conn

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this process holds the lease (True) or `stop` is set (False)."""
        attempt = 0
        waiting_logged = False
        while not stop.is_set():
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = await self._connect()
                cur = await self._conn.execute("SELECT pg_try_advisory_lock(%s, %s)", self._key)
                row = await cur.fetchone()
                attempt = 0
                self.database_ok = True
                self.problems.clear("database")
                if row and row[0]:
                    self.held = True
                    return True
                if not waiting_logged:
                    self._log.info("standby: another relay holds the lease for this outbox")
                    waiting_logged = True
                delay = self._acquire_interval
            except psycopg.Error as exc:
                attempt += 1
                self.database_ok = False
                delay = _RECONNECT.delay(attempt)
                if not self.problems.report("database", exc):
                    self._log.warning("lease: database not reachable", error=scrubber.scrub(str(exc)))
                await self._drop()
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
        return False

    async def watch(self) -> None:
        """Return never while the lease is healthy; raise LeaseLost as soon as it is not."""
        assert self._conn is not None
        while True:
            await asyncio.sleep(self._check_interval)
            try:
                # Bounded: a cut network makes the query hang rather than fail.
                cur = await asyncio.wait_for(
                    self._conn.execute(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                        " AND pid = pg_backend_pid() AND classid::int8 = %s AND objid::int8 = %s",
                        (self._key[0] & 0xFFFFFFFF, self._key[1] & 0xFFFFFFFF),
                    ),
                    timeout=max(self._check_interval * 2, 1.0),
                )
                row = await cur.fetchone()
            except (psycopg.Error, TimeoutError) as exc:
                self.held = False
                self.database_ok = False
                await self._drop()
                raise LeaseLost(scrubber.scrub(f"{type(exc).__name__}: {exc}")) from None
            if not row or not row[0]:
                self.held = False
                raise LeaseLost("the advisory lock is no longer held by this session")

    async def release(self) -> None:
        if self._conn is not None and not self._conn.closed and self.held:
            try:
                await asyncio.wait_for(self._conn.execute("SELECT pg_advisory_unlock(%s, %s)", self._key), 5)
            except (psycopg.Error, TimeoutError):
                pass  # closing the session below releases it anyway
        self.held = False
        await self._drop()

    async def _drop(self) -> None:
        if self._conn is not None:
            try:
                await asyncio.wait_for(self._conn.close(), 5)
            except (psycopg.Error, TimeoutError):
                pass
            self._conn = None
