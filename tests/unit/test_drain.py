"""`run --drain` on the in-memory connectors: it ends once the outbox is empty and no held
aggregate is being released; a held aggregate whose first event the broker takes is released to
its end in the same drain, one whose first event is still refused waits for the next run."""

from __future__ import annotations

import asyncio

from outbox_relay.config import DeadLetterConfig, PipelineConfig, RetryConfig
from outbox_relay.deadletters import HELD
from outbox_relay.holds import HeldAggregates
from outbox_relay.interfaces import SinkFeatures
from outbox_relay.pipeline import Pipeline
from outbox_relay.testing import (
    MemoryBroker,
    MemoryDeadLetters,
    MemorySink,
    MemorySource,
    ScriptedFaults,
    make_events,
)


def _pipeline(name: str, sink: MemorySink, store: MemoryDeadLetters) -> tuple[Pipeline, MemorySource]:
    source = MemorySource(broker=sink.broker, poll=0.01)
    pipeline = Pipeline(
        name,
        source,
        sink,
        retry=RetryConfig(initial=0.2, max=0.5),
        tuning=PipelineConfig(stats_interval=0.1),
        dead_letter=DeadLetterConfig(on_poison="block"),
        dead_letters=store,
    )
    return pipeline, source


async def _held_by_an_earlier_run(store: MemoryDeadLetters, name: str, count: int) -> list[str]:
    held = [event for event in make_events(count, aggregates=1)]
    await store.park(name, [(event, "refused by the broker", False, HELD) for event in held])
    return [event.event_id for event in held]


def test_one_drain_releases_a_held_aggregate_to_its_end_once_its_first_event_goes_through() -> None:
    name, store = "drain-held", MemoryDeadLetters()
    held = asyncio.run(_held_by_an_earlier_run(store, name, 10))
    sink = MemorySink(MemoryBroker(), SinkFeatures())
    pipeline, _ = _pipeline(name, sink, store)
    asyncio.run(asyncio.wait_for(pipeline.run(asyncio.Event(), drain=True), 20))
    assert [message.event_id for message in sink.broker.messages] == held, "all ten, in order"
    assert store.in_state(name, HELD) == []


def test_a_drain_leaves_an_aggregate_whose_first_event_is_still_refused_for_the_next_run() -> None:
    name, store = "drain-refused", MemoryDeadLetters()
    held = asyncio.run(_held_by_an_earlier_run(store, name, 3))
    sink = MemorySink(MemoryBroker(), SinkFeatures(), ScriptedFaults(poison=frozenset(held[:1])))
    pipeline, _ = _pipeline(name, sink, store)
    asyncio.run(asyncio.wait_for(pipeline.run(asyncio.Event(), drain=True), 20))
    assert [row.event_id for row in store.in_state(name, HELD)] == held
    assert sink.broker.messages == [], "nothing of the aggregate overtook its refused first event"


def test_held_aggregates_are_settled_when_no_attempt_is_under_way_or_due() -> None:
    holding = HeldAggregates()
    assert holding.settled(now=0.0)
    holding.hold(("order", "1"), attempt_at=5.0)
    assert holding.settled(now=1.0), "due later: a drain does not wait for it"
    assert not holding.settled(now=5.0), "due now"
    (key,) = holding.due(now=5.0)
    assert not holding.settled(now=5.0), "an attempt is under way"
    holding.attempt_at(key, 5.0)
    assert not holding.settled(now=5.0), "taken: the next ones are due at once"
    holding.due(now=5.0)
    holding.attempt_at(key, 9.0)
    assert holding.settled(now=6.0), "failed: it waits out its backoff, past the drain"
    holding.due(now=9.0)
    assert holding.release_if_empty(key, holding.generation(key))
    assert holding.settled(now=9.0)
