"""The pipeline of one outbox: source -> lanes -> sink -> ack back to the source, wired here from
parts with one job each:
- fetch    (relay.fetching): pulls events while the in-flight window (relay.flow) has room, so
           memory and the events a crash would send again stay bounded by `max_in_flight`;
- lanes    (relay.lanes): the order per aggregate;
- dispatch (relay.dispatch): hands the first events of ready lanes to the sink, up to
           `publish_concurrency` calls at once, and settles each call as the pure settlement
           policy (relay.settlement) decides: ack, retry at a time, park, hold;
- park     (relay.parking): writes poison events (dead) and events of held aggregates (held) to
           the dead-letter store, behind a small protocol;
- release  (relay.release): retries the first held event of each held aggregate, then
           publishes the ones behind it;
- ack      (here): records broker-acknowledged (or parked) events in the source, coalescing what
           piled up;
- observe  (relay.observer, relay.broker_health): metrics, readiness, pending events and lag.
Nothing is acknowledged to the source unless the sink reported it acknowledged by the broker, or
it is stored in the dead-letter table. Every call repeated until it succeeds goes through
relay.retries, paced by the one retry policy (relay.backoff.Retrying).
"""

from __future__ import annotations

import asyncio
import time
from functools import partial

from outbox_relay.backoff import Backoff
from outbox_relay.broker_health import BrokerHealth
from outbox_relay.config import DeadLetterConfig, PipelineConfig, RetryConfig
from outbox_relay.dispatch import Dispatcher
from outbox_relay.fencing import FenceGuard
from outbox_relay.fetching import Fetcher
from outbox_relay.flow import Flow, InFlight, batches
from outbox_relay.holds import HeldAggregates
from outbox_relay.interfaces import Fence, Sink, Source
from outbox_relay.lanes import Lanes
from outbox_relay.logs import get_logger
from outbox_relay.observer import PipelineObserver, describe_error
from outbox_relay.parking import DeadLetterParking, Parking
from outbox_relay.problems import SetupProblems
from outbox_relay.release import Releaser
from outbox_relay.retries import UntilDone
from outbox_relay.settlement import SettlementPolicy
from outbox_relay.stalls import CallTracker

__all__ = ["Pipeline", "describe_error"]


class Pipeline:
    """Relays the events of one outbox from `source` to `sink` (see the module's docstring);
    `dead_letters` is where poison events and held aggregates are parked (the PostgreSQL table
    in production, `outbox_relay.testing.MemoryDeadLetters` in tests)."""

    def __init__(
        self,
        name: str,
        source: Source,
        sink: Sink,
        *,
        retry: RetryConfig,
        tuning: PipelineConfig,
        dead_letters: DeadLetterParking,
        dead_letter: DeadLetterConfig | None = None,
    ) -> None:
        self.name, self.source, self.sink = name, source, sink
        self._tuning = tuning
        dead_letter = dead_letter or DeadLetterConfig()
        # Required: without a store, the events behind a poison one would wait in memory, fill
        # the in-flight window and hold back every other aggregate.
        self._dead_letters = dead_letters
        self._block = dead_letter.on_poison == "block"
        self._log = get_logger(outbox=name)
        #: Setup mistakes that stop this outbox until fixed (relay.problems).
        self.problems = SetupProblems(name, self._log)
        #: Calls out to the source, sink and dead-letter store now (for liveness, relay.stalls).
        self.calls = CallTracker()
        self.started = False
        self._observer = PipelineObserver(name, sink.kind, self._log, self.calls)
        self._guard = FenceGuard(self._log)
        self._until_done = UntilDone(self._log, self.problems, self._observer, self.calls, self._guard)
        backoff = Backoff(retry.initial, retry.max, retry.multiplier)
        self._health = BrokerHealth(self._log, self.problems, self._observer, backoff.maximum)
        self._flow = Flow(InFlight(tuning.max_in_flight))
        self._lanes, self._holding = Lanes(), HeldAggregates()
        policy = SettlementPolicy(backoff, dead_letter.after_attempts, self._block)
        self._parking, self._fetcher, self._dispatcher, self._releaser = _wire(self, policy)

    # --- public -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.started and self.db_ok and self.sink_ok

    @property
    def db_ok(self) -> bool:
        return self._observer.db_ok

    @property
    def sink_ok(self) -> bool:
        return self._observer.sink_ok

    @property
    def published(self) -> int:
        """Events the broker took."""
        return self._observer.published

    @property
    def held(self) -> int:
        """Events fetched and not yet acknowledged to the source."""
        return self._flow.window.count

    @property
    def per_aggregate_depth(self) -> int:
        """How many consecutive events of one aggregate may go out in one sink call.

        More than one only when the sink keeps the order of a call's events and a poison event
        is dead-lettered: with `on_poison: block` an event refused by the broker must hold back
        every later event of its aggregate, and a later one sent in the same call might already
        have been accepted."""
        if self.sink.keeps_order and not self._block:
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
            self._guard.fence = fence
            self.source.fence_with(fence)
            self.sink.fence = fence
        if abandon is None and fence is None:
            await self._run(stop, drain)
            return True
        return await self._guard.run_until_lost(self._run(stop, drain), abandon)

    async def _run(self, stop: asyncio.Event, drain: bool) -> None:
        if not await self._start_connectors(stop):
            return
        if not await self._releaser.load(stop):
            await self._close_connectors()
            return
        flow, name = self._flow, self.name
        fetch = asyncio.create_task(self._fetcher.run(stop, drain), name=f"{name}:fetch")
        dispatch = asyncio.create_task(self._dispatcher.run(), name=f"{name}:dispatch")
        park = asyncio.create_task(self._parking.run(), name=f"{name}:dead-letter")
        release = asyncio.create_task(self._releaser.run(), name=f"{name}:release")
        ack = asyncio.create_task(self._ack_loop(), name=f"{name}:ack")
        stats = asyncio.create_task(self._watch_backlog(), name=f"{name}:stats")
        loops = (fetch, dispatch, park, release, ack)
        try:
            await fetch
            flow.closing.set()
            flow.dispatch_wake.set()
            flow.release_wake.set()
            for loop in (dispatch, release, park, ack):
                await loop
        finally:
            stats.cancel()
            publishing = self._dispatcher.publishing
            for task in (*loops, *publishing):
                task.cancel()
            await asyncio.gather(*loops, stats, *publishing, return_exceptions=True)
            await self._close_connectors()

    # --- start and stop -----------------------------------------------------------------------

    async def _start_connectors(self, stop: asyncio.Event) -> bool:
        for component, start in (("database", self.source.start), ("sink", self.sink.start)):
            await self._until_done(
                start, f"{component} not reachable, retrying", stop=stop, database=False, component=component
            )
            if stop.is_set():
                return False
        self._observer.connected()
        self.started = True
        self._log.info("outbox started", source=self.source.kind, sink=self.sink.kind)
        return True

    async def _close_connectors(self) -> None:
        """Close each even when another fails: the sink's close flushes what the broker took."""
        sink_close = self.sink.discard if self._guard.lost.is_set() else self.sink.close
        closers = [sink_close, self.source.close, self._dead_letters.close]
        for closer in closers:
            try:
                await closer()
            except Exception as exc:
                self._log.warning("close failed", error=describe_error(exc))

    # --- ack and stats ------------------------------------------------------------------------

    async def _ack_loop(self) -> None:
        flow = self._flow
        async for batch in batches(flow.acks, flow.ack_wake, flow.park_done):
            started = time.perf_counter()
            await self._until_done(
                self._guard.fenced(partial(self.source.ack, batch)),
                "ack failed, retrying (the broker already has these events)",
                stage="ack",
                events=len(batch),
            )
            self._observer.stage_took("ack", time.perf_counter() - started)
            flow.window.acknowledged(len(batch))

    async def _watch_backlog(self) -> None:
        await self._observer.watch_backlog(
            self.source,
            self._dead_letters,
            lambda: self._flow.window.count,
            lambda: self._lanes.blocked_lanes,
            self._tuning.stats_interval,
        )


def _wire(p: Pipeline, policy: SettlementPolicy) -> tuple[Parking, Fetcher, Dispatcher, Releaser]:
    """The pipeline's working parts, each given the shared state and services it needs."""
    parking = Parking(
        p.name, p._dead_letters, p._lanes, p._holding, p._flow, policy,
        log=p._log, observer=p._observer, until_done=p._until_done, guard=p._guard,
    )  # fmt: skip
    fetcher = Fetcher(
        p.source, p._lanes, p._holding, p._flow, parking,
        log=p._log, observer=p._observer, health=p._health, until_done=p._until_done, calls=p.calls,
    )  # fmt: skip
    dispatcher = Dispatcher(
        p.sink, p._lanes, p._flow, policy, parking,
        batch_size=p._tuning.publish_batch_size, concurrency=p._tuning.publish_concurrency,
        depth=lambda: p.per_aggregate_depth,
        log=p._log, observer=p._observer, health=p._health, guard=p._guard, calls=p.calls,
    )  # fmt: skip
    releaser = Releaser(
        p.name, p._dead_letters, p.sink, p._holding, p._flow, policy, lambda: p.per_aggregate_depth,
        log=p._log, observer=p._observer, health=p._health, until_done=p._until_done, guard=p._guard,
        calls=p.calls,
    )  # fmt: skip
    return parking, fetcher, dispatcher, releaser
