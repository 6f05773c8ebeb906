"""The lease of one outbox as one process holds it: acquire a term, keep renewing it, give it up
(the design is told in relay.leadership)."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time

import psycopg

from outbox_relay import metrics
from outbox_relay.backoff import Backoff, Retrying
from outbox_relay.leadership.guard import Guard, end_sessions_of, guard_key, session_name_of
from outbox_relay.leadership.renewal import Renewals
from outbox_relay.leadership.row import LeaseRow, Taken
from outbox_relay.leadership.term import MARGIN_FRACTION, RivalLease, Term
from outbox_relay.logs import get_logger
from outbox_relay.problems import SetupProblems
from outbox_relay.secrets import scrubber

#: Between attempts to reach the database while standing by (or acquiring): at most this, and
#: at most half the lease time (see `reconnect_policy`).
_RECONNECT = Backoff(initial=0.5, maximum=5.0)


def reconnect_policy(lease_time: float) -> Backoff:
    """How a standby (or an ended holder) retries the database: the backoff grows, but never
    past half the lease time, so that a standby back from an outage or a cut looks again well
    within the time the holder it must replace has left (a standby that slept 5 s after a
    cut missed a freeze of the holder it should have replaced within 2 s)."""
    return Backoff(
        initial=min(_RECONNECT.initial, lease_time / 10), maximum=min(_RECONNECT.maximum, lease_time / 2)
    )


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
        self._time, self._margin = lease_time, lease_time * MARGIN_FRACTION
        self._check_interval = check_interval
        self._acquire_interval = min(acquire_interval, lease_time / 5)
        self._reconnect = reconnect_policy(lease_time)
        #: This process's name as holder (the lease row says who holds it).
        self.holder = f"{socket.gethostname()} pid {os.getpid()} {secrets.token_hex(4)}"
        #: What every session of this outbox goes by (relay.pgsession.SESSION_NAME).
        self.session_name = session_name_of(self.holder)
        self._row = LeaseRow(dsn, self.holder, lease_time, (outbox, table, scope, resolve))
        self._guard = Guard(self._row.session, self._row.place.key)
        self._log = get_logger(outbox=outbox)
        #: A login the database refuses, a database that does not exist: said as such.
        self.problems = SetupProblems(outbox, self._log)
        self.term: Term | None = None
        self._database_ok = False
        self._m_database_up = metrics.UP.labels(outbox, "database")
        renewing = (self._row, self._guard, self.problems, self._log)
        self._renewals = Renewals(*renewing, self._reached, self._margin)

    @property
    def key(self) -> str:
        return self._row.place.key

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

    def _reached(self, ok: bool) -> None:
        self.database_ok = ok

    # --- acquire ------------------------------------------------------------------------------

    async def acquire(self, stop: asyncio.Event) -> Term | None:
        """Wait until this process holds the lease (its new term) or `stop` is set (None)."""
        retrying = Retrying(self._reconnect)
        waiting_logged = False
        if self._guard.pid is not None:
            # A term that ended: its session lets the guard go with it (a new one takes it).
            self._guard.pid = None
            await self._row.session.close()
        self._guard.stale = {self.session_name}
        while not stop.is_set():
            try:
                term, delay = await self._try_acquire()
                retrying.succeeded()
                self.database_ok = True
                self.problems.clear("database")
                if term is not None:
                    return term
                if not waiting_logged:
                    self._log.info("standby: another relay holds the lease for this outbox")
                    waiting_logged = True
            except (psycopg.Error, OSError, TimeoutError, RivalLease) as exc:
                self.database_ok = not isinstance(exc, psycopg.Error | OSError | TimeoutError)
                self._row.ready = False
                delay = retrying.failed(exc)
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
        await self._row.prepare()
        self._guard.key = guard_key(self.key)
        if self._guard.rival is not None:
            raise RivalLease(self._guard.rival)  # (found once: this replica stands by from then on)
        # A lease statement of this process that went unanswered may still commit: it may hold
        # the row (or have moved its expiry on) without knowing. Taking the lease again sooner
        # than a lease time after, it would race the standbys that do get answers, and could
        # win, unanswered again, each time the row expires, keeping the outbox from all of them.
        holding_off = self._row.unanswered_at + self._time - time.monotonic()
        if holding_off > 0:
            await self._row.seconds_left()  # (answered or not: whether this standby is ready)
            return None, min(holding_off, self._acquire_interval)
        sent = time.monotonic()
        taken = await self._row.take(self._guard.params())
        if taken is not None:
            term = await self._took(taken, sent)
            return term, (0.0 if term is not None else self._time)
        left = await self._row.seconds_left()
        if left is None:  # (its row was deleted: made again on the next attempt)
            self._row.ready = False
            return None, 0.0
        return None, min(left + 0.01, self._acquire_interval)

    async def _took(self, taken: Taken, sent: float) -> Term | None:
        """The term of a lease this holder just took (`taken`: its token, from which holder):
        the previous holder's sessions ended, the guard taken. When a live session of another
        replica holds the guard, the lease is given up, and RivalLease raised; or None, when
        the row named no holder (see below)."""
        token, previous, stale_guard, expiry = taken
        if previous and previous != self.holder:
            await end_sessions_of(self._row.session, previous, self._log)
            self._guard.stale.add(session_name_of(previous))
        if stale_guard:
            self._guard.stale.add(str(stale_guard))
        rival = await self._guard.take(self._row.place.table)
        if rival is not None:
            await self._row.give_up(token)
            if previous is None:
                # The row was just made (for the first time, or again: deleted, its table
                # dropped), so who holds the guard may be the holder whose row went, not yet
                # aware of it (its next renewal finds the row gone). A rival only if it still
                # holds the guard when this replica takes its own row again, a lease time on.
                self._guard.rival = None
                self._log.info("the outbox's guard is held, the lease row was made again: waiting")
                return None
            raise RivalLease(rival)
        self.term = Term(self._row.place.table, self.key, token, sent + self._time - self._margin, expiry)
        return self.term

    # --- keep ---------------------------------------------------------------------------------

    async def keep(self, term: Term) -> None:
        """Renew `term` every `check_interval` until it is lost; then end it and raise
        LeaseLost (see `Renewals.keep`)."""
        await self._renewals.keep(term, self._check_interval)

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
                await self._row.give_up(term.token)
            except (psycopg.Error, OSError, TimeoutError):
                pass  # it expires by itself
        await self._row.session.close()
