"""Parking events in the dead-letter store: poison events as `dead`, the events of held
aggregates as `held` (see relay.deadletters for the states, relay.holds for holding).

The pipeline needs only the small protocol `DeadLetterParking` of a store; the PostgreSQL table
(`relay.deadletters.DeadLetterStore`) is one implementation. An event is parked, then
acknowledged to the source, so its aggregate moves on; nothing later of its aggregate overtakes
it before it is safely stored.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Protocol

from outbox_relay.deadletters import DEAD, HELD, DeadLetter
from outbox_relay.events import OutboxEvent
from outbox_relay.fencing import FenceGuard
from outbox_relay.flow import Flow, ParkRequest, batches
from outbox_relay.holds import HeldAggregates
from outbox_relay.lanes import Lanes
from outbox_relay.observer import PipelineObserver
from outbox_relay.retries import UntilDone
from outbox_relay.settlement import SettlementPolicy


class DeadLetterParking(Protocol):
    """What the pipeline asks of a dead-letter store (per outbox, by event id)."""

    async def park(self, outbox: str, events: Sequence[tuple[OutboxEvent, str, bool, str]]) -> None:
        """Store (event, error, permanent, state) rows; idempotent per event (a crash between
        parking and the ack parks it again, not twice); a row already held stays as it is."""

    async def held_aggregates(self, outbox: str) -> list[tuple[str, str | None]]:
        """The aggregates with held events (none while the table does not exist)."""
        ...

    async def first_held(
        self, outbox: str, aggregate: tuple[str, str | None], limit: int = 1
    ) -> list[DeadLetter]:
        """The held events of `aggregate` with the lowest positions, at most `limit`, in order."""
        ...

    async def release(self, outbox: str, event_ids: Sequence[str]) -> None:
        """These held events reached the broker: they are not parked any more."""

    async def note_failure(
        self,
        outbox: str,
        event_id: str,
        error: str,
        attempts: int,
        refusals: int,
        state: str = HELD,
        permanent: bool = False,
    ) -> None:
        """A held event failed again; with `state` dead it is dead-lettered."""

    async def count(self, outbox: str, state: str = DEAD) -> int:
        """Parked events of the outbox in `state` (dead ones: not replayed yet)."""
        ...

    async def close(self) -> None: ...


class Parking:
    """Sends events to the store: whole lanes of aggregates being held (`hold_lane`), new
    events of held aggregates (`divert_held`) and poison events (`park_dead`); `run` stores
    them and queues them for the ack."""

    def __init__(
        self,
        name: str,
        store: DeadLetterParking,
        lanes: Lanes,
        holding: HeldAggregates,
        flow: Flow,
        policy: SettlementPolicy,
        *,
        log: Any,
        observer: PipelineObserver,
        until_done: UntilDone,
        guard: FenceGuard,
    ) -> None:
        self._name = name
        self._store = store
        self._lanes = lanes
        self._holding = holding
        self._flow = flow
        self._policy = policy
        self._log = log
        self._observer = observer
        self._until_done = until_done
        self._guard = guard

    def hold_lane(self, head: OutboxEvent, reason: str, permanent: bool) -> None:
        """Move `head`'s whole lane to the store as held, `head` first; its aggregate is held
        until the store has nothing of it any more (see relay.release)."""
        key = head.lane_key
        evicted = self._lanes.evict(key)
        assert evicted, "a held lane has events"
        assert evicted[0] is head, "a lane is held from its first event"
        self._holding.hold(key, self._policy.hold_first_attempt_at(head.attempts, time.monotonic()))
        for event in evicted:
            self._holding.sent_to_store(key)
            why = reason if event is head else f"held behind event {head.event_id}"
            self._flow.park(ParkRequest(event, why, permanent and event is head, HELD))
        self._observer.held_aggregates(len(self._holding))
        self._flow.release_wake.set()
        self._flow.dispatch_wake.set()

    def divert_held(self, events: list[OutboxEvent]) -> list[OutboxEvent]:
        """Events of held aggregates go to the store behind the held ones; returns the rest."""
        flowing: list[OutboxEvent] = []
        for event in events:
            key = event.lane_key
            if key in self._holding:
                self._holding.sent_to_store(key)
                self._flow.park(
                    ParkRequest(event, "held behind earlier events of its aggregate", False, HELD)
                )
            else:
                flowing.append(event)
        return flowing

    def park_dead(self, event: OutboxEvent, reason: str, permanent: bool) -> None:
        """Dead-letter the first event of its lane. The lane stays out until the event is
        parked: nothing later of its aggregate overtakes it before it is in the store."""
        self._lanes.hold(event)
        self._flow.park(ParkRequest(event, reason, permanent, DEAD))

    async def run(self) -> None:
        """Store what is queued, batch by batch, until publishing is done and the queue is
        empty; then acknowledge it to the source."""
        flow = self._flow
        async for batch in batches(flow.parking, flow.park_wake, flow.dispatch_done):
            await self._until_done(
                self._guard.fenced(partial(self._store.park, self._name, batch)),
                "cannot store dead letters, retrying (does the table exist? run init-db)",
                stage="dead-letter",
                events=len(batch),
            )
            self._observer.dead_lettered(sum(self._stored(request) for request in batch))
            flow.ack([request.event for request in batch])
            flow.dispatch_wake.set()
        flow.park_done.set()
        flow.ack_wake.set()

    def _stored(self, request: ParkRequest) -> bool:
        """Note `request` as stored and log it; whether it was dead-lettered."""
        event = request.event
        if request.state == HELD:
            self._holding.stored(event.lane_key)
            if event.attempts:  # (the first one of its aggregate, not those behind it)
                self._log.warning(
                    "event held in the dead-letter table with the rest of its aggregate",
                    event_id=event.event_id,
                    aggregate_id=event.aggregate_id,
                    position=event.position,
                    reason=request.reason,
                    attempts=event.attempts,
                )
            return False
        self._lanes.succeeded(event)
        self._log.warning(
            "event dead-lettered",
            event_id=event.event_id,
            aggregate_id=event.aggregate_id,
            position=event.position,
            reason=request.reason,
            permanent=request.permanent,
            attempts=event.attempts,
            refusals=event.rejections,
        )
        return True
