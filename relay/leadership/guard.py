"""Who is who on the database server: the sessions of a lease holder (each goes by
`outbox-relay <holder id>`, relay.pgsession.SESSION_NAME), ending them when a new holder takes
over, and the outbox's guard (see relay.leadership)."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import psycopg
from psycopg import sql

from outbox_relay.identifiers import parse_table_name
from outbox_relay.pgsession import BoundedSession
from outbox_relay.secrets import scrubber


def session_name_of(holder: str) -> str:
    """What every session of `holder` goes by (relay.pgsession.SESSION_NAME)."""
    return "outbox-relay " + holder.rsplit(" ", 1)[-1]


def holder_pid(holder: str | None) -> int | None:
    """The process id in a holder's name (`<host> pid <pid> <id>`), for tools such as `drill`."""
    found = re.search(r" pid (\d+) ", holder or "")
    return int(found.group(1)) if found else None


def guard_key(key: str) -> tuple[int, int]:
    """The advisory lock key of a lease's guard (see `Guard.take`): 64 bits of a hash of the
    lease's key, as the two signed 32-bit halves pg_try_advisory_lock takes."""
    digest = hashlib.blake2b(f"outbox-relay guard\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "big", signed=True), int.from_bytes(digest[4:], "big", signed=True)


#: The sessions that hold a guard (%(k1)s, %(k2)s: its key's halves as unsigned numbers, as
#: pg_locks shows them), by name.
GUARD_SESSIONS = (
    "SELECT a.application_name AS session FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.classid::int8 = %(k1)s AND l.objid::int8 = %(k2)s"
)


class Guard:
    """An outbox's guard: a session-level advisory lock keyed by the lease's key alone, the same
    whatever lease table a replica uses, taken on the lease's session by its holder.

    `stale` names the sessions that may hold it without being a rival (this replica's own, the
    holder's it took over from, one an earlier holder of the row noted): such a session is past
    its lease and publishes nothing. `rival` says who holds the lease elsewhere once one was
    found (this replica then stands by for good)."""

    def __init__(self, session: BoundedSession, lease_key: str) -> None:
        self._session = session
        self.key = guard_key(lease_key)
        #: The backend that took it (None: not taken on any session of this replica).
        self.pid: int | None = None
        self.stale: set[str] = set()
        self.rival: str | None = None

    def params(self) -> dict[str, Any]:
        """The key's halves as GUARD_SESSIONS takes them (unsigned, as pg_locks shows them)."""
        return {"k1": self.key[0] & 0xFFFFFFFF, "k2": self.key[1] & 0xFFFFFFFF}

    @property
    def on_this_session(self) -> bool:
        """Whether the session open now is the one that took it (a new one must take it again)."""
        return self._session.backend_pid == self.pid

    async def take(self, lease_table: str) -> str | None:
        """Take the guard: None when this session holds it (or a stale session does), else who
        holds it while this replica's lease lives in `lease_table` (a sentence, also kept as
        `rival`). Any role may take and see an advisory lock, so a replica whose lease.table or
        search_path differs, and whose lease table this one may not even read, is found all the
        same."""
        rows = await self._session.query(sql.SQL("SELECT pg_try_advisory_lock(%s, %s)"), self.key)
        if rows and rows[0][0]:
            self.pid = self._session.backend_pid
            return None
        rows = await self._session.query(sql.SQL(GUARD_SESSIONS), self.params())
        holders = {str(row[0]) for row in rows}
        if holders <= self.stale:
            return None  # (taken again at a renewal, once that session is gone)
        rival = ", ".join(sorted(holders - self.stale)) or "another session"
        self.rival = (
            f"{rival} holds this outbox's lease in another table than {parse_table_name(lease_table)}:"
            " the replicas disagree on lease.table or on the search_path that finds it"
        )
        return self.rival


async def end_sessions_of(session: BoundedSession, previous: str, log: Any) -> None:
    """End every session of the holder before: a holder that froze or was cut off may wake and
    must find its connections gone (and the replication slot free). A role that may not end them
    leaves them to the server's timeouts; the fencing token still holds."""
    try:
        rows = await session.query(
            sql.SQL(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = %s AND pid <> pg_backend_pid()"
            ),
            (session_name_of(previous),),
        )
    except psycopg.errors.InsufficientPrivilege as exc:
        log.warning(
            "took over the lease, but may not end the previous holder's sessions"
            " (grant pg_signal_backend to this role)",
            previous=previous,
            error=scrubber.scrub(str(exc)),
        )
        return
    ended = int(rows[0][0]) if rows else 0
    log.info(
        "took over the lease from its previous holder (released, or no longer renewed)",
        previous=previous,
        sessions_ended=ended,
    )
