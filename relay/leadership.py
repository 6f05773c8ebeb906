"""Leadership: one active relay per outbox, however many replicas run, also when the active one
freezes or is cut off.

The lease is a row of a table in the outbox's database: who holds it, a fencing token that
grows with every new holder, and when it expires. An advisory lock alone cannot be that lease:
the server keeps a session's lock for as long as the session lives, and a frozen process (a
SIGSTOP, a paused VM, a hung event loop) or a connection that a proxy holds open without
forwarding keeps its session alive; the lock never moves. A row with an expiry ends by time,
however the holder's connection looks.

- Acquire: a standby sets itself as holder, with the next token and an expiry `time` from now,
  where the row has expired (or is its own): one UPDATE, so two standbys never both win.
- Renew: the holder moves its expiry on every `check_interval`, where the token is still its
  own. A renewal that fails is retried on a new connection until the holder's deadline.
- Deadline: the holder's own clock when it sent its last successful renewal, plus the lease
  time, minus a margin (a tenth of it). The server set the expiry when it ran the renewal, after
  it was sent, so the deadline falls before the expiry by at least the margin.
- Clocks: the expiry is set and compared by the database server's clock alone (clock_timestamp()),
  so the replicas' clocks need not agree with it or with each other. The one assumption: a
  replica's monotonic clock and the server's clock run at the same rate within the margin over
  one lease time (10%: any working clock), and the server's clock is not stepped forward by more
  than the margin while a lease runs.
- The holder checks its deadline right before every publish and every acknowledgement (see
  `Term.valid`, used by the pipeline), and marks nothing past it: the polling source marks rows
  in the same statement that checks the token (see `Fence`). `/readyz` and
  `outbox_relay_leader` say active only while the term is valid.
- One lease per outbox, whatever the config says: the row's key is made of the outbox table as
  the server resolves it (or the slot), an unqualified lease table lives in that table's schema,
  and the holder also takes the outbox's guard, a session-level advisory lock keyed by the
  lease's key alone: a replica configured with another lease table (or finding another one
  through its search_path) takes a row of its own but not the guard, gives the row up and
  reports a setup problem. Any role may take and see an advisory lock, so this holds even when
  it may not read the other table. The guard is no lease (a frozen holder's session keeps it):
  a holder that took over an expired lease goes on while the guard is held by a stale session
  (its own, the previous holder's, or one an earlier holder noted in the row's `stale_guard`,
  as this one does for the holders after it), and takes it once that session is gone. A
  replica that saw the guard held by a live rival stands by for good (a setup problem).
- Fencing the old holder: a new holder ends the sessions of the one before (every session of a
  holder goes by `outbox-relay <holder id>`, relay.pgsession.SESSION_NAME), so a frozen holder
  that wakes finds its connections gone, its replication stream among them (PostgreSQL lets one
  process stream a slot at a time: the new holder could not stream before).
- Bounds: every wait on the network in the lease path is bounded for real (relay.pgsession
  bounded_query severs a connection that does not answer instead of cancelling the query and
  waiting for the cancel); a connection attempt is bounded by its connect timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg
from psycopg import sql
from psycopg.abc import Params

from outbox_relay import metrics
from outbox_relay.backoff import Backoff
from outbox_relay.identifiers import QualifiedName, parse_table_name
from outbox_relay.interfaces import Unsupported
from outbox_relay.logs import get_logger
from outbox_relay.pgsession import bounded_query, close_quietly, fetch_rows, session_conninfo, start_session
from outbox_relay.problems import SetupProblems
from outbox_relay.secrets import scrubber

_RECONNECT = Backoff(initial=0.5, maximum=5.0)

#: What the holder keeps back from the lease time as its clock margin.
MARGIN_FRACTION = 0.1


def lease_key(outbox: str, scope: str = "") -> str:
    """The lease row of an outbox: its name and 64 bits of a hash of the name and what it reads
    (its table, its slot), so that two services that name their outboxes alike in one database
    do not take each other's lease."""
    digest = hashlib.blake2b(f"outbox-relay\0{outbox}\0{scope}".encode(), digest_size=8).hexdigest()
    return f"{outbox}/{digest}"


def guard_key(key: str) -> tuple[int, int]:
    """The advisory lock key of a lease's guard (see `Lease._take_guard`): 64 bits of a hash
    of the lease's key, as the two signed 32-bit halves pg_try_advisory_lock takes."""
    digest = hashlib.blake2b(f"outbox-relay guard\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "big", signed=True), int.from_bytes(digest[4:], "big", signed=True)


#: The sessions that hold a guard (%(k1)s, %(k2)s: its key's halves as unsigned numbers, as
#: pg_locks shows them), by name.
_GUARD_SESSIONS = (
    "SELECT a.application_name AS session FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.classid::int8 = %(k1)s AND l.objid::int8 = %(k2)s"
)


def session_name_of(holder: str) -> str:
    """What every session of `holder` goes by (relay.pgsession.SESSION_NAME)."""
    return "outbox-relay " + holder.rsplit(" ", 1)[-1]


def create_table_sql(table: str) -> sql.Composed:
    """The lease table (`init-db` runs it; the relay too, when the table is missing)."""
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} ("
        " lease text PRIMARY KEY,"
        " outbox text NOT NULL,"
        " holder text,"
        " token bigint NOT NULL DEFAULT 0,"
        " expires_at timestamptz NOT NULL DEFAULT '-infinity',"
        " renewed_at timestamptz,"
        " stale_guard text)"
    ).format(parse_table_name(table).identifier())


def holder_pid(holder: str | None) -> int | None:
    """The process id in a holder's name (`<host> pid <pid> <id>`), for tools such as `drill`."""
    found = re.search(r" pid (\d+) ", holder or "")
    return int(found.group(1)) if found else None


@dataclass(frozen=True)
class LeasePlace:
    """Where an outbox's lease lives: its table (text `parse_table_name` reads back) and row."""

    table: str
    key: str


#: Runs one statement and returns its rows (Lease's bounded queries, or a plain connection's).
Query = Callable[[sql.SQL | sql.Composed, Params], Awaitable[list[tuple[Any, ...]]]]


async def locate_lease(query: Query, outbox: str, table: str, scope: str, resolve: str | None) -> LeasePlace:
    """Where the lease of `outbox` lives, names resolved as the server resolves them, so that
    replicas whose config spells the outbox table differently, or whose search_path differs,
    share one lease: the row's key is made of the table the server finds for `resolve` (the
    polling source's table), and an unqualified lease table lives in that table's schema.
    Without `resolve` (a slot names itself exactly), the key is made of `scope` and an
    unqualified lease table is found through the search_path. Raises UndefinedTable when
    `resolve` names no table."""
    lease_table = parse_table_name(table)
    if resolve is None:
        return LeasePlace(lease_table.regclass_text(), lease_key(outbox, scope))
    rows = await query(
        sql.SQL(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.oid = to_regclass(%s)"
        ),
        (parse_table_name(resolve).regclass_text(),),
    )
    row = rows[0] if rows else None
    if row is None:
        raise psycopg.errors.UndefinedTable(f"table {resolve} does not exist (run outbox-relay init-db)")
    schema, name = str(row[0]), str(row[1])
    if lease_table.schema is None:
        lease_table = QualifiedName(schema, lease_table.name)
    return LeasePlace(lease_table.regclass_text(), lease_key(outbox, f"table {QualifiedName(schema, name)}"))


async def lease_line(dsn: str, outbox: str, table: str, scope: str, resolve: str | None) -> str:
    """What `status` says of a lease: who holds it, with which token, for how much longer."""
    async with await psycopg.AsyncConnection.connect(
        session_conninfo(dsn), autocommit=True, connect_timeout=10
    ) as conn:
        await start_session(conn)
        place = await locate_lease(partial(fetch_rows, conn), outbox, table, scope, resolve)
        found = await fetch_rows(conn, "SELECT to_regclass(%s)", (place.table,))
        if not found or found[0][0] is None:
            return f"lease: table {table} does not exist yet (init-db creates it; so does the relay)"
        cur = await conn.execute(
            sql.SQL(
                "SELECT holder, token, extract(epoch FROM expires_at - clock_timestamp())::float8"
                " FROM {} WHERE lease = %s"
            ).format(parse_table_name(place.table).identifier()),
            (place.key,),
        )
        lease = await cur.fetchone()
    if lease is None or lease[0] is None:
        return "lease: never held"
    holder, token, left = lease
    if left is None or left <= 0:
        return f"lease: free (last held by {holder}, token {token})"
    return f"lease: held by {holder} (token {token}), {left:.1f}s left unless renewed"


@dataclass
class Term:
    """One holder's hold on a lease: its token, and its deadline on this process's monotonic
    clock. `valid()` is what everything that publishes or marks asks, right before it does."""

    table: str
    key: str
    token: int
    deadline: float
    ended: bool = False

    def valid(self) -> bool:
        return not self.ended and time.monotonic() < self.deadline

    def end(self) -> None:
        self.ended = True


class RivalLease(Exception):
    """Another replica holds this outbox's lease in another lease table (a setup problem)."""


class LeaseLost(Exception):
    """The lease's term ended: another replica may be active now."""


class Lease:
    """The lease of one outbox, as one process sees it. `acquire` waits for a term, `keep`
    renews it until it is lost, `release` gives it up."""

    def __init__(
        self,
        dsn: str,
        outbox: str,
        *,
        table: str = "outbox_relay_leases",
        lease_time: float = 5.0,
        check_interval: float = 1.0,
        acquire_interval: float = 1.0,
        scope: str = "",
        resolve: str | None = None,
    ) -> None:
        self._dsn = dsn
        self._outbox = outbox
        self._configured_table = table
        self._scope, self._resolve = scope, resolve
        # (Until the server resolved the names: see `locate_lease`.)
        self._table = parse_table_name(table).regclass_text()
        self._ident = parse_table_name(table).identifier()
        self.key = lease_key(outbox, scope)
        self._guard = guard_key(self.key)
        #: The backend that took the guard; the sessions that may hold it stale (see
        #: `_take_guard`); a replica found holding the
        #: lease through another table (this one stands by for good once it saw one).
        self._guard_pid: int | None = None
        self._stale: set[str] = set()
        self._rival: str | None = None
        self._time = lease_time
        self._margin = lease_time * MARGIN_FRACTION
        self._check_interval = check_interval
        self._acquire_interval = min(acquire_interval, lease_time / 5)
        #: This process's name as holder (the lease row says who holds it).
        self.holder = f"{socket.gethostname()} pid {os.getpid()} {secrets.token_hex(4)}"
        #: What every session of this outbox goes by (relay.pgsession.SESSION_NAME).
        self.session_name = session_name_of(self.holder)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._log = get_logger(outbox=outbox)
        #: A login the database refuses, a database that does not exist: said as such.
        self.problems = SetupProblems(outbox, self._log)
        self.term: Term | None = None
        self._database_ok = False
        self._m_database_up = metrics.UP.labels(outbox, "database")
        self._table_ready = False

    @property
    def held(self) -> bool:
        """Whether this process holds the lease now (its term is valid)."""
        return self.term is not None and self.term.valid()

    @property
    def database_ok(self) -> bool:
        """Whether the last attempt reached the database: a standby that cannot is not ready to
        take over (and `outbox_relay_up{component="database"}` says the same as /readyz)."""
        return self._database_ok

    @database_ok.setter
    def database_ok(self, ok: bool) -> None:
        self._database_ok = ok
        self._m_database_up.set(1 if ok else 0)

    # --- queries, each bounded --------------------------------------------------------------

    def _bound(self) -> float:
        """How long one lease query may take: well within the lease, so a holder whose
        database stopped answering can try again on a new connection before its deadline."""
        return max(self._time / 5, 0.2)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        timeout = max(int(self._time / 2), 1)
        conn = await asyncio.wait_for(
            psycopg.AsyncConnection.connect(
                session_conninfo(self._dsn),
                autocommit=True,
                connect_timeout=timeout,
                application_name=self.session_name,
            ),
            timeout + 1,  # (cancelling a connection attempt sends nothing to the server)
        )
        try:
            await start_session(conn)  # (a database no relay can serve: say so instead of standing by)
        except Unsupported:
            await conn.close()
            raise
        return conn

    async def _query(self, query: sql.SQL | sql.Composed, params: Params) -> list[tuple[Any, ...]]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await self._connect()
        try:
            return await bounded_query(self._conn, query, params, self._bound())
        except BaseException:
            await self._drop()
            raise

    async def _ensure_table(self) -> None:
        """Create the lease table when it is missing (an older `init-db`), as far as this role
        may; then the lease's row."""
        if not self._table_ready:
            place = await locate_lease(
                self._query, self._outbox, self._configured_table, self._scope, self._resolve
            )
            self._table, self.key = place.table, place.key
            self._guard = guard_key(place.key)
            self._ident = parse_table_name(place.table).identifier()
            found = await self._query(sql.SQL("SELECT to_regclass(%s)"), (self._table,))
            if not found or found[0][0] is None:
                try:
                    await self._query(create_table_sql(self._table), ())
                except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
                    pass  # another replica created it at the same moment
                except psycopg.errors.InsufficientPrivilege as exc:
                    raise psycopg.errors.InsufficientPrivilege(
                        f"the lease table {parse_table_name(self._table)} does not exist and this role"
                        f" may not create it (run outbox-relay init-db as a role that may): {exc}"
                    ) from None
            await self._query(
                sql.SQL(
                    "INSERT INTO {} (lease, outbox) VALUES (%s, %s) ON CONFLICT (lease) DO NOTHING"
                ).format(self._ident),
                (self.key, self._outbox),
            )
            self._table_ready = True

    # --- acquire ------------------------------------------------------------------------------

    async def acquire(self, stop: asyncio.Event) -> Term | None:
        """Wait until this process holds the lease (its new term) or `stop` is set (None)."""
        attempt = 0
        waiting_logged = False
        if self._guard_pid is not None:
            # A term that ended: its session lets the guard go with it (a new one takes it).
            self._guard_pid = None
            await self._drop()
        self._stale = {self.session_name}
        while not stop.is_set():
            try:
                term, wait = await self._try_acquire()
                attempt = 0
                self.database_ok = True
                self.problems.clear("database")
                if term is not None:
                    return term
                if not waiting_logged:
                    self._log.info("standby: another relay holds the lease for this outbox")
                    waiting_logged = True
                delay = wait
            except (psycopg.Error, OSError, TimeoutError, RivalLease) as exc:
                attempt += 1
                self.database_ok = not isinstance(exc, psycopg.Error | OSError | TimeoutError)
                self._table_ready = False
                delay = _RECONNECT.delay(attempt)
                if not self.problems.report("database", exc):
                    self._log.warning("lease: database not reachable", error=scrubber.scrub(str(exc)))
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
        return None

    async def _try_acquire(self) -> tuple[Term | None, float]:
        """One attempt: the new term, or None and how long to wait before the next attempt
        (until the current holder's lease would end, at most `acquire_interval`)."""
        await self._ensure_table()
        if self._rival is not None:
            raise RivalLease(self._rival)  # (found once: this replica stands by from then on)
        sent = time.monotonic()
        rows = await self._query(
            sql.SQL(
                "WITH previous AS (SELECT holder, stale_guard FROM {t} WHERE lease = %(key)s FOR UPDATE),"
                " guard AS (" + _GUARD_SESSIONS + ")"
                " UPDATE {t} SET holder = %(me)s, renewed_at = clock_timestamp(),"
                # (Also across a lease table dropped and made again: the clock's milliseconds.)
                " token = greatest({t}.token + 1, (extract(epoch FROM clock_timestamp()) * 1000)::int8),"
                " expires_at = clock_timestamp() + make_interval(secs => %(time)s),"
                # In the same statement: which stale session keeps the guard, if one does (the
                # previous holder's, or one it noted), for this holder and the ones after it,
                # also when this one dies before it could say so.
                " stale_guard = (SELECT session FROM guard WHERE session IN"
                " (%(prefix)s || regexp_replace(previous.holder, '^.* ', ''), previous.stale_guard) LIMIT 1)"
                " FROM previous WHERE {t}.lease = %(key)s"
                " AND ({t}.expires_at <= clock_timestamp() OR {t}.holder = %(me)s)"
                " RETURNING {t}.token, previous.holder, {t}.stale_guard"
            ).format(t=self._ident),
            {
                "key": self.key,
                "me": self.holder,
                "time": self._time,
                "prefix": session_name_of(""),
                "k1": self._guard[0] & 0xFFFFFFFF,
                "k2": self._guard[1] & 0xFFFFFFFF,
            },
        )
        if rows:
            token, previous, stale_guard = int(rows[0][0]), rows[0][1], rows[0][2]
            if previous and previous != self.holder:
                await self._end_sessions_of(previous)
                self._stale.add(session_name_of(previous))
            if stale_guard:
                self._stale.add(str(stale_guard))
            rival = await self._take_guard()
            if rival is not None:
                await self._give_up(token)
                self._rival = self._rival_text(rival)
                raise RivalLease(self._rival)
            term = Term(self._table, self.key, token, sent + self._time - self._margin)
            self.term = term
            return term, 0.0
        rows = await self._query(
            sql.SQL(
                "SELECT extract(epoch FROM expires_at - clock_timestamp())::float8 FROM {} WHERE lease = %s"
            ).format(self._ident),
            (self.key,),
        )
        if not rows:  # (its row was deleted: made again on the next attempt)
            self._table_ready = False
            return None, 0.0
        left = float(rows[0][0]) if rows[0][0] is not None else 0.0
        return None, min(max(left, 0.0) + 0.01, self._acquire_interval)

    async def _take_guard(self) -> str | None:
        """Take the outbox's guard, a session-level advisory lock keyed like the lease's row
        but the same whatever lease table a replica uses: None when this session holds it (or
        a stale session does: this replica's, the holder's it took over from, or one an earlier
        holder of this row noted; such a session is past its lease and publishes nothing),
        else who holds it. Any role may take and see an advisory lock, so a replica whose
        lease.table or search_path differs, and whose lease table this one may not even read,
        is found all the same."""
        rows = await self._query(sql.SQL("SELECT pg_try_advisory_lock(%s, %s)"), self._guard)
        if rows and rows[0][0]:
            assert self._conn is not None  # (the query just ran on it)
            self._guard_pid = self._conn.info.backend_pid
            return None
        rows = await self._query(
            sql.SQL(_GUARD_SESSIONS), {"k1": self._guard[0] & 0xFFFFFFFF, "k2": self._guard[1] & 0xFFFFFFFF}
        )
        holders = {str(row[0]) for row in rows}
        if holders <= self._stale:
            return None  # (taken again at a renewal, once that session is gone)
        return ", ".join(sorted(holders - self._stale)) or "another session"

    async def _give_up(self, token: int) -> None:
        await self._query(
            sql.SQL(
                "UPDATE {} SET expires_at = clock_timestamp()"
                " WHERE lease = %s AND token = %s AND expires_at > clock_timestamp()"
            ).format(self._ident),
            (self.key, token),
        )

    def _rival_text(self, rival: str) -> str:
        return (
            f"{rival} holds this outbox's lease in another table than {parse_table_name(self._table)}:"
            " the replicas disagree on lease.table or on the search_path that finds it"
        )

    async def _end_sessions_of(self, previous: str) -> None:
        """End every session of the holder before: a holder that froze or was cut off may wake
        and must find its connections gone (and the replication slot free). A role that may
        not end them leaves them to the server's timeouts; the fencing token still holds."""
        name = session_name_of(previous)
        try:
            rows = await self._query(
                sql.SQL(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = %s AND pid <> pg_backend_pid()"
                ),
                (name,),
            )
        except psycopg.errors.InsufficientPrivilege as exc:
            self._log.warning(
                "took over the lease, but may not end the previous holder's sessions"
                " (grant pg_signal_backend to this role)",
                previous=previous,
                error=scrubber.scrub(str(exc)),
            )
            return
        ended = int(rows[0][0]) if rows else 0
        self._log.info(
            "took over the lease from a holder that stopped renewing", previous=previous, sessions_ended=ended
        )

    # --- keep ---------------------------------------------------------------------------------

    async def keep(self, term: Term) -> None:
        """Renew `term` every `check_interval` until it is lost; then end it and raise LeaseLost
        (never return). Lost: another holder took the lease, or no renewal succeeded before the
        deadline (each failed one is retried at once on a new connection). The deadline is
        kept by a timer of its own: a renewal stuck in a connection attempt cannot delay it."""
        renewals = asyncio.create_task(self._renewals(term))
        try:
            while True:
                left = term.deadline - time.monotonic()
                if left <= 0 or term.ended:
                    raise LeaseLost("no renewal succeeded before the lease's deadline")
                done, _ = await asyncio.wait({renewals}, timeout=left)
                if done:
                    renewals.result()  # (raises LeaseLost: another holder took it)
        finally:
            term.end()
            renewals.cancel()
            await asyncio.gather(renewals, return_exceptions=True)

    async def _renewals(self, term: Term) -> None:
        while True:
            await asyncio.sleep(self._check_interval)
            await self._renew_until_deadline(term)

    async def _renew_until_deadline(self, term: Term) -> None:
        failure = ""
        while time.monotonic() < term.deadline:
            sent = time.monotonic()
            try:
                rows = await self._query(
                    sql.SQL(
                        "UPDATE {} SET renewed_at = clock_timestamp(),"
                        " expires_at = clock_timestamp() + make_interval(secs => %s)"
                        " WHERE lease = %s AND token = %s AND holder = %s RETURNING token"
                    ).format(self._ident),
                    (self._time, self.key, term.token, self.holder),
                )
            except (psycopg.Error, OSError, TimeoutError) as exc:
                failure = scrubber.scrub(f"{type(exc).__name__}: {exc}")
                self.database_ok = False
                self._log.warning("lease renewal failed, retrying", error=failure)
                await asyncio.sleep(min(0.2, max(term.deadline - time.monotonic(), 0)))
                continue
            self.database_ok = True
            if not rows:
                term.end()
                raise LeaseLost(
                    "the lease's row no longer names this relay (another took it, or it was edited)"
                )
            if self._conn is not None and self._conn.info.backend_pid != self._guard_pid:
                # A new session (the last one was lost, with the guard): take the guard again.
                rival = await self._take_guard()
                if rival is not None:
                    term.end()
                    self._rival = self._rival_text(rival)
                    self.problems.report("database", RivalLease(self._rival))
                    raise LeaseLost(self._rival)
            term.deadline = max(term.deadline, sent + self._time - self._margin)
            return
        term.end()
        raise LeaseLost(f"no renewal succeeded before the lease's deadline ({failure or 'no answer'})")

    # --- release ------------------------------------------------------------------------------

    async def release(self) -> None:
        """Give the lease up (a standby may take it at once); the term ends first, so this
        process says standby before another can say active."""
        term, self.term = self.term, None
        if term is not None:
            term.end()
            # (Also when the term already ended: the token in the statement keeps it from
            # touching a newer holder's lease.)
            try:
                await self._give_up(term.token)
            except (psycopg.Error, OSError, TimeoutError):
                pass  # it expires by itself
        await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        await close_quietly(conn)
