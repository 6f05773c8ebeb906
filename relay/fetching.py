"""Fetching: events are pulled from the source while the in-flight window has room, so the next
fetch overlaps the current publish; events of held aggregates go straight to the store."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

from outbox_relay.broker_health import BrokerHealth
from outbox_relay.events import OutboxEvent
from outbox_relay.flow import Flow, first_of, wait_either
from outbox_relay.holds import HeldAggregates
from outbox_relay.interfaces import Source
from outbox_relay.lanes import Lanes
from outbox_relay.observer import PipelineObserver
from outbox_relay.parking import Parking
from outbox_relay.retries import UntilDone
from outbox_relay.stalls import CallTracker


class Fetcher:
    """Fills the lanes from `source`, up to the in-flight window."""

    def __init__(
        self,
        source: Source,
        lanes: Lanes,
        holding: HeldAggregates,
        flow: Flow,
        parking: Parking,
        *,
        log: Any,
        observer: PipelineObserver,
        health: BrokerHealth,
        until_done: UntilDone,
        calls: CallTracker,
    ) -> None:
        self._source, self._lanes, self._holding, self._flow, self._parking = (
            source,
            lanes,
            holding,
            flow,
            parking,
        )
        self._log, self._observer, self._health, self._until_done, self._calls = (
            log,
            observer,
            health,
            until_done,
            calls,
        )

    async def run(self, stop: asyncio.Event, drain: bool) -> None:
        """Fetch until `stop` is set (with `drain`: until the source is caught up, empty, and
        everything fetched is acknowledged)."""
        window, source = self._flow.window, self._source
        while not stop.is_set():
            room = window.room(source.unconfirmed)
            if room <= 0:
                await self._wait_for_room(stop)
                continue
            events = await self._until_done(partial(self._fetch, room), "fetch failed, retrying", stop=stop)
            if events is None:  # stopped while the database was away
                break
            if events:
                self._take_in(events)
                if not source.caught_up:
                    continue
            if drain and source.caught_up and not events:
                if window.count == 0 and self._holding.settled(time.monotonic()):
                    self._log.info("drained: the outbox is empty", published=self._observer.published)
                    break
                window.space_freed.clear()
                await wait_either(window.space_freed, stop, 0.1)
                continue
            await first_of(source.wait_for_events(), stop)

    async def _wait_for_room(self, stop: asyncio.Event) -> None:
        window = self._flow.window
        window.space_freed.clear()
        self._hold_failing_lanes()
        if window.room(self._source.unconfirmed) <= 0:
            await wait_either(window.space_freed, stop)

    async def _fetch(self, room: int) -> list[OutboxEvent]:
        started = time.perf_counter()
        with self._calls.call("fetch"):
            events = await self._source.fetch(room)
        self._observer.stage_took("fetch", time.perf_counter() - started)
        return events

    def _take_in(self, events: list[OutboxEvent]) -> None:
        self._flow.window.fetched(len(events))
        if self._holding:
            events = self._parking.divert_held(events)
        self._lanes.add(events)
        self._flow.dispatch_wake.set()

    def _hold_failing_lanes(self) -> None:
        """The in-flight window is full and nothing more can be fetched: either a failing
        aggregate's events fill it (its lane grows while its first event is retried), or, in
        logical replication, events acknowledged behind it cannot be confirmed (confirmation is
        in commit order). Either way every other aggregate waits for it. Hold the lanes whose
        first event fails on its own (the broker took other events meanwhile; not in an outage,
        when nothing goes through and everything waits anyway) in the store, in order: the
        window frees and the others flow; the held ones are retried from there."""
        if self._health.paused():
            return
        for key in self._lanes.waiting_keys():
            head = self._lanes.head(key)
            if head is None or not head.failed_amid_successes:
                continue
            self._log.warning(
                "holding an aggregate whose first event keeps failing while it fills the in-flight window",
                aggregate_id=head.aggregate_id,
                event_id=head.event_id,
                attempts=head.attempts,
            )
            self._parking.hold_lane(head, "held while it kept failing and filled the in-flight window", False)
