"""Properties of the pipeline (the promises of docs/concepts/guarantees.md), checked on the
in-memory connectors under random fault schedules: no loss, order per aggregate, marked only after
the broker said yes, no more duplicates than the faults explain, and a poison event holds back
only its own aggregate. Faults are keyed by (event, attempt), so a schedule means the same whatever batches
the pipeline happens to make."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from outbox_relay.config import DeadLetterConfig, PipelineConfig, RetryConfig
from outbox_relay.deadletters import DEAD, HELD
from outbox_relay.events import OutboxEvent
from outbox_relay.interfaces import SinkFeatures
from outbox_relay.pipeline import Pipeline
from outbox_relay.testing import (
    CallFault,
    EventFault,
    MemoryBroker,
    MemoryDeadLetters,
    MemorySink,
    MemorySource,
    ScriptedFaults,
    SinkCall,
    SourceFaults,
    eventually,
    make_events,
    positional_event_id,
)

#: Faults that go away: a schedule of them lets every event through in the end.
_PASSING_FAULTS = [EventFault.TRANSIENT, EventFault.REFUSE, EventFault.LOSE_ACK]
_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Scenario:
    events: list[OutboxEvent]
    features: SinkFeatures
    faults: ScriptedFaults
    source_faults: SourceFaults
    tuning: PipelineConfig


@st.composite
def scenarios(draw: st.DrawFn, *, poison: bool = False) -> Scenario:
    count = draw(st.integers(1, 30))
    events = make_events(count, draw(st.integers(1, 5)), event_id=positional_event_id)
    ids = [event.event_id for event in events]
    attempts = st.tuples(st.sampled_from(ids), st.integers(1, 3))
    event_faults = draw(st.dictionaries(attempts, st.sampled_from(_PASSING_FAULTS), max_size=count))
    call_faults = draw(st.dictionaries(attempts, st.sampled_from(list(CallFault)), max_size=3))
    poisoned = frozenset(draw(st.lists(st.sampled_from(ids), max_size=1))) if poison else frozenset()
    return Scenario(
        events,
        draw(st.sampled_from([SinkFeatures(), SinkFeatures(keeps_order=True)])),
        ScriptedFaults(event_faults, call_faults, poisoned),
        SourceFaults(
            fetches=frozenset(draw(st.sets(st.integers(1, 4), max_size=1))), acks=_drawn_ack_faults(draw)
        ),
        PipelineConfig(
            max_in_flight=draw(st.integers(1, 40)),
            publish_batch_size=draw(st.integers(1, 8)),
            publish_concurrency=draw(st.integers(1, 3)),
            per_aggregate_in_flight=draw(st.integers(1, 4)),
        ),
    )


def _drawn_ack_faults(draw: st.DrawFn) -> frozenset[int]:
    return frozenset(draw(st.sets(st.integers(1, 4), max_size=1)))


@dataclass
class Relay:
    """One scenario's connectors and pipeline."""

    broker: MemoryBroker
    sink: MemorySink
    source: MemorySource
    pipeline: Pipeline
    store: MemoryDeadLetters


def _relay(
    scenario: Scenario,
    source: MemorySource | None = None,
    sink: MemorySink | None = None,
    *,
    dead_letters: MemoryDeadLetters | None = None,
    on_poison: Literal["dead_letter", "block"] = "dead_letter",
    name: str | None = None,
) -> Relay:
    store = MemoryDeadLetters() if dead_letters is None else dead_letters
    if sink is None:
        broker = MemoryBroker(dedupes_by_id=scenario.features.dedupes_by_id)
        sink = MemorySink(broker, scenario.features, scenario.faults, timeout=0.02)
    if source is None:
        source = MemorySource(faults=scenario.source_faults, broker=sink.broker, poll=0.01)
        source.add(scenario.events)
    pipeline = Pipeline(
        name or f"prop-{uuid.uuid4().hex[:12]}",
        source,
        sink,
        retry=RetryConfig(initial=0.001, max=0.01),
        tuning=scenario.tuning,
        dead_letter=DeadLetterConfig(on_poison=on_poison),
        dead_letters=store,
    )
    return Relay(sink.broker, sink, source, pipeline, store)


def _by_aggregate(events: list[OutboxEvent]) -> dict[tuple[str, str | None], list[OutboxEvent]]:
    lanes: dict[tuple[str, str | None], list[OutboxEvent]] = {}
    for event in events:
        lanes.setdefault(event.lane_key, []).append(event)
    return lanes


def assert_order_per_aggregate(broker: MemoryBroker) -> None:
    """Per aggregate, the broker holds positions in order; a repeat only right after itself
    (a re-send of an event whose acknowledgement was lost), never after a later event."""
    lanes: dict[tuple[str, str | None], list[int]] = {}
    for message in broker.messages:
        lanes.setdefault(message.lane_key, []).append(message.position)
    for key, positions in lanes.items():
        assert positions == sorted(positions), f"aggregate {key} reached the broker as {positions}"


def assert_first_deliveries_in_order(broker: MemoryBroker) -> None:
    """Per aggregate, the first copies of events reach the broker in position order (what a
    consumer that drops repeats by event_id sees)."""
    seen: set[str] = set()
    lanes: dict[tuple[str, str | None], list[int]] = {}
    for message in broker.messages:
        if message.event_id not in seen:
            seen.add(message.event_id)
            lanes.setdefault(message.lane_key, []).append(message.position)
    for key, positions in lanes.items():
        assert positions == sorted(positions), f"aggregate {key} first reached the broker as {positions}"


def _stored_unsettled(relay: Relay) -> int:
    """Copies on the broker the pipeline could not count as acknowledged, so it sends them
    again: an event whose acknowledgement the sink reported lost, and one stored behind an
    earlier event of its aggregate that failed in the same call (sent again after it)."""
    return sum(len(set(call.stored)) - len(_settled_stores(call)) for call in relay.sink.calls)


def _settled_stores(call: SinkCall) -> list[str]:
    """The events of a call the broker stored and the pipeline may count as acknowledged: the
    result is None and no earlier event of the same aggregate failed in the call (those are
    sent again after it, whatever their results: the Sink contract)."""
    stored, failed_lanes, settled = set(call.stored), set(), []
    for event, result in zip(call.events, call.results, strict=False):
        if result is not None:
            failed_lanes.add(event.lane_key)
        elif event.lane_key not in failed_lanes and event.event_id in stored:
            settled.append(event.event_id)
    return settled


def assert_duplicates_explained(relay: Relay) -> None:
    """Every event was stored with an acknowledgement the pipeline could count at most once:
    each further copy on the broker is one whose acknowledgement the sink reported lost, or one
    sent again behind an earlier event of its aggregate that failed in the same call."""
    settled = Counter(event_id for call in relay.sink.calls for event_id in _settled_stores(call))
    assert max(settled.values(), default=0) <= 1, "an acknowledged event was sent again"


def assert_the_contract_with_the_sink_kept(relay: Relay) -> None:
    """No two calls at once hold one aggregate; a sink that keeps no order gets at most one
    event per aggregate per call; nothing is acknowledged to the source before the broker has
    it, except what was parked in the dead-letter store."""
    assert relay.sink.overlapping == [], "two calls at once held events of one aggregate"
    if not relay.sink.keeps_order:
        for call in relay.sink.calls:
            keys = [event.lane_key for event in call.events]
            assert len(keys) == len(set(keys)), "a call held two events of one aggregate"
    premature = {event.event_id for event in relay.source.premature_acks}
    assert premature <= relay.store.ever_parked, (
        "acknowledged to the source before the broker (or the store) had it"
    )


async def _drain(relay: Relay) -> None:
    await asyncio.wait_for(relay.pipeline.run(asyncio.Event(), drain=True), 20)


@_SETTINGS
@given(scenarios())
def test_every_event_reaches_the_broker_in_order_per_aggregate_whatever_the_faults(
    scenario: Scenario,
) -> None:
    relay = _relay(scenario)
    asyncio.run(_drain(relay))
    assert relay.source.pending == 0, "events left unacknowledged"
    assert _delivered_or_held(relay) == {event.event_id for event in scenario.events}, "an event was lost"
    # (An order-keeping sink gets runs of an aggregate per call: a run is sent again after a lost
    # acknowledgement of its first event, so only first copies are ordered.)
    assert_first_deliveries_in_order(relay.broker)
    assert_duplicates_explained(relay)
    assert_the_contract_with_the_sink_kept(relay)


def _delivered_or_held(relay: Relay) -> set[str]:
    """What the broker has, and what waits in the store held (a drain ends once the outbox is
    empty: an aggregate held while it kept failing waits in the store for the next run)."""
    held = {row.event_id for row in relay.store.in_state(relay.pipeline.name, HELD)}
    return set(relay.broker.deliveries()) | held


def _acked_ids(relay: Relay) -> set[str]:
    return {event.event_id for event in relay.source.acked}


async def _until(relay: Relay, condition: Callable[[], bool], what: str) -> None:
    """Run the pipeline until `condition` holds (and a moment more, room to do wrong), then stop it."""
    stop = asyncio.Event()
    running = asyncio.create_task(relay.pipeline.run(stop))
    try:
        await eventually(condition, 5, what)
        await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)


#: The poison event alone fills an in-flight window of 1: the next event (another aggregate) is
#: fetched only once the poison is out of the window, in the store. (Held in memory, without a
#: store, it stopped every aggregate: the pipeline has a store always since.)
_WINDOW_FILLED_BY_THE_POISON = Scenario(
    make_events(2, 2, event_id=positional_event_id),
    SinkFeatures(),
    ScriptedFaults(poison=frozenset({positional_event_id(1)})),
    SourceFaults(),
    PipelineConfig(max_in_flight=1, publish_batch_size=1, publish_concurrency=1, per_aggregate_in_flight=1),
)


def _held_back(scenario: Scenario) -> set[str]:
    """The poison events and those behind them in their aggregates."""
    poisoned = {e.lane_key: e.position for e in scenario.events if e.event_id in scenario.faults.poison}
    return {e.event_id for e in scenario.events if e.position >= poisoned.get(e.lane_key, e.position + 1)}


@_SETTINGS
@given(scenarios(poison=True))
@example(_WINDOW_FILLED_BY_THE_POISON)
def test_with_a_dead_letter_store_a_poison_event_is_parked_and_its_aggregate_moves_on(
    scenario: Scenario,
) -> None:
    """Aggregates whose first event keeps failing may be held in the store on the way (while
    they fill the in-flight window); in the end every event but the poison is delivered."""
    store = MemoryDeadLetters()
    relay = _relay(scenario, dead_letters=store)
    deliverable = {event.event_id for event in scenario.events} - scenario.faults.poison
    asyncio.run(
        _until(
            relay,
            lambda: relay.source.pending == 0 and set(relay.broker.deliveries()) == deliverable,
            "every event acknowledged, and all but the poison delivered",
        )
    )
    assert {row.event_id for row in store.in_state(relay.pipeline.name, DEAD)} == scenario.faults.poison
    assert store.in_state(relay.pipeline.name, HELD) == []
    # (With a store, an order-keeping sink gets runs of an aggregate per call: a run is sent
    # again after a lost acknowledgement of its first event, so only first copies are ordered.)
    assert_first_deliveries_in_order(relay.broker)
    assert_duplicates_explained(relay)
    assert_the_contract_with_the_sink_kept(relay)


@_SETTINGS
@given(scenarios(poison=True))
@example(_WINDOW_FILLED_BY_THE_POISON)
def test_with_on_poison_block_the_poisoned_aggregate_waits_in_the_store_and_the_rest_flows(
    scenario: Scenario,
) -> None:
    held_back = _held_back(scenario)
    flowing = {event.event_id for event in scenario.events} - held_back
    store = MemoryDeadLetters()
    relay = _relay(scenario, dead_letters=store, on_poison="block")
    asyncio.run(
        _until(
            relay,
            lambda: flowing | held_back <= _acked_ids(relay) and flowing <= set(relay.broker.deliveries()),
            "every event acknowledged, and all not behind the poison delivered",
        )
    )
    assert {row.event_id for row in store.in_state(relay.pipeline.name, HELD)} == held_back
    assert set(relay.broker.deliveries()) == flowing, "a held-back event was sent, or a flowing one lost"
    assert_order_per_aggregate(relay.broker)
    assert_duplicates_explained(relay)
    assert_the_contract_with_the_sink_kept(relay)


async def _abandon_then_restart(first: Relay, second: Relay, after_acks: int) -> None:
    abandon, stop = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(first.pipeline.run(stop, abandon=abandon))
    wanted = min(after_acks, len(first.source.acked) + first.source.pending)
    await eventually(lambda: len(first.source.acked) >= wanted, 20, f"{wanted} events acknowledged")
    abandon.set()
    await asyncio.wait_for(running, 20)
    await _drain(second)


@_SETTINGS
@given(scenarios(), st.integers(0, 30))
def test_a_relay_cut_short_and_restarted_loses_nothing_and_repeats_at_most_its_in_flight_window(
    scenario: Scenario, after_acks: int
) -> None:
    first = _relay(scenario)
    # The store outlives a relay, as the database table does: what the first held, the second releases.
    second = _relay(
        scenario,
        source=first.source.reopen(),
        sink=MemorySink(first.broker, scenario.features),
        dead_letters=first.store,
        name=first.pipeline.name,
    )
    asyncio.run(_abandon_then_restart(first, second, after_acks))
    assert second.source.pending == 0
    deliveries = first.broker.deliveries()
    assert _delivered_or_held(second) == {event.event_id for event in scenario.events}, "an event was lost"
    # Repeats beyond those of failed calls the broker took: what the first relay had in flight
    # when cut.
    repeats = sum(deliveries.values()) - len(deliveries)
    assert repeats <= _stored_unsettled(first) + _stored_unsettled(second) + scenario.tuning.max_in_flight
    assert_first_deliveries_in_order(first.broker)
    assert_the_contract_with_the_sink_kept(first)
    assert_the_contract_with_the_sink_kept(second)
