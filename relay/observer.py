"""Metrics and health of one pipeline, as an observer of what happens in it.

The pipeline's parts say what happened (events fetched, taken by the broker, failed, retried,
dead-lettered; the database or the broker up or down); the observer turns that into the
Prometheus metrics (relay.metrics), the state /readyz reads (`db_ok`, `sink_ok`) and the log
lines of a change of state. `watch_backlog` measures what only a query can tell: pending events,
lag, dead letters.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from outbox_relay import metrics
from outbox_relay.deadletters import HELD
from outbox_relay.events import OutboxEvent
from outbox_relay.interfaces import Source
from outbox_relay.secrets import scrubber
from outbox_relay.stalls import CallTracker

if TYPE_CHECKING:  # (relay.parking reports to this module)
    from outbox_relay.parking import DeadLetterParking


def describe_error(exc: BaseException) -> str:
    """One line naming `exc`, secrets masked."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return scrubber.scrub(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


class PipelineObserver:
    """Counts and states of the pipeline of outbox `name` publishing to a sink of `sink_kind`."""

    def __init__(self, name: str, sink_kind: str, log: Any, calls: CallTracker) -> None:
        self._name = name
        self._log = log
        self.db_ok = False
        self.sink_ok = False
        #: Events the broker took (held ones released included).
        self.published = 0
        self._published = metrics.EVENTS_PUBLISHED.labels(name, sink_kind)
        self._failures = metrics.PUBLISH_FAILURES.labels(name, sink_kind)
        self._retries = metrics.RETRIES.labels(name)
        self._e2e = metrics.END_TO_END.labels(name)
        self._stage_seconds = {
            stage: metrics.BATCH_SECONDS.labels(name, stage) for stage in ("fetch", "publish", "ack")
        }
        self._db_up = metrics.UP.labels(name, "database")
        self._sink_up = metrics.UP.labels(name, "sink")
        self._dead_lettered = metrics.DEAD_LETTERED.labels(name)
        self._held_aggregates = metrics.HELD_AGGREGATES.labels(name)
        metrics.STALLED.labels(name).set_function(lambda: _oldest_call_seconds(calls))

    # --- what happened ------------------------------------------------------------------------

    def stage_took(self, stage: str, seconds: float) -> None:
        """A fetch, publish or ack batch took `seconds`."""
        self._stage_seconds[stage].observe(seconds)

    def taken(self, events: Sequence[OutboxEvent], now_wall: float) -> None:
        """The broker acknowledged `events` at `now_wall` (wall clock)."""
        self.published += len(events)
        self._published.inc(len(events))
        for event in events:
            self._e2e.observe(now_wall - event.created_at)

    def failed(self, count: int) -> None:
        """`count` events were not acknowledged by the broker."""
        self._failures.inc(count)

    def retried(self, count: int) -> None:
        self._retries.inc(count)

    def dead_lettered(self, count: int) -> None:
        self._dead_lettered.inc(count)

    def held_aggregates(self, count: int) -> None:
        self._held_aggregates.set(count)

    def connected(self) -> None:
        """The source and the sink started: the database and the broker are up."""
        self.db_ok = self.sink_ok = True
        self._db_up.set(1)
        self._sink_up.set(1)

    def database(self, ok: bool) -> None:
        """The database answered (or did not) on the last attempt."""
        if ok != self.db_ok:
            self.db_ok = ok
            self._db_up.set(1 if ok else 0)
            if ok:
                self._log.info("database reachable again")

    def sink(self, ok: bool) -> None:
        """The broker took or answered about an event (or did not) on the last call."""
        if ok != self.sink_ok:
            self.sink_ok = ok
            self._sink_up.set(1 if ok else 0)
            if ok:
                self._log.info("broker reachable again")

    # --- what only a query tells ---------------------------------------------------------------

    async def watch_backlog(
        self,
        source: Source,
        store: DeadLetterParking,
        in_flight: Callable[[], int],
        blocked: Callable[[], int],
        interval: float,
    ) -> None:
        """Measure, every `interval` seconds until cancelled, what is pending and how old it is,
        events in flight, blocked aggregates and dead letters."""
        while True:
            metrics.IN_FLIGHT.labels(self._name).set(in_flight())
            metrics.BLOCKED_AGGREGATES.labels(self._name).set(blocked())
            await self._measure_backlog(source)
            if store is not None:
                await self._count_dead_letters(store)
            await asyncio.sleep(interval)

    async def _measure_backlog(self, source: Source) -> None:
        try:
            stats = await source.backlog()
        except Exception as exc:
            self.database(False)
            self._log.warning("backlog query failed", error=describe_error(exc))
            return
        metrics.PENDING.labels(self._name).set(stats.pending)
        metrics.LAG.labels(self._name).set(stats.oldest_age_seconds)
        if stats.slot_lag_bytes is not None:
            metrics.SLOT_LAG.labels(self._name).set(stats.slot_lag_bytes)

    async def _count_dead_letters(self, store: DeadLetterParking) -> None:
        # The dead-letter table may live in another database, or not exist yet (init-db not
        # run): that says nothing about the outbox's database.
        try:
            metrics.DEAD_LETTERS.labels(self._name).set(await store.count(self._name))
            metrics.HELD_EVENTS.labels(self._name).set(await store.count(self._name, HELD))
        except Exception as exc:
            self._log.warning("cannot count dead letters", error=describe_error(exc))


def _oldest_call_seconds(calls: CallTracker) -> float:
    oldest = calls.oldest()
    return 0.0 if oldest is None else oldest[1]
