"""Keeping a lease: the holder renews its term on a fixed cadence until the term is lost
(the design is told in relay.leadership)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg

from outbox_relay.backoff import Backoff, Retrying
from outbox_relay.leadership.guard import Guard
from outbox_relay.leadership.row import LeaseRow
from outbox_relay.leadership.term import LeaseLost, RivalLease, Term
from outbox_relay.problems import SetupProblems
from outbox_relay.secrets import scrubber

#: Between attempts of one renewal, each on a new connection, until the holder's deadline.
_RENEWAL_RETRY = Backoff(initial=0.2, maximum=0.2)


class Renewals:
    """The renewals of one lease's terms, on its row and guard; `reached` is told whether each
    attempt reached the database."""

    def __init__(
        self,
        row: LeaseRow,
        guard: Guard,
        problems: SetupProblems,
        log: Any,
        reached: Callable[[bool], None],
        margin: float,
    ) -> None:
        self._row, self._guard, self._problems, self._log = row, guard, problems, log
        self._reached = reached
        #: What the holder keeps back from the seconds left as its clock margin.
        self._margin = margin

    async def keep(self, term: Term, check_interval: float) -> None:
        """Renew `term` every `check_interval` until it is lost; then end it and raise LeaseLost
        (never return). Lost: another holder took the lease, or no renewal succeeded before the
        deadline (each failed one is retried soon on a new connection). The deadline is kept by
        a timer of its own: a renewal stuck in a connection attempt cannot delay it."""
        renewals = asyncio.create_task(self._renewals(term, check_interval))
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

    async def _renewals(self, term: Term, check_interval: float) -> None:
        while True:
            # A fixed cadence, not a retry: a renewal that fails is retried by
            # `_renew_until_deadline` under its own backoff.
            await asyncio.sleep(check_interval)
            await self._renew_until_deadline(term)

    async def _renew_until_deadline(self, term: Term) -> None:
        failure = ""
        retrying = Retrying(_RENEWAL_RETRY)
        while time.monotonic() < term.deadline:
            sent = time.monotonic()
            try:
                renewed = await self._row.renew(term.token, term.expiry)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                failure = scrubber.scrub(f"{type(exc).__name__}: {exc}")
                self._reached(False)
                self._log.warning("lease renewal failed, retrying", error=failure)
                delay = retrying.failed(exc)
                await asyncio.sleep(min(delay, max(term.deadline - time.monotonic(), 0)))
                continue
            self._reached(True)
            await self._renewed(term, renewed, sent)
            return
        term.end()
        raise LeaseLost(f"no renewal succeeded before the lease's deadline ({failure or 'no answer'})")

    async def _renewed(self, term: Term, renewed: tuple[datetime, float] | None, sent: float) -> None:
        """After a renewal the server answered (the row's expiry and the seconds left until it,
        None when the row is no longer this holder's): the deadline moved on, or LeaseLost when
        the row no longer names this holder or, on a new session, a rival took the guard."""
        if renewed is None:
            term.end()
            raise LeaseLost("the lease's row no longer names this relay (another took it, or it was edited)")
        if not self._guard.on_this_session:
            # A new session (the last one was lost, with the guard): take the guard again.
            rival = await self._guard.take(self._row.place.table)
            if rival is not None:
                term.end()
                self._problems.report("database", RivalLease(rival))
                raise LeaseLost(rival)
        # The server measured the seconds left after this renewal was sent: counted from `sent`
        # they end no later than the expiry. (An abandoned renewal that committed first left
        # the expiry where it put it: then this one moved nothing, and says so.)
        term.expiry, left = renewed
        term.deadline = max(term.deadline, sent + left - self._margin)
