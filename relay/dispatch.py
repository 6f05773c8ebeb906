"""Dispatching: the first events of ready lanes go to the sink, up to `publish_concurrency` calls
at once; each call's results are settled as `relay.settlement` decides (acknowledged events go
to the ack, failed ones are retried, parked or held)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from outbox_relay.broker_health import BrokerHealth
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.fencing import FenceGuard
from outbox_relay.flow import Flow, wait_either
from outbox_relay.interfaces import Sink
from outbox_relay.lanes import Lanes
from outbox_relay.observer import PipelineObserver, describe_error
from outbox_relay.parking import Parking
from outbox_relay.settlement import (
    Hold,
    Park,
    SettlementPolicy,
    batch_results,
    note_failure,
    sendable_events,
    split_call,
)
from outbox_relay.stalls import CallTracker


class Dispatcher:
    """Hands batches of `batch_size` events (`depth()` consecutive ones of an aggregate at
    most) to the sink, `concurrency` calls at once, and settles their results."""

    def __init__(
        self,
        sink: Sink,
        lanes: Lanes,
        flow: Flow,
        policy: SettlementPolicy,
        parking: Parking,
        *,
        batch_size: int,
        concurrency: int,
        depth: Callable[[], int],
        log: Any,
        observer: PipelineObserver,
        health: BrokerHealth,
        guard: FenceGuard,
        calls: CallTracker,
    ) -> None:
        self._sink, self._lanes, self._flow, self._policy, self._parking = sink, lanes, flow, policy, parking
        self._batch_size, self._concurrency, self._depth = batch_size, concurrency, depth
        self._log, self._observer, self._health, self._guard, self._calls = (
            log,
            observer,
            health,
            guard,
            calls,
        )
        #: The publish calls out now (cancelled when the run is cut short).
        self.publishing: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Dispatch until the pipeline closes, then wait for the calls out."""
        slots = asyncio.Semaphore(self._concurrency)
        depth = self._depth()
        while True:
            await slots.acquire()
            if self._flow.closing.is_set():
                slots.release()
                break
            paused = self._health.paused()
            batch = [] if paused else self._lanes.take(self._batch_size, time.monotonic(), depth)
            if not batch:
                slots.release()
                await (self._pause() if paused else self._idle())
                continue
            task = asyncio.create_task(self._publish(batch))
            self.publishing.add(task)
            task.add_done_callback(self.publishing.discard)
            task.add_done_callback(lambda _: slots.release())
        if self.publishing:
            await asyncio.gather(*self.publishing, return_exceptions=True)
        self._flow.dispatch_done.set()
        self._flow.park_wake.set()

    async def _pause(self) -> None:
        # The broker did not answer the last call: give it a breather as a whole rather than
        # hammering it (and the log) as each event's own retry comes due.
        await wait_either(self._flow.closing, None, max(self._health.paused_until - time.monotonic(), 0.0))

    async def _idle(self) -> None:
        """Nothing to hand out: wait until something is added or settled, or a retry is due."""
        self._flow.dispatch_wake.clear()
        now = time.monotonic()
        if self._lanes.has_ready(now):
            return
        retry_at = self._lanes.next_retry_at()
        timeout = None if retry_at is None else max(retry_at - now, 0.0)
        await wait_either(self._flow.dispatch_wake, None, timeout)

    async def _publish(self, batch: list[OutboxEvent]) -> None:
        sendable = sendable_events(batch)
        started = time.perf_counter()
        if not self._guard.may_act():
            return  # (its events stay unsettled: this run is over)
        results, raised = await self._call_sink(sendable)
        self._observer.stage_took("publish", time.perf_counter() - started)
        if len(sendable) != len(batch):
            results = batch_results(batch, sendable, results)
        self._settle(batch, results, log_each=not raised)

    async def _call_sink(self, sendable: list[OutboxEvent]) -> tuple[Sequence[PublishResult], bool]:
        """The sink's results for `sendable`, and whether the call raised (then every event
        failed transiently, and the broker's health says so once)."""
        called_at = time.monotonic()
        try:
            with self._calls.call("publish"):
                results = await self._sink.publish(sendable) if sendable else []
            if len(results) != len(sendable):
                raise RuntimeError(f"sink returned {len(results)} results for {len(sendable)} events")
        except Exception as exc:
            reason = describe_error(exc)
            self._health.raised(called_at, exc, reason, len(sendable))
            return [Failure(reason, transient=True)] * len(sendable), True
        if sendable:  # (a call with only defect rows heard nothing from the broker)
            self._health.answered(called_at, sendable, results)
        return results, False

    def _settle(self, batch: list[OutboxEvent], results: Sequence[PublishResult], *, log_each: bool) -> None:
        """Advance acknowledged lanes; act on each failure as the policy decides. `log_each` is
        off when the whole call failed: that was logged once, and a line per event would flood
        the log."""
        outcome = split_call(batch, results)
        now_wall = time.time()
        self._lanes.all_succeeded(outcome.acknowledged)
        retried = 0
        for event, result in outcome.failed:
            note_failure(event, result, now_wall, self._health.last_taken, outcome.any_taken)
            retried += self._act_on_failure(event, result, log_each)
        if outcome.overtaken:
            self._log.warning(
                "events acknowledged after an earlier event of their aggregate failed in the same "
                "call; they will be published again after it",
                events=outcome.overtaken,
            )
        if outcome.acknowledged:
            self._health.took(now_wall)
            self._observer.taken(outcome.acknowledged, now_wall)
            self._flow.ack(outcome.acknowledged)
        if outcome.failed:
            self._observer.failed(len(outcome.failed))
        if retried:
            self._observer.retried(retried)
            # A fetch waiting for room looks again: a lane waiting for a retry may be one to hold.
            self._flow.window.space_freed.set()
        self._flow.dispatch_wake.set()

    def _act_on_failure(self, event: OutboxEvent, result: Failure, log_each: bool) -> bool:
        """Do what the policy decides for failed `event`; whether it is retried."""
        decision = self._policy.decide(event, result, time.monotonic())
        if isinstance(decision, Hold):
            # Block: it and everything after it of its aggregate wait in the store, in order,
            # retried from there; memory and the source's progress stay free.
            self._parking.hold_lane(event, decision.reason, decision.permanent)
            return False
        if isinstance(decision, Park):
            self._parking.park_dead(event, decision.reason, decision.permanent)
            return False
        self._lanes.failed(event, decision.at)
        if not (result.setup or (not log_each and event.defect is None)):
            # (A refusal of the relay itself is said once, as a setup problem.)
            self._log.warning(
                "event not acknowledged, will retry",
                event_id=event.event_id,
                aggregate_id=event.aggregate_id,
                position=event.position,
                reason=result.reason,
                permanent=result.permanent,
                attempt=event.attempts,
                retry_in=round(decision.delay, 3),
            )
        return True
