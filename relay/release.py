"""Releasing held aggregates: the first held event of each is retried from the dead-letter store
when due; once the broker took it, the next held ones go at once; an aggregate is released when
the store has none of it left (see relay.holds for when that answer is trusted)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from outbox_relay.backoff import Retrying
from outbox_relay.broker_health import CONNECT_BACKOFF, BrokerHealth
from outbox_relay.deadletters import DEAD, HELD, DeadLetter
from outbox_relay.deadletters import as_event as held_event
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.fencing import FenceGuard
from outbox_relay.flow import Flow, wait_either
from outbox_relay.holds import HeldAggregates
from outbox_relay.interfaces import Sink
from outbox_relay.observer import PipelineObserver, describe_error
from outbox_relay.parking import DeadLetterParking
from outbox_relay.retries import UntilDone
from outbox_relay.settlement import Park, SettlementPolicy, refusals_after
from outbox_relay.stalls import CallTracker


class Releaser:
    """Publishes the held events of held aggregates, one attempt per aggregate at a time.
    `depth()`: how many consecutive events of one aggregate a sink call may carry."""

    def __init__(
        self,
        name: str,
        store: DeadLetterParking,
        sink: Sink,
        holding: HeldAggregates,
        flow: Flow,
        policy: SettlementPolicy,
        depth: Callable[[], int],
        *,
        log: Any,
        observer: PipelineObserver,
        health: BrokerHealth,
        until_done: UntilDone,
        guard: FenceGuard,
        calls: CallTracker,
    ) -> None:
        self._name, self._store, self._sink = name, store, sink
        self._holding, self._flow, self._policy, self._depth = holding, flow, policy, depth
        self._log, self._observer, self._health = log, observer, health
        self._until_done, self._guard, self._calls = until_done, guard, calls
        #: Reads of the store failing in a row, whatever the aggregate: a store that is away
        #: is retried backing off as a whole, not once per held aggregate at a steady pace.
        self._store_reads = Retrying(CONNECT_BACKOFF)

    async def load(self, stop: asyncio.Event) -> bool:
        """Aggregates held by an earlier run stay held: their new events go behind the held
        ones. False when `stop` was set before the store answered."""
        keys = await self._until_done(
            partial(self._store.held_aggregates, self._name),
            "cannot read held events, retrying",
            stop=stop,
            stage="dead-letter",
        )
        if keys is None:
            return False
        now = time.monotonic()
        for key in keys:
            self._holding.hold(key, now)
        if keys:
            self._log.warning("aggregates held by an earlier run stay held", aggregates=len(keys))
        self._observer.held_aggregates(len(self._holding))
        return True

    async def run(self) -> None:
        """Release attempts as they come due, until the pipeline closes."""
        holding, closing = self._holding, self._flow.closing
        while not closing.is_set():
            for key in holding.due(time.monotonic()):
                if closing.is_set():
                    break
                await self._step(key)
            self._observer.held_aggregates(len(holding))
            self._flow.release_wake.clear()
            next_due = holding.next_due()
            timeout = None if next_due is None else max(next_due - time.monotonic(), 0.0)
            await wait_either(self._flow.release_wake, closing, timeout)

    async def _step(self, key: Any) -> None:
        """One release attempt of held `key`, rescheduling the next one: its first held events
        (as many as a call may carry of one aggregate, the first alone while it is failing) go
        to the sink; those the broker took leave the store."""
        letters = await self._first_held(key)
        if letters is None:
            return
        sendable = list(itertools.takewhile(lambda letter: letter.sendable, letters))
        if not sendable:
            # It can never become a message: it holds its aggregate until an operator purges it
            # (`dlq purge`); look again now and then.
            self._holding.attempt_at(key, time.monotonic() + self._policy.backoff.maximum)
            return
        events = [held_event(letter) for letter in sendable]
        if not self._guard.may_act():
            return
        results = await self._publish(events)
        taken = len(list(itertools.takewhile(lambda result: result is None, results)))
        if taken:
            await self._released(key, sendable[:taken], events[:taken])
        if taken == len(events):
            self._holding.attempt_at(key, time.monotonic())  # the next ones at once
            return
        result = results[taken]
        assert result is not None
        await self._failed(key, sendable[taken], result)

    async def _first_held(self, key: Any) -> list[DeadLetter] | None:
        """The first held events of `key`; None when there are none to publish now (the
        aggregate was released, or the next attempt is rescheduled)."""
        holding, now = self._holding, time.monotonic()
        generation = holding.generation(key)
        depth = 1 if holding.failures[key] else self._depth()
        try:
            with self._calls.call("dead-letter"):
                letters = await self._store.first_held(self._name, key, depth)
        except Exception as exc:
            self._observer.database(False)
            self._log.warning("cannot read held events", error=describe_error(exc))
            holding.attempt_at(key, now + self._store_reads.failed(exc))
            return None
        self._store_reads.succeeded()
        if letters:
            return letters
        if holding.release_if_empty(key, generation):
            self._log.info("held aggregate released: every held event is published", aggregate_id=key[1])
            self._flow.dispatch_wake.set()
        else:  # an event of it is on its way to the store: look again once it is there
            holding.attempt_at(key, now + 0.05)
        return None

    async def _publish(self, events: list[OutboxEvent]) -> list[PublishResult]:
        called_at = time.monotonic()
        try:
            with self._calls.call("release"):
                results = list(await self._sink.publish(events))
            if len(results) != len(events):
                raise RuntimeError(f"sink returned {len(results)} results for {len(events)} events")
        except Exception as exc:
            return [Failure(describe_error(exc), transient=True)] * len(events)
        # Only as evidence the broker is up: a held aggregate fails on its own, so its retries
        # failing say nothing about the broker (dispatched calls tell an outage).
        if any(result is None or not result.transient for result in results):
            self._health.answered(called_at, events, results)
        return results

    async def _released(self, key: Any, letters: list[DeadLetter], events: list[OutboxEvent]) -> None:
        released = [letter.event_id for letter in letters]
        await self._until_done(
            self._guard.fenced(partial(self._store.release, self._name, released)),
            "cannot release held events",
            stage="dead-letter",
        )
        self._holding.failures.pop(key, None)
        self._observer.taken(events, time.time())

    async def _failed(self, key: Any, letter: DeadLetter, result: Failure) -> None:
        """The first held event of `key` was not taken: record it, dead-letter it when it is
        poison outside block mode (its aggregate moves on), else retry it after a backoff."""
        holding = self._holding
        holding.failures[key] += 1
        attempts, refusals = letter.attempts + 1, refusals_after(letter.refusals, result)
        self._observer.failed(1)
        decision = self._policy.decide_held(result, refusals, holding.failures[key], time.monotonic())
        state = DEAD if isinstance(decision, Park) else HELD
        record = partial(
            self._store.note_failure,
            self._name,
            letter.event_id,
            result.reason,
            attempts,
            refusals,
            state,
            result.permanent,
        )
        await self._until_done(
            self._guard.fenced(record), "cannot record a held event's failure", stage="dead-letter"
        )
        fields = {"event_id": letter.event_id, "aggregate_id": letter.aggregate_id, "reason": result.reason}
        if isinstance(decision, Park):
            self._observer.dead_lettered(1)
            self._log.warning(
                "held event dead-lettered; its aggregate moves on",
                **fields,
                attempts=attempts,
                refusals=refusals,
            )
            holding.failures.pop(key, None)
            holding.attempt_at(key, time.monotonic())
            return
        self._log.warning(
            "held event not acknowledged, will retry",
            **fields,
            attempt=attempts,
            retry_in=round(decision.delay, 3),
        )
        holding.attempt_at(key, time.monotonic() + decision.delay)
