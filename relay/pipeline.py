"""The pipeline of one outbox: source -> lanes -> sink -> ack back to the source.

Four tasks share one event loop:
- fetch:    pulls events while the in-flight window has room (memory stays bounded by
            `max_in_flight`, whatever the backlog), so the next fetch overlaps the current publish;
- dispatch: hands the first events of ready lanes to the sink, up to `publish_concurrency` calls at once;
- ack:      records broker-acknowledged events in the source, coalescing whatever piled up;
- stats:    measures pending events and lag for the metrics.
Nothing is acknowledged to the source unless the sink reported it acknowledged by the broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

from relay import metrics
from relay.backoff import Backoff
from relay.config import DeadLetterConfig, PipelineConfig, RetryConfig
from relay.deadletters import DeadLetterStore
from relay.events import Failure, OutboxEvent, PublishResult
from relay.interfaces import Sink, Source, Unsupported
from relay.lanes import Lanes
from relay.logs import get_logger
from relay.secrets import scrubber

T = TypeVar("T")

# Reconnect pacing for the database and the broker as a whole (per-event retries use `retry:`).
_CONNECT_BACKOFF = Backoff(initial=0.2, maximum=10.0)


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
        # Without a store, poison events are retried like `on_poison: block`.
        self._dead_letters = dead_letters if self._dead_letter.on_poison == "dead_letter" else None
        self._park_queue: list[tuple[OutboxEvent, str, bool]] = []
        self._park_wake = asyncio.Event()
        self._park_done = asyncio.Event()
        self._backoff = Backoff(retry.initial, retry.max, retry.multiplier)
        self._log = get_logger(outbox=name)
        self._lanes = Lanes()
        self._held = 0  # fetched and not yet acknowledged to the source
        self._ack_queue: list[OutboxEvent] = []
        self._publishing: set[asyncio.Task[None]] = set()
        self._dispatch_wake = asyncio.Event()
        self._ack_wake = asyncio.Event()
        self._space_freed = asyncio.Event()
        self._dispatch_done = asyncio.Event()
        self._closing_event = asyncio.Event()
        self._sink_failures = 0  # consecutive publish calls that raised
        self._sink_paused_until = 0.0
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
        if self.sink.keeps_order and self._dead_letters is not None:
            return self._tuning.per_aggregate_in_flight
        return 1

    async def run(
        self, stop: asyncio.Event, *, drain: bool = False, abandon: asyncio.Event | None = None
    ) -> bool:
        """Relay until `stop` is set (or, with `drain`, until the source is caught up and empty).
        Returns True when it finished that way, False when `abandon` cut it short.

        On stop: fetch no more, let publishes already handed to the sink finish, acknowledge what
        the broker acknowledged, close the sink (flush). Events fetched but not yet published are
        simply left in the outbox for the next run. On `abandon` (leadership lost): stop at once,
        cancelling publishes in flight; another relay is taking over and re-sends what this one
        did not acknowledge.
        """
        if abandon is None:
            await self._run(stop, drain)
            return True
        work = asyncio.create_task(self._run(stop, drain))
        lost = asyncio.create_task(abandon.wait())
        await asyncio.wait((work, lost), return_when=asyncio.FIRST_COMPLETED)
        lost.cancel()
        if work.done():
            work.result()
            return True
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return False

    async def _run(self, stop: asyncio.Event, drain: bool) -> None:
        if not await self._start_connectors(stop):
            return
        fetch = asyncio.create_task(self._fetch_loop(stop, drain), name=f"{self.name}:fetch")
        dispatch = asyncio.create_task(self._dispatch_loop(), name=f"{self.name}:dispatch")
        park = asyncio.create_task(self._park_loop(), name=f"{self.name}:dead-letter")
        ack = asyncio.create_task(self._ack_loop(), name=f"{self.name}:ack")
        stats = asyncio.create_task(self._stats_loop(), name=f"{self.name}:stats")
        loops = (fetch, dispatch, park, ack)
        try:
            await fetch
            self._closing_event.set()
            self._dispatch_wake.set()
            await dispatch
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
            await self._until_done(start, f"{component} not reachable, retrying", stop=stop, database=False)
            if stop.is_set():
                return False
        self.db_ok = self.sink_ok = True
        self._m_db_up.set(1)
        self._m_sink_up.set(1)
        self.started = True
        self._log.info("outbox started", source=self.source.kind, sink=self.sink.kind)
        return True

    async def _close_connectors(self) -> None:
        """Close each even when another fails: the sink's close flushes what the broker took."""
        closers = [self.sink.close, self.source.close]
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
            room = tuning.max_in_flight - self._held
            if room <= 0:
                self._space_freed.clear()
                if tuning.max_in_flight - self._held <= 0:
                    await _wait_either(self._space_freed, stop)
                continue
            events = await self._until_done(
                partial(self._timed_fetch, room), "fetch failed, retrying", stop=stop
            )
            if events is None:  # stopped while the database was away
                break
            if events:
                self._held += len(events)
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

    async def _timed_fetch(self, room: int) -> list[OutboxEvent]:
        started = time.perf_counter()
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
        sendable = [e for e in batch if e.defect is None]
        started = time.perf_counter()
        results: Sequence[PublishResult]
        try:
            results = await self.sink.publish(sendable) if sendable else []
            if len(results) != len(sendable):
                raise RuntimeError(f"sink returned {len(results)} results for {len(sendable)} events")
            if sendable:  # (a call with only defect rows heard nothing from the broker)
                self._set_sink(True)
                self._sink_failures = 0
        except Exception as exc:
            self._set_sink(False)
            reason = describe_error(exc)
            self._sink_failures += 1
            pause = _CONNECT_BACKOFF.delay(self._sink_failures)
            self._sink_paused_until = max(self._sink_paused_until, time.monotonic() + pause)
            self._log.error(
                "publish failed",
                error=reason,
                events=len(sendable),
                attempt=self._sink_failures,
                retry_in=round(pause, 2),
            )
            results = [Failure(reason, transient=True)] * len(sendable)
            whole_call_failed = True
        else:
            whole_call_failed = False
        self._m_publish.observe(time.perf_counter() - started)
        if len(sendable) != len(batch):
            by_event = dict(zip(map(id, sendable), results, strict=True))
            results = [by_event.get(id(e), Failure(e.defect or "", permanent=True)) for e in batch]
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
            if not result.transient:
                event.rejections += 1
            if self._dead_letters is not None and (
                result.permanent or event.rejections >= self._dead_letter.after_attempts
            ):
                # The lane stays out until the event is parked: nothing later of its aggregate
                # overtakes it before it is safely in the dead-letter table.
                lanes.hold(event)
                self._park_queue.append((event, result.reason, result.permanent))
                self._park_wake.set()
                continue
            delay = self._backoff.delay(event.attempts)
            lanes.failed(event, time.monotonic() + delay)
            retried += 1
            if not log_each and event.defect is None:
                continue
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
            self.published += len(acked)
            self._m_published.inc(len(acked))
            self._ack_queue.extend(acked)
            self._ack_wake.set()
        if failed:
            self._m_failures.inc(failed)
        if retried:
            self._m_retries.inc(retried)
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
        **fields: object,
    ) -> T | None:
        """Run `action` until it succeeds and return its result, backing off between attempts
        and logging each failure as `failing`; None once `stop` is set. Database writes pass no
        `stop`: the database may be restarting, and giving up would lose an acknowledgement (or
        a dead letter). With `database`, the outcome also says whether the database is up."""
        attempt = 0
        while stop is None or not stop.is_set():
            try:
                result = await action()
            except Exception as exc:
                if isinstance(exc, Unsupported) and stop is not None:
                    raise  # retrying cannot help: the relay stops and says why
                attempt += 1
                if database:
                    self._set_db(False)
                delay = _CONNECT_BACKOFF.delay(attempt)
                self._log.error(
                    failing, error=describe_error(exc), attempt=attempt, retry_in=round(delay, 2), **fields
                )
                if stop is None:
                    await asyncio.sleep(delay)
                else:
                    await _wait_either(stop, None, delay)
                continue
            if database:
                self._set_db(True)
            return result
        return None

    async def _park_loop(self) -> None:
        """Store poison events in the dead-letter table, then acknowledge them to the source."""
        async for batch in self._batches(self._park_queue, self._park_wake, self._dispatch_done):
            store = self._dead_letters
            assert store is not None
            await self._until_done(
                partial(store.park, self.name, batch),
                "cannot store dead letters, retrying (does the table exist? run init-db)",
                events=len(batch),
            )
            for event, reason, permanent in batch:
                self._lanes.succeeded(event)
                self._log.warning(
                    "event dead-lettered",
                    event_id=event.event_id,
                    aggregate_id=event.aggregate_id,
                    position=event.position,
                    reason=reason,
                    permanent=permanent,
                    attempts=event.attempts,
                )
            self._m_dead_lettered.inc(len(batch))
            self._ack_queue.extend(event for event, _, _ in batch)
            self._ack_wake.set()
            self._dispatch_wake.set()
        self._park_done.set()
        self._ack_wake.set()

    async def _ack_loop(self) -> None:
        async for batch in self._batches(self._ack_queue, self._ack_wake, self._park_done):
            started = time.perf_counter()
            await self._until_done(
                partial(self.source.ack, batch),
                "ack failed, retrying (the broker already has these events)",
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
                except Exception as exc:
                    self._log.warning("cannot count dead letters", error=describe_error(exc))
            await asyncio.sleep(self._tuning.stats_interval)

    # --- health -------------------------------------------------------------------------------

    def _set_db(self, ok: bool) -> None:
        if ok != self.db_ok:
            self.db_ok = ok
            self._m_db_up.set(1 if ok else 0)
            if ok:
                self._log.info("database reachable again")

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
