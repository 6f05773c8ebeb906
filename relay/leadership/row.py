"""The statements on one outbox's lease row, each bounded, on the holder's own session (every
connection of it goes by the holder's session name, so that a later holder can end them)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from outbox_relay.identifiers import parse_table_name
from outbox_relay.interfaces import Unsupported
from outbox_relay.leadership.guard import GUARD_SESSIONS, session_name_of
from outbox_relay.leadership.place import LeasePlace, lease_key, prepare_lease
from outbox_relay.pgsession import BoundedSession, Unanswered, session_conninfo, start_session

#: Where the row has expired, this holder takes it with the next token, in the same statement
#: noting which stale session keeps the guard, if one does (the previous holder's, or one it
#: noted), for this holder and the ones after it, also when this one dies before it could say so.
#: Only where it has expired, also when the row names this holder: a holder that lost its term
#: does not know what its last statements did (one it gave up waiting for may have committed),
#: and taking its own row back would let statements it never saw answered keep the lease from
#: every standby. ({t}: the lease table.)
_TAKE = (
    "WITH previous AS (SELECT holder, stale_guard FROM {t} WHERE lease = %(key)s FOR UPDATE),"
    " guard AS (" + GUARD_SESSIONS + ")"
    " UPDATE {t} SET holder = %(me)s, renewed_at = clock_timestamp(),"
    # (Also across a lease table dropped and made again: the clock's milliseconds.)
    " token = greatest({t}.token + 1, (extract(epoch FROM clock_timestamp()) * 1000)::int8),"
    " expires_at = clock_timestamp() + make_interval(secs => %(time)s),"
    " stale_guard = (SELECT session FROM guard WHERE session IN"
    " (%(prefix)s || regexp_replace(previous.holder, '^.* ', ''), previous.stale_guard) LIMIT 1)"
    " FROM previous WHERE {t}.lease = %(key)s"
    " AND {t}.expires_at <= clock_timestamp()"
    " RETURNING {t}.token, previous.holder, {t}.stale_guard, {t}.expires_at"
)
_SECONDS_LEFT = "SELECT extract(epoch FROM expires_at - clock_timestamp())::float8 FROM {t} WHERE lease = %s"
#: Moves the expiry on only from the one the holder last saw (`known`): a renewal the holder
#: gave up waiting for may still commit, and its retries must not each move the expiry on again
#: (every one of them would, unanswered, keep the lease from the standbys). Either way it
#: returns the row's expiry and the seconds left until it, from which the holder's deadline
#: follows.
_RENEW = (
    "UPDATE {t} SET"
    " renewed_at = CASE WHEN expires_at = %(known)s THEN clock_timestamp() ELSE renewed_at END,"
    " expires_at = CASE WHEN expires_at = %(known)s"
    " THEN clock_timestamp() + make_interval(secs => %(time)s) ELSE expires_at END"
    " WHERE lease = %(key)s AND token = %(token)s AND holder = %(me)s"
    " RETURNING expires_at, extract(epoch FROM expires_at - clock_timestamp())::float8"
)
_GIVE_UP = (
    "UPDATE {t} SET expires_at = clock_timestamp()"
    " WHERE lease = %s AND token = %s AND expires_at > clock_timestamp()"
)


class Taken(NamedTuple):
    """A lease just taken: its token, the holder before, the stale session that keeps the
    guard (if one does) and the row's expiry."""

    token: int
    previous: str | None
    stale_guard: str | None
    expiry: datetime


class LeaseRow:
    """One outbox's lease row as `holder` reads and writes it. Each statement is bounded well
    within the lease time, so that a holder whose database stopped answering can try again on
    a new connection before its deadline; a failed one drops the connection."""

    def __init__(
        self, dsn: str, holder: str, lease_time: float, where: tuple[str, str, str, str | None]
    ) -> None:
        self._dsn, self._holder, self._time = dsn, holder, lease_time
        #: (outbox, lease.table, scope, resolve): see `locate_lease`.
        self._where = where
        outbox, table, scope, _ = where
        #: Where the lease lives (until `prepare` had the server resolve the names).
        self.place = LeasePlace(parse_table_name(table).regclass_text(), lease_key(outbox, scope))
        self.session = BoundedSession(self._connect, max(lease_time / 5, 0.2))
        #: Whether `prepare` found the place and the row since the last failure.
        self.ready = False
        #: When a take or a renewal last went unanswered (the monotonic clock): it may still have
        #: run on the server, and moved the expiry on.
        self.unanswered_at = -float("inf")

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        timeout = max(int(self._time / 2), 1)
        conn = await asyncio.wait_for(
            psycopg.AsyncConnection.connect(
                session_conninfo(self._dsn),
                autocommit=True,
                connect_timeout=timeout,
                application_name=session_name_of(self._holder),
            ),
            timeout + 1,  # (cancelling a connection attempt sends nothing to the server)
        )
        try:
            await start_session(conn)  # (a database no relay can serve: say so instead of standing by)
        except Unsupported:
            await conn.close()
            raise
        return conn

    async def _run(self, statement: str, params: Any, *, moves_expiry: bool = False) -> list[tuple[Any, ...]]:
        table = parse_table_name(self.place.table).identifier()
        try:
            return await self.session.query(sql.SQL(statement).format(t=table), params)
        except Unanswered:
            if moves_expiry:
                self.unanswered_at = time.monotonic()
            raise

    async def prepare(self) -> None:
        """Unless ready: where the lease lives, its table created when missing and its row
        inserted (see `prepare_lease`)."""
        if not self.ready:
            self.place = await prepare_lease(self.session.query, *self._where)
            self.ready = True

    async def take(self, guard: dict[str, Any]) -> Taken | None:
        """Take the row where it has expired: the new token, the previous holder, the stale
        session that keeps the guard (`guard`: its key's parameters) and the new expiry."""
        params = {
            "key": self.place.key,
            "me": self._holder,
            "time": self._time,
            "prefix": session_name_of(""),
        }
        rows = await self._run(_TAKE, params | guard, moves_expiry=True)
        return Taken(int(rows[0][0]), rows[0][1], rows[0][2], rows[0][3]) if rows else None

    async def seconds_left(self) -> float | None:
        """How long until the row expires (0 when it has), None when the row is gone."""
        rows = await self._run(_SECONDS_LEFT, (self.place.key,))
        if not rows:
            return None
        return max(float(rows[0][0]), 0.0) if rows[0][0] is not None else 0.0

    async def renew(self, token: int, known: datetime) -> tuple[datetime, float] | None:
        """Move the expiry on from `known` (the one this holder last saw), where the token is
        still this holder's: the row's expiry now and the seconds left until it; None when the
        token is no longer this holder's."""
        params = {"known": known, "time": self._time, "token": token, "me": self._holder}
        rows = await self._run(_RENEW, params | {"key": self.place.key}, moves_expiry=True)
        return (rows[0][0], float(rows[0][1])) if rows else None

    async def give_up(self, token: int) -> None:
        """Let the row expire now, if `token` still holds it."""
        await self._run(_GIVE_UP, (self.place.key, token))
