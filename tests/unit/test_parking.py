"""The pipeline parks behind the small `DeadLetterParking` protocol: a store in memory is enough
for poison events to be dead-lettered and for held aggregates to be held and released in order."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from outbox_relay.config import DeadLetterConfig, PipelineConfig, RetryConfig
from outbox_relay.deadletters import DEAD, HELD, DeadLetter
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import Sink
from outbox_relay.parking import DeadLetterParking
from outbox_relay.pipeline import Pipeline
from tests.sink_support import ListSource, eventually, make_events


class _MemoryParking:
    """The dead-letter store as a dict by event id, in insertion order."""

    def __init__(self) -> None:
        self.rows: dict[str, DeadLetter] = {}
        self.closed = False

    async def park(self, outbox: str, events: Sequence[tuple[OutboxEvent, str, bool, str]]) -> None:
        now = datetime.now(UTC)
        for event, error, permanent, state in events:
            if event.event_id in self.rows and self.rows[event.event_id].state == HELD:
                continue
            self.rows[event.event_id] = DeadLetter(
                outbox, event.event_id, event.position, event.aggregate_type, event.aggregate_id,
                event.event_type, event.payload, event.content_type, event.headers,
                datetime.fromtimestamp(event.created_at, UTC), error, permanent, event.attempts, now, now,
                now, None, state, event.defect is None, event.rejections,
            )  # fmt: skip

    def _held(self, outbox: str) -> list[DeadLetter]:
        held = (row for row in self.rows.values() if row.outbox == outbox and row.state == HELD)
        return sorted(held, key=lambda row: row.position)

    async def held_aggregates(self, outbox: str) -> list[tuple[str, str | None]]:
        return list(dict.fromkeys((row.aggregate_type, row.aggregate_id) for row in self._held(outbox)))

    async def first_held(
        self, outbox: str, aggregate: tuple[str, str | None], limit: int = 1
    ) -> list[DeadLetter]:
        of_it = [row for row in self._held(outbox) if (row.aggregate_type, row.aggregate_id) == aggregate]
        return of_it[:limit]

    async def release(self, outbox: str, event_ids: Sequence[str]) -> None:
        for event_id in event_ids:
            self.rows.pop(event_id, None)

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
        row = self.rows[event_id]
        self.rows[event_id] = dataclasses.replace(
            row, error=error, attempts=attempts, refusals=refusals, state=state, permanent=permanent
        )

    async def count(self, outbox: str, state: str = DEAD) -> int:
        return sum(row.outbox == outbox and row.state == state for row in self.rows.values())

    async def close(self) -> None:
        self.closed = True


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
    sink, store = _Refusing({poison.event_id}), _MemoryParking()
    async with _running(sink, store, "dead_letter", "parking-dead") as (pipeline, source):
        source.add(events)
        await eventually(lambda: len(source.acked) == 9, 10, "every event acknowledged to the source")
        assert pipeline.held == 0
    assert [row.event_id for row in store.rows.values()] == [poison.event_id]
    assert store.rows[poison.event_id].state == DEAD
    others = [event for event in events if event is not poison]
    for aggregate in {event.aggregate_id or "" for event in events}:
        assert _ids_of(sink.taken, aggregate) == _ids_of(others, aggregate), "in order per aggregate"
    assert store.closed


async def test_with_on_poison_block_the_aggregate_is_held_in_the_store_and_released_in_order() -> None:
    events = make_events(9, aggregates=3)
    poison = events[0]
    aggregate = poison.aggregate_id or ""
    sink, store = _Refusing({poison.event_id}), _MemoryParking()
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
