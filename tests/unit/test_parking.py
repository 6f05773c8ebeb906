"""The pipeline parks behind the small `DeadLetterParking` protocol: a store in memory is enough
for poison events to be dead-lettered and for held aggregates to be held and released in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from outbox_relay.config import DeadLetterConfig, PipelineConfig, RetryConfig
from outbox_relay.deadletters import DEAD, HELD
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import Sink
from outbox_relay.parking import DeadLetterParking
from outbox_relay.pipeline import Pipeline
from outbox_relay.testing import MemoryDeadLetters
from tests.sink_support import ListSource, eventually, make_events


class _Refusing(Sink):
    """Refuses for good the events whose id is in `poison`; takes the others, noting their order."""

    kind = "refusing"

    def __init__(self, poison: set[str]) -> None:
        self.poison = poison
        self.taken: list[OutboxEvent] = []

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        results: list[PublishResult] = []
        for event in events:
            refused = event.event_id in self.poison
            results.append(Failure("refused for good", permanent=True) if refused else None)
            if not refused:
                self.taken.append(event)
        return results


@asynccontextmanager
async def _running(
    sink: _Refusing, store: DeadLetterParking, on_poison: str, name: str
) -> AsyncIterator[tuple[Pipeline, ListSource]]:
    source = ListSource()
    pipeline = Pipeline(
        name,
        source,
        sink,
        retry=RetryConfig(initial=0.01, max=0.05),
        tuning=PipelineConfig(stats_interval=0.1),
        dead_letter=DeadLetterConfig.model_validate({"on_poison": on_poison}),
        dead_letters=store,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(pipeline.run(stop))
    try:
        yield pipeline, source
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)


def _ids_of(events: Sequence[OutboxEvent], aggregate_id: str) -> list[str]:
    return [event.event_id for event in events if event.aggregate_id == aggregate_id]


async def test_a_poison_event_is_dead_lettered_and_its_aggregate_moves_on_in_order() -> None:
    events = make_events(9, aggregates=3)
    poison = events[0]  # the first of its aggregate: those behind it must wait for it to be parked
    sink, store = _Refusing({poison.event_id}), MemoryDeadLetters()
    async with _running(sink, store, "dead_letter", "parking-dead") as (pipeline, source):
        source.add(events)
        await eventually(lambda: len(source.acked) == 9, 10, "every event acknowledged to the source")
        assert pipeline.held == 0
    assert [row.event_id for row in store.rows.values()] == [poison.event_id]
    assert [row.event_id for row in store.in_state("parking-dead", DEAD)] == [poison.event_id]
    others = [event for event in events if event is not poison]
    for aggregate in {event.aggregate_id or "" for event in events}:
        assert _ids_of(sink.taken, aggregate) == _ids_of(others, aggregate), "in order per aggregate"
    assert store.closed


async def test_with_on_poison_block_the_aggregate_is_held_in_the_store_and_released_in_order() -> None:
    events = make_events(9, aggregates=3)
    poison = events[0]
    aggregate = poison.aggregate_id or ""
    sink, store = _Refusing({poison.event_id}), MemoryDeadLetters()
    async with _running(sink, store, "block", "parking-block") as (pipeline, source):
        source.add(events)
        await eventually(lambda: len(source.acked) == 9, 10, "held events acknowledged to the source too")
        assert _ids_of(sink.taken, aggregate) == []
        await eventually(lambda: len(store.rows) == 3, 10, "the whole aggregate held in the store")
        assert {row.state for row in store.rows.values()} == {HELD}
        sink.poison.clear()  # (an operator fixed what the broker refused)
        await eventually(lambda: not store.rows, 10, "every held event released")
        await eventually(lambda: len(pipeline._holding) == 0, 10, "the aggregate released")
        assert _ids_of(sink.taken, aggregate) == _ids_of(events, aggregate)
        later = make_events(3, aggregates=3, start=10)
        source.add(later)
        await eventually(lambda: len(source.acked) == 12, 10, "new events of it flow again")
    assert _ids_of(sink.taken, aggregate) == _ids_of([*events, *later], aggregate)
