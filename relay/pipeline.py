"""The pipeline of one outbox: source -> lanes -> sink -> ack back to the source.

Six tasks share one event loop:
- fetch:    pulls events while the in-flight window has room (memory and the events a crash
            would send again stay bounded by `max_in_flight`, whatever the backlog), so the next
            fetch overlaps the current publish;
- dispatch: hands the first events of ready lanes to the sink, up to `publish_concurrency` calls at once;
- park:     writes poison events (dead) and events of held aggregates (held) to the dead-letter store;
- release:  retries the first held event of each held aggregate, then publishes the ones behind it;
- ack:      records broker-acknowledged (or parked) events in the source, coalescing what piled up;
- stats:    measures pending events and lag for the metrics.
Nothing is acknowledged to the source unless the sink reported it acknowledged by the broker, or
it is stored in the dead-letter table.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

from outbox_relay import metrics
from outbox_relay.backoff import Backoff
from outbox_relay.config import DeadLetterConfig, PipelineConfig, RetryConfig
from outbox_relay.deadletters import DEAD, HELD, DeadLetter, DeadLetterStore
from outbox_relay.deadletters import as_event as held_event
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.holds import HeldAggregates
from outbox_relay.interfaces import Fence, Fenced, Sink, Source, Unsupported
from outbox_relay.lanes import Lanes
from outbox_relay.logs import get_logger
from outbox_relay.problems import SetupProblems
from outbox_relay.secrets import scrubber
from outbox_relay.stalls import CallTracker

T = TypeVar("T")

# Reconnect pacing for the database and the broker as a whole (per-event retries use `retry:`).
_CONNECT_BACKOFF = Backoff(initial=0.2, maximum=10.0)


#: The result of an event held back in a call behind an earlier one of its aggregate.
_NOT_SENT = Failure("not sent: an earlier event of its aggregate cannot be published", transient=True)


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return scrubber.scrub(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


class Pipeline:
    def __init__(
        self,
        name: str,
        source: Source,
        sink: Sink,
        *,
        retry: RetryConfig,
        tuning: PipelineConfig,
        dead_letter: DeadLetterConfig | None = None,
        dead_letters: DeadLetterStore | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.sink = sink
        self._tuning = tuning
        self._dead_letter = dead_letter or DeadLetterConfig()
        # Without a store, poison events are retried in memory, blocking their aggregate.
        self._dead_letters = dead_letters
        self._block = self._dead_letter.on_poison == "block"
        self._holding = HeldAggregates()
        self._release_wake = asyncio.Event()
        #: (event, error, permanent, state) on their way to the dead-letter store.
        self._park_queue: list[tuple[OutboxEvent, str, bool, str]] = []
        self._park_wake = asyncio.Event()
        self._park_done = asyncio.Event()
        self._backoff = Backoff(retry.initial, retry.max, retry.multiplier)
        self._log = get_logger(outbox=name)
        #: Setup mistakes that stop this outbox until fixed (relay.problems).
        self.problems = SetupProblems(name, self._log)
        self._lanes = Lanes()
        self._held = 0  # fetched and not yet acknowledged to the source
        self._ack_queue: list[OutboxEvent] = []
        self._publishing: set[asyncio.Task[None]] = set()
        self._dispatch_wake = asyncio.Event()
        self._ack_wake = asyncio.Event()
        self._space_freed = asyncio.Event()
        self._dispatch_done = asyncio.Event()
        self._closing_event = asyncio.Event()
        self._sink_failures = 0  # consecutive publish calls the broker did not answer
        #: When a publish call last heard from the broker (monotonic).
        self._last_heard = 0.0
        #: When the broker last took an event (wall clock, as `first_failed_at`).
        self._last_taken = 0.0
        self._sink_paused_until = 0.0
        #: The lease term this pipeline acts under (None: no lease), and whether it ended.
        self._fence: Fence | None = None
        self._fence_lost = asyncio.Event()
        self.started = False
        self.db_ok = False
        self.sink_ok = False
        self.published = 0
        self._m_published = metrics.EVENTS_PUBLISHED.labels(name, sink.kind)
        self._m_failures = metrics.PUBLISH_FAILURES.labels(name, sink.kind)
        self._m_retries = metrics.RETRIES.labels(name)
        self._m_e2e = metrics.END_TO_END.labels(name)
        self._m_fetch = metrics.BATCH_SECONDS.labels(name, "fetch")
        self._m_publish = metrics.BATCH_SECONDS.labels(name, "publish")
        self._m_ack = metrics.BATCH_SECONDS.labels(name, "ack")
        self._m_db_up = metrics.UP.labels(name, "database")
        self._m_sink_up = metrics.UP.labels(name, "sink")
        self._m_dead_lettered = metrics.DEAD_LETTERED.labels(name)
        self._m_held_aggregates = metrics.HELD_AGGREGATES.labels(name)
        #: Calls out to the source, sink and dead-letter store now (for liveness, relay.stalls).
        self.calls = CallTracker()
        metrics.STALLED.labels(name).set_function(self._oldest_call_seconds)

    # --- public -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.started and self.db_ok and self.sink_ok

    @property
    def held(self) -> int:
        return self._held

    @property
    def per_aggregate_depth(self) -> int:
        """How many consecutive events of one aggregate may go out in one sink call.

        More than one only when the sink keeps the order of a call's events and a poison event
        is dead-lettered: with `on_poison: block` an event refused by the broker must hold back
        every later event of its aggregate, and a later one sent in the same call might already
        have been accepted."""
        if self.sink.keeps_order and self._dead_letters is not None and not self._block:
            return self._tuning.per_aggregate_in_flight
        return 1

    async def run(
        self,
        stop: asyncio.Event,
        *,
        drain: bool = False,
        abandon: asyncio.Event | None = None,
        fence: Fence | None = None,
    ) -> bool:
        """Relay until `stop` is set (or, with `drain`, until the source is caught up and empty).
        Returns True when it finished that way, False when `abandon` or the end of `fence` cut
        it short.

        On stop: fetch no more, let publishes already handed to the sink finish, acknowledge what
        the broker acknowledged, close the sink (flush). Events fetched but not yet published are
        simply left in the outbox for the next run. With a `fence` (the lease term), nothing is
        handed to the sink and nothing is marked unless the fence is valid right before; once it
        is not, or on `abandon` (leadership lost): stop at once, cancelling publishes in flight
        and discarding what the sink did not send; another relay is taking over and re-sends
        what this one did not acknowledge.
        """
        if fence is not None:
            self._fence = fence
            self.source.fence_with(fence)
            self.sink.fence = fence
        if abandon is None and fence is None:
            await self._run(stop, drain)
            return True
        work = asyncio.create_task(self._run(stop, drain))
        lost = [asyncio.create_task(self._fence_lost.wait())]
        if abandon is not None:
            lost.append(asyncio.create_task(abandon.wait()))
        await asyncio.wait((work, *lost), return_when=asyncio.FIRST_COMPLETED)
        for waiter in lost:
            waiter.cancel()
        if work.done() and not self._fence_lost.is_set():
            work.result()
            return True
        self._fence_lost.set()  # (the sink discards instead of flushing)
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return False

    def _may_act(self) -> bool:
        """Whether this pipeline may hand events to the sink or record anything now: asked right
        before it does, with nothing awaited in between. Once the lease term is over, never
        again: the run winds down without publishing."""
        if self._fence is None or self._fence.valid():
            return True
        if not self._fence_lost.is_set():
            self._log.error("the lease ended: publishing and marking nothing more")
            self._fence_lost.set()
        return False

    def _fenced(self, action: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
        """`action` (a write that records something), refused with Fenced once the term is over."""

        async def guarded() -> T:
            if not self._may_act():
                raise Fenced("the lease ended: nothing recorded")
            return await action()

        return guarded

    async def _run(self, stop: asyncio.Event, drain: bool) -> None:
        if not await self._start_connectors(stop):
            return
        if self._dead_letters is not None and not await self._load_held(stop):
            await self._close_connectors()
            return
        fetch = asyncio.create_task(self._fetch_loop(stop, drain), name=f"{self.name}:fetch")
        dispatch = asyncio.create_task(self._dispatch_loop(), name=f"{self.name}:dispatch")
        park = asyncio.create_task(self._park_loop(), name=f"{self.name}:dead-letter")
        release = asyncio.create_task(self._release_loop(), name=f"{self.name}:release")
        ack = asyncio.create_task(self._ack_loop(), name=f"{self.name}:ack")
        stats = asyncio.create_task(self._stats_loop(), name=f"{self.name}:stats")
        loops = (fetch, dispatch, park, release, ack)
        try:
            await fetch
            self._closing_event.set()
            self._dispatch_wake.set()
            self._release_wake.set()
            await dispatch
            await release
            await park
            await ack
        finally:
            stats.cancel()
            for task in (*loops, *self._publishing):
                task.cancel()
            await asyncio.gather(*loops, stats, *self._publishing, return_exceptions=True)
            await self._close_connectors()

    # --- start and stop -----------------------------------------------------------------------

    async def _start_connectors(self, stop: asyncio.Event) -> bool:
        for component, start in (("database", self.source.start), ("sink", self.sink.start)):
            await self._until_done(
                start, f"{component} not reachable, retrying", stop=stop, database=False, component=component
            )
            if stop.is_set():
                return False
        self.db_ok = self.sink_ok = True
        self._m_db_up.set(1)
        self._m_sink_up.set(1)
        self.started = True
        self._log.info("outbox started", source=self.source.kind, sink=self.sink.kind)
        return True

    async def _load_held(self, stop: asyncio.Event) -> bool:
        """Aggregates held by an earlier run stay held: their new events go behind the held ones."""
        store = self._dead_letters
        assert store is not None
        keys = await self._until_done(
            partial(store.held_aggregates, self.name),
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
        self._m_held_aggregates.set(len(self._holding))
        return True

    async def _close_connectors(self) -> None:
        """Close each even when another fails: the sink's close flushes what the broker took."""
        closers = [self.sink.discard if self._fence_lost.is_set() else self.sink.close, self.source.close]
        if self._dead_letters is not None:
            closers.append(self._dead_letters.close)
        for closer in closers:
            try:
                await closer()
            except Exception as exc:
                self._log.warning("close failed", error=describe_error(exc))

    # --- fetch --------------------------------------------------------------------------------

    async def _fetch_loop(self, stop: asyncio.Event, drain: bool) -> None:
        tuning = self._tuning
        while not stop.is_set():
            room = tuning.max_in_flight - max(self._held, self.source.unconfirmed)
            if room <= 0:
                self._space_freed.clear()
                self._hold_failing_lanes()
                if tuning.max_in_flight - max(self._held, self.source.unconfirmed) <= 0:
                    await _wait_either(self._space_freed, stop)
                continue
            events = await self._until_done(
                partial(self._timed_fetch, room), "fetch failed, retrying", stop=stop
            )
            if events is None:  # stopped while the database was away
                break
            if events:
                self._held += len(events)
                if self._holding:
                    events = self._divert_held(events)
                self._lanes.add(events)
                self._dispatch_wake.set()
                if not self.source.caught_up:
                    continue
            if drain and self.source.caught_up and not events:
                if self._held == 0:
                    self._log.info("drained: the outbox is empty", published=self.published)
                    break
                self._space_freed.clear()
                await _wait_either(self._space_freed, stop, 0.1)
                continue
            await _first_of(self.source.wait_for_events(), stop)

    def _divert_held(self, events: list[OutboxEvent]) -> list[OutboxEvent]:
        """Events of held aggregates go to the store behind the held ones; returns the rest."""
        flowing: list[OutboxEvent] = []
        for event in events:
            key = event.lane_key
            if key in self._holding:
                self._holding.sent_to_store(key)
                self._park_queue.append((event, "held behind earlier events of its aggregate", False, HELD))
            else:
                flowing.append(event)
        if len(flowing) != len(events):
            self._park_wake.set()
        return flowing

    def _hold_failing_lanes(self) -> None:
        """The in-flight window is full and nothing more can be fetched: either a failing
        aggregate's events fill it (its lane grows while its first event is retried), or, in
        logical replication, events acknowledged behind it cannot be confirmed (confirmation is
        in commit order). Either way every other aggregate waits for it. Hold the lanes whose
        first event fails on its own (the broker took other events meanwhile; not in an outage,
        when nothing goes through and everything waits anyway) in the store, in order: the
        window frees and the others flow; the held ones are retried from there."""
        if self._dead_letters is None or self._sink_paused_until > time.monotonic():
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
            self._hold_lane(head, "held while it kept failing and filled the in-flight window", False)

    def _hold_lane(self, head: OutboxEvent, reason: str, permanent: bool) -> None:
        """Move `head`'s whole lane to the store as held, `head` first; its aggregate is held
        until the store has nothing of it any more (see the release loop)."""
        key = head.lane_key
        evicted = self._lanes.evict(key)
        assert evicted and evicted[0] is head, "a lane is held from its first event"
        self._holding.hold(key, time.monotonic() + self._backoff.delay(max(head.attempts, 1)))
        for event in evicted:
            self._holding.sent_to_store(key)
            if event is head:
                self._park_queue.append((event, reason, permanent, HELD))
            else:
                self._park_queue.append((event, f"held behind event {head.event_id}", False, HELD))
        self._m_held_aggregates.set(len(self._holding))
        self._park_wake.set()
        self._release_wake.set()
        self._dispatch_wake.set()

    async def _timed_fetch(self, room: int) -> list[OutboxEvent]:
        started = time.perf_counter()
        with self.calls.call("fetch"):
            events = await self.source.fetch(room)
        self._m_fetch.observe(time.perf_counter() - started)
        return events

    # --- dispatch and publish -----------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        slots = asyncio.Semaphore(self._tuning.publish_concurrency)
        batch_size = self._tuning.publish_batch_size
        depth = self.per_aggregate_depth
        while True:
            await slots.acquire()
            if self._closing_event.is_set():
                slots.release()
                break
            pause = self._sink_paused_until - time.monotonic()
            if pause > 0:
                # The broker did not answer the last call: give it a breather as a whole rather
                # than hammering it (and the log) as each event's own retry comes due.
                slots.release()
                await _wait_either(self._closing_event, None, pause)
                continue
            batch = self._lanes.take(batch_size, time.monotonic(), depth)
            if not batch:
                slots.release()
                self._dispatch_wake.clear()
                now = time.monotonic()
                if self._lanes.has_ready(now):
                    continue
                retry_at = self._lanes.next_retry_at()
                timeout = None if retry_at is None else max(retry_at - now, 0.0)
                await _wait_either(self._dispatch_wake, None, timeout)
                continue
            task = asyncio.create_task(self._publish(batch))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)
            task.add_done_callback(lambda _: slots.release())
        if self._publishing:
            await asyncio.gather(*self._publishing, return_exceptions=True)
        self._dispatch_done.set()
        self._park_wake.set()

    async def _publish(self, batch: list[OutboxEvent]) -> None:
        # A defect cannot become a message; the events behind it of its aggregate in this call
        # are not sent either (they would reach the broker ahead of it): they go back behind it.
        defective = {e.lane_key for e in batch if e.defect is not None}
        if defective:
            behind: set[tuple[str, str | None]] = set()
            sendable = []
            for event in batch:
                if event.lane_key in behind:
                    continue
                if event.defect is not None:
                    behind.add(event.lane_key)
                else:
                    sendable.append(event)
        else:
            sendable = batch
        started = time.perf_counter()
        called_at = time.monotonic()
        results: Sequence[PublishResult]
        whole_call_failed = False
        if not self._may_act():
            return  # (its events stay unsettled: this run is over)
        try:
            with self.calls.call("publish"):
                results = await self.sink.publish(sendable) if sendable else []
            if len(results) != len(sendable):
                raise RuntimeError(f"sink returned {len(results)} results for {len(sendable)} events")
        except Exception as exc:
            # (A login refused on reconnect is a setup problem, said as one; an outage is not.)
            self.problems.report("sink", exc)
            results = [Failure(describe_error(exc), transient=True)] * len(sendable)
            whole_call_failed = self._broker_outcome(called_at, sendable, results, raised=True)
        else:
            if sendable:  # (a call with only defect rows heard nothing from the broker)
                self._broker_outcome(called_at, sendable, results)
        self._m_publish.observe(time.perf_counter() - started)
        if len(sendable) != len(batch):
            by_event = dict(zip(map(id, sendable), results, strict=True))
            results = [
                by_event[id(e)]
                if id(e) in by_event
                else (Failure(e.defect, permanent=True) if e.defect is not None else _NOT_SENT)
                for e in batch
            ]
        self._settle(batch, results, log_each=not whole_call_failed)

    def _settle(
        self, batch: list[OutboxEvent], results: Sequence[PublishResult], *, log_each: bool = True
    ) -> None:
        """Advance acknowledged lanes; park poison events; schedule retries for the rest.
        `log_each` is off when the whole call failed: that was logged once, and a line per event
        would flood the log."""
        acked: list[OutboxEvent] = []
        lanes = self._lanes
        now_wall = time.time()
        e2e = self._m_e2e
        failed = retried = 0
        # Aggregates with a failure earlier in this call: their later events in the call go back
        # into the lane behind the failed one, acknowledged by the broker or not.
        stopped: set[tuple[str, str | None]] = set()
        ahead = 0
        amid_successes = None in results
        for event, result in zip(batch, results, strict=True):
            if stopped and event.lane_key in stopped:
                ahead += result is None
                continue
            if result is None:
                lanes.succeeded(event)
                acked.append(event)
                e2e.observe(now_wall - event.created_at)
                continue
            stopped.add(event.lane_key)
            failed += 1
            event.attempts += 1
            if event.first_failed_at is None:
                event.first_failed_at = now_wall
            # Failing on its own: the broker took other events of this call, or some since it
            # first failed (not so in an outage, when nothing goes through).
            if amid_successes or self._last_taken > event.first_failed_at:
                event.failed_amid_successes = True
            if not result.transient:
                event.rejections += 1
            if self._dead_letters is not None and (
                result.permanent or event.rejections >= self._dead_letter.after_attempts
            ):
                if self._block:
                    # Block: it and everything after it of its aggregate wait in the store, in
                    # order, retried from there; memory and the source's progress stay free.
                    self._hold_lane(event, result.reason, result.permanent)
                    continue
                # The lane stays out until the event is parked: nothing later of its aggregate
                # overtakes it before it is safely in the dead-letter table.
                lanes.hold(event)
                self._park_queue.append((event, result.reason, result.permanent, DEAD))
                self._park_wake.set()
                continue
            delay = self._backoff.delay(event.attempts)
            lanes.failed(event, time.monotonic() + delay)
            retried += 1
            if result.setup or (not log_each and event.defect is None):
                continue  # (a refusal of the relay itself is said once, as a setup problem)
            self._log.warning(
                "event not acknowledged, will retry",
                event_id=event.event_id,
                aggregate_id=event.aggregate_id,
                position=event.position,
                reason=result.reason,
                permanent=result.permanent,
                attempt=event.attempts,
                retry_in=round(delay, 3),
            )
        if ahead:
            self._log.warning(
                "events acknowledged after an earlier event of their aggregate failed in the same "
                "call; they will be published again after it",
                events=ahead,
            )
        if acked:
            self._last_taken = now_wall
            self.published += len(acked)
            self._m_published.inc(len(acked))
            self._ack_queue.extend(acked)
            self._ack_wake.set()
        if failed:
            self._m_failures.inc(failed)
        if retried:
            self._m_retries.inc(retried)
            # A fetch waiting for room looks again: a lane waiting for a retry may be one to hold.
            self._space_freed.set()
        self._dispatch_wake.set()

    # --- dead letters and acks ---------------------------------------------------------------

    async def _batches(
        self, queue: list[Any], wake: asyncio.Event, upstream_done: asyncio.Event
    ) -> AsyncIterator[list[Any]]:
        """Whatever piled up in `queue` (a list the producer side appends to), batch by batch,
        until the producer side is done and the queue is empty."""
        while True:
            if not queue:
                if upstream_done.is_set():
                    return
                wake.clear()
                if not queue and not upstream_done.is_set():
                    await wake.wait()
                continue
            batch = queue[:]
            queue.clear()
            yield batch

    async def _until_done(
        self,
        action: Callable[[], Awaitable[T]],
        failing: str,
        *,
        stop: asyncio.Event | None = None,
        database: bool = True,
        component: str = "database",
        stage: str | None = None,
        **fields: object,
    ) -> T | None:
        """Run `action` until it succeeds and return its result, backing off between attempts
        and logging each failure as `failing`; None once `stop` is set. Database writes pass no
        `stop`: the database may be restarting, and giving up would lose an acknowledgement (or
        a dead letter). With `database`, the outcome also says whether the database is up. A
        setup problem of `component` (see relay.problems) is reported as one, not as a retry.
        With `stage`, each attempt is tracked as a call of that stage (relay.stalls); the waits
        between attempts are not."""
        attempt = 0
        while stop is None or not stop.is_set():
            try:
                if stage is None:
                    result = await action()
                else:
                    with self.calls.call(stage):
                        result = await action()
            except Exception as exc:
                if isinstance(exc, Unsupported) and stop is not None:
                    raise  # retrying cannot help: the relay stops and says why
                if isinstance(exc, Fenced):
                    self._fence_lost.set()
                    raise  # the lease is over: this run ends
                attempt += 1
                if database:
                    self._set_db(False)
                delay = _CONNECT_BACKOFF.delay(attempt)
                if not self.problems.report(component, exc):
                    self._log.error(
                        failing,
                        error=describe_error(exc),
                        attempt=attempt,
                        retry_in=round(delay, 2),
                        **fields,
                    )
                if stop is None:
                    await asyncio.sleep(delay)
                else:
                    await _wait_either(stop, None, delay)
                continue
            if database:
                self._set_db(True)
            self.problems.clear(component)
            return result
        return None

    async def _park_loop(self) -> None:
        """Store poison events in the dead-letter table, then acknowledge them to the source."""
        async for batch in self._batches(self._park_queue, self._park_wake, self._dispatch_done):
            store = self._dead_letters
            assert store is not None
            await self._until_done(
                self._fenced(partial(store.park, self.name, batch)),
                "cannot store dead letters, retrying (does the table exist? run init-db)",
                stage="dead-letter",
                events=len(batch),
            )
            dead = 0
            for event, reason, permanent, state in batch:
                if state == HELD:
                    self._holding.stored(event.lane_key)
                    if event.attempts:  # (the first one of its aggregate, not those behind it)
                        self._log.warning(
                            "event held in the dead-letter table with the rest of its aggregate",
                            event_id=event.event_id,
                            aggregate_id=event.aggregate_id,
                            position=event.position,
                            reason=reason,
                            attempts=event.attempts,
                        )
                    continue
                dead += 1
                self._lanes.succeeded(event)
                self._log.warning(
                    "event dead-lettered",
                    event_id=event.event_id,
                    aggregate_id=event.aggregate_id,
                    position=event.position,
                    reason=reason,
                    permanent=permanent,
                    attempts=event.attempts,
                    refusals=event.rejections,
                )
            self._m_dead_lettered.inc(dead)
            self._ack_queue.extend(event for event, _, _, _ in batch)
            self._ack_wake.set()
            self._dispatch_wake.set()
        self._park_done.set()
        self._ack_wake.set()

    async def _release_loop(self) -> None:
        """Retry the first held event of each held aggregate when due; once the broker took it,
        publish the next held one at once; release the aggregate when none is left."""
        holding = self._holding
        while not self._closing_event.is_set():
            for key in holding.due(time.monotonic()):
                if self._closing_event.is_set():
                    break
                await self._release_step(key)
            self._m_held_aggregates.set(len(holding))
            self._release_wake.clear()
            next_due = holding.next_due()
            timeout = None if next_due is None else max(next_due - time.monotonic(), 0.0)
            await _wait_either(self._release_wake, self._closing_event, timeout)

    async def _release_step(self, key: Any) -> None:
        """One release attempt of held `key`, rescheduling the next one: its first held events
        (as many as a call may carry of one aggregate, the first alone while it is failing) go
        to the sink; those the broker took leave the store."""
        store = self._dead_letters
        assert store is not None
        holding, now = self._holding, time.monotonic()
        generation = holding.generation(key)
        depth = 1 if holding.failures[key] else self.per_aggregate_depth
        try:
            with self.calls.call("dead-letter"):
                letters = await store.first_held(self.name, key, depth)
        except Exception as exc:
            self._set_db(False)
            self._log.warning("cannot read held events", error=describe_error(exc))
            holding.attempt_at(key, now + _CONNECT_BACKOFF.delay(holding.failures[key] + 1))
            return
        if not letters:
            if holding.release_if_empty(key, generation):
                self._log.info("held aggregate released: every held event is published", aggregate_id=key[1])
                self._dispatch_wake.set()
            else:  # an event of it is on its way to the store: look again once it is there
                holding.attempt_at(key, now + 0.05)
            return
        sendable = list(itertools.takewhile(lambda letter: letter.sendable, letters))
        if not sendable:
            # It can never become a message: it holds its aggregate until an operator purges it
            # (`dlq purge`); look again now and then.
            holding.attempt_at(key, now + self._backoff.maximum)
            return
        events = [held_event(letter) for letter in sendable]
        called_at = time.monotonic()
        if not self._may_act():
            return
        try:
            with self.calls.call("release"):
                results = list(await self.sink.publish(events))
            if len(results) != len(events):
                raise RuntimeError(f"sink returned {len(results)} results for {len(events)} events")
        except Exception as exc:
            results = [Failure(describe_error(exc), transient=True)] * len(events)
        else:
            # Only as evidence the broker is up: a held aggregate fails on its own, so its
            # retries failing say nothing about the broker (dispatched calls tell an outage).
            if any(result is None or not result.transient for result in results):
                self._broker_outcome(called_at, events, results)
        taken = list(itertools.takewhile(lambda result: result is None, results))
        if taken:
            released = [letter.event_id for letter in sendable[: len(taken)]]
            await self._until_done(
                self._fenced(partial(store.release, self.name, released)),
                "cannot release held events",
                stage="dead-letter",
            )
            holding.failures.pop(key, None)
            self.published += len(taken)
            self._m_published.inc(len(taken))
            wall = time.time()
            for event in events[: len(taken)]:
                self._m_e2e.observe(wall - event.created_at)
        if len(taken) == len(events):
            holding.attempt_at(key, time.monotonic())  # the next ones at once
            return
        letter, result = sendable[len(taken)], results[len(taken)]
        assert result is not None
        await self._held_event_failed(key, letter, result)

    async def _held_event_failed(self, key: Any, letter: DeadLetter, result: Failure) -> None:
        """The first held event of `key` was not taken: record it, dead-letter it when it is
        poison outside block mode (its aggregate moves on), else retry it after a backoff."""
        store = self._dead_letters
        assert store is not None
        holding = self._holding
        holding.failures[key] += 1
        attempts = letter.attempts + 1
        # Only the broker's refusals count towards after_attempts, as for events not held.
        refusals = letter.refusals + (0 if result.transient else 1)
        self._m_failures.inc()
        poison = result.permanent or (not result.transient and refusals >= self._dead_letter.after_attempts)
        state = DEAD if poison and not self._block else HELD
        await self._until_done(
            self._fenced(
                partial(
                    store.note_failure,
                    self.name,
                    letter.event_id,
                    result.reason,
                    attempts,
                    refusals,
                    state,
                    result.permanent,
                )
            ),
            "cannot record a held event's failure",
            stage="dead-letter",
        )
        if state == DEAD:
            self._m_dead_lettered.inc()
            self._log.warning(
                "held event dead-lettered; its aggregate moves on",
                event_id=letter.event_id,
                aggregate_id=letter.aggregate_id,
                reason=result.reason,
                attempts=attempts,
                refusals=refusals,
            )
            holding.failures.pop(key, None)
            holding.attempt_at(key, time.monotonic())
            return
        delay = self._backoff.delay(holding.failures[key])
        self._log.warning(
            "held event not acknowledged, will retry",
            event_id=letter.event_id,
            aggregate_id=letter.aggregate_id,
            reason=result.reason,
            attempt=attempts,
            retry_in=round(delay, 3),
        )
        holding.attempt_at(key, time.monotonic() + delay)

    async def _ack_loop(self) -> None:
        async for batch in self._batches(self._ack_queue, self._ack_wake, self._park_done):
            started = time.perf_counter()
            await self._until_done(
                self._fenced(partial(self.source.ack, batch)),
                "ack failed, retrying (the broker already has these events)",
                stage="ack",
                events=len(batch),
            )
            self._m_ack.observe(time.perf_counter() - started)
            self._held -= len(batch)
            self._space_freed.set()

    # --- stats --------------------------------------------------------------------------------

    async def _stats_loop(self) -> None:
        pending = metrics.PENDING.labels(self.name)
        lag = metrics.LAG.labels(self.name)
        in_flight = metrics.IN_FLIGHT.labels(self.name)
        blocked = metrics.BLOCKED_AGGREGATES.labels(self.name)
        dead_letters = metrics.DEAD_LETTERS.labels(self.name)
        held = metrics.HELD_EVENTS.labels(self.name)
        while True:
            in_flight.set(self._held)
            blocked.set(self._lanes.blocked_lanes)
            try:
                stats = await self.source.backlog()
                pending.set(stats.pending)
                lag.set(stats.oldest_age_seconds)
                if stats.slot_lag_bytes is not None:
                    metrics.SLOT_LAG.labels(self.name).set(stats.slot_lag_bytes)
            except Exception as exc:
                self._set_db(False)
                self._log.warning("backlog query failed", error=describe_error(exc))
            if self._dead_letters is not None:
                # The dead-letter table may live in another database, or not exist yet (init-db
                # not run): that says nothing about the outbox's database.
                try:
                    dead_letters.set(await self._dead_letters.count(self.name))
                    held.set(await self._dead_letters.count(self.name, HELD))
                except Exception as exc:
                    self._log.warning("cannot count dead letters", error=describe_error(exc))
            await asyncio.sleep(self._tuning.stats_interval)

    # --- health -------------------------------------------------------------------------------

    def _oldest_call_seconds(self) -> float:
        oldest = self.calls.oldest()
        return 0.0 if oldest is None else oldest[1]

    def _set_db(self, ok: bool) -> None:
        if ok != self.db_ok:
            self.db_ok = ok
            self._m_db_up.set(1 if ok else 0)
            if ok:
                self._log.info("database reachable again")

    def _broker_outcome(
        self,
        called_at: float,
        events: Sequence[OutboxEvent],
        results: Sequence[PublishResult],
        *,
        raised: bool = False,
    ) -> bool:
        """Record what one publish call (begun at `called_at`, monotonic) says about the broker,
        for readiness and `outbox_relay_up{component="sink"}` (see `Sink` for what results
        mean). Returns True when the call raised: the caller logs it once, not once per event.

        Up when the broker took an event or answered about one (a refusal of an event,
        permanent or not, is an answer). Down when the call raised, or when every result is a
        transient failure: whatever the sink, that is a broker not accepting work, and an outage
        must not look ready because `publish` returned. The state follows each call, with no
        hysteresis of its own (probes' failureThreshold and alerts' `for:` smooth it where it
        is read), except where a call's silence says nothing new about the broker as a whole:
        - the call began before another one heard from the broker (concurrent calls straddling
          a recovery must not turn it back down);
        - every event of it already failed while the broker took others (an aggregate failing
          on its own, retried alone, must not flap readiness at each retry).
        A raising call also pauses dispatching as a whole (backing off up to 10 s)."""
        refused = next((r for r in results if r is not None and r.setup), None)
        if refused is not None:  # (the broker answered, refusing the relay: never "up")
            self.problems.report_refusal("sink", refused.reason)
        elif not raised and any(result is None or not result.transient for result in results):
            self._last_heard = time.monotonic()
            self._sink_failures = 0
            self._set_sink(True)
            self.problems.clear("sink")
            return False
        reason = next((r.reason for r in results if r is not None), "no result")
        if raised:
            self._sink_failures += 1
            pause = _CONNECT_BACKOFF.delay(self._sink_failures)
            self._sink_paused_until = max(self._sink_paused_until, time.monotonic() + pause)
            self._log.error(
                "publish failed",
                error=reason,
                events=len(results),
                attempt=self._sink_failures,
                retry_in=round(pause, 2),
            )
        if called_at < self._last_heard or (
            not raised
            and refused is None
            and all(event.failed_amid_successes for event in events)
            # ...as long as the broker took something lately: once it has not for as long as
            # the longest backoff, these retries are all there is to hear from it.
            and time.monotonic() - self._last_heard <= self._backoff.maximum
        ):
            return raised
        if self.sink_ok and not raised:
            self._log.error("the broker answers no event: not ready", error=reason, events=len(results))
        self._set_sink(False)
        return raised

    def _set_sink(self, ok: bool) -> None:
        if ok != self.sink_ok:
            self.sink_ok = ok
            self._m_sink_up.set(1 if ok else 0)
            if ok:
                self._log.info("broker reachable again")


async def _wait_either(
    first: asyncio.Event, second: asyncio.Event | None, timeout: float | None = None
) -> None:
    """Wait until either event is set or the timeout passes."""
    waits = [asyncio.ensure_future(first.wait())]
    if second is not None:
        waits.append(asyncio.ensure_future(second.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()


async def _first_of(awaitable: Awaitable[Any], stop: asyncio.Event) -> None:
    main = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((main, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not main.done():
            main.cancel()
        await asyncio.gather(main, stopper, return_exceptions=True)
