"""The contract every sink passes, whatever the broker behind it, as a suite a sink's author
runs against their own sink with one fixture (Watermill's pub/sub test suite is the model):

    import pytest
    from outbox_relay.testing.sink_contract import SinkBackend, SinkContract

    @pytest.fixture
    def sink_backend(tmp_path):
        yield SinkBackend(sink=MySink(...), read_back=..., broken=lambda: MySink(bad settings))

    class TestMySink(SinkContract):
        pass

`sink_backend` is a synchronous fixture yielding a `SinkBackend`: a working sink (not started),
how to read back what it delivered, how to build one whose destination is broken and, for a sink
with a server, how to take that server away and give it back (`SinkBackend.outage`). What the
suite expects of a sink beyond the common contract it reads from the sink's declaration
(`Sink.features`, see relay.interfaces.SinkFeatures). Each test runs its own event loop, so the
suite needs pytest and nothing else (`pip install 'outbox-relay[testing]'`).

A delivered message, as `read_back` returns it, is a dict with `event_id`, `aggregate_id`,
`position` (an int), `payload` (the body as parsed JSON) and `headers` (every header, the
standard ones included): `outbox_relay.testing.as_line(headers, body)` builds one. `read_back`
is also called between a `publish` that returned and `close`: it returns every message the
broker acknowledged by then (None means durably taken, not taken once the sink flushes).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import pytest

from outbox_relay.config import PipelineConfig
from outbox_relay.events import OutboxEvent, PublishResult
from outbox_relay.interfaces import Sink, SinkFeatures
from outbox_relay.testing.events import make_events, positional_event_id
from outbox_relay.testing.sink_outage import (
    CALL_FAILURES,
    Lines,
    Outage,
    first_deliveries,
    raised_bugs,
    relay_through_an_outage,
)

__all__ = ["CALL_FAILURES", "Lines", "Outage", "SinkBackend", "SinkContract"]

T = TypeVar("T")


@dataclass
class SinkBackend:
    """What the suite needs of one sink (the value of the `sink_backend` fixture)."""

    sink: Sink
    read_back: Callable[[], Lines]
    broken: Callable[[], Sink]
    #: How to take the broker away and give it back; None only for a sink without a server.
    outage: Callable[[], AbstractContextManager[Outage]] | None = None
    #: The features to hold the sink to; None (the rule): what the sink itself declares.
    features: SinkFeatures | None = None
    #: Seconds a `publish` or `close` may take against a working broker before the suite fails
    #: it as hung (the contract bounds every call by the sink's own timeouts).
    call_bound: float = 60.0
    #: Makes one of the suite's events one that this sink's broker refuses for the event's own
    #: fault (too large for it, say); None: the suite has no such event and skips that test.
    refused: Callable[[OutboxEvent], OutboxEvent] | None = None

    @property
    def declared(self) -> SinkFeatures:
        return self.sink.features if self.features is None else self.features


#: An integer no float holds exactly: a body whose numbers passed through a float loses digits.
BIG = 12345678901234567890123


def events(count: int, aggregates: int, start: int = 1) -> list[OutboxEvent]:
    """The suite's events: ids that name their position, a fixed creation time, a body that is
    not ASCII and holds an integer no float can."""
    made = make_events(count, aggregates, start, event_id=positional_event_id, epoch=1_700_000_000.0)
    return [
        replace(event, payload=b'{"seq": %d, "big": %d, "text": "caf\xc3\xa9"}' % (event.position, BIG))
        for event in made
    ]


def run(test: Coroutine[Any, Any, T]) -> T:
    """Run one test's coroutine in an event loop of its own."""
    return asyncio.run(test)


def positions_by_aggregate(lines: Lines) -> dict[str, list[int]]:
    per_aggregate: dict[str, list[int]] = {}
    for line in lines:
        per_aggregate.setdefault(line["aggregate_id"], []).append(line["position"])
    return per_aggregate


def assert_in_order_per_aggregate(lines: Lines) -> None:
    for aggregate, positions in positions_by_aggregate(lines).items():
        assert positions == sorted(positions), f"{aggregate} delivered out of order: {positions}"


def assert_each_delivered_once(lines: Lines, given: list[OutboxEvent]) -> None:
    delivered = sorted(line["event_id"] for line in lines)
    assert delivered == sorted(event.event_id for event in given), "lost or repeated events"


def assert_delivered_as_given(line: dict[str, Any], event: OutboxEvent) -> None:
    assert line["payload"] == {"seq": event.position, "big": BIG, "text": "café"}, "body changed"
    headers = line["headers"]
    assert headers["traceparent"] == event.headers["traceparent"]
    assert headers["correlation_id"] == "c-1"
    assert headers["event_id"] == event.event_id
    assert headers["event_type"] == "OrderUpdated"
    assert headers["aggregate_type"] == "order"
    assert headers["aggregate_id"] == event.aggregate_id
    assert headers["position"] == str(event.position)
    assert headers["created_at"].startswith("2023-11-14T22:")


async def within(bound: float, call: Coroutine[Any, Any, T], what: str) -> T:
    """`call`'s result; fails the test (instead of hanging it) when it takes over `bound` seconds."""
    try:
        return await asyncio.wait_for(call, bound)
    except TimeoutError:
        pytest.fail(f"{what} did not return within {bound:g}s from a working broker")


async def publish_all(backend: SinkBackend, calls: list[list[OutboxEvent]]) -> None:
    """Start the sink, publish each call (every event must be acknowledged), close it."""
    sink = backend.sink
    await sink.start()
    for call in calls:
        results = await within(backend.call_bound, sink.publish(call), "publish")
        assert results == [None] * len(call)
    await within(backend.call_bound, sink.close(), "close")


class SinkContract:
    """The tests; a subclass named Test... runs them against the `sink_backend` fixture."""

    def test_every_event_is_delivered_with_body_and_all_headers(self, sink_backend: SinkBackend) -> None:
        given = events(50, aggregates=5)
        run(publish_all(sink_backend, [given]))
        delivered = {line["event_id"]: line for line in sink_backend.read_back()}
        assert set(delivered) == {event.event_id for event in given}
        for event in given:
            assert_delivered_as_given(delivered[event.event_id], event)

    def test_events_of_one_aggregate_arrive_in_publish_order_across_calls(
        self, sink_backend: SinkBackend
    ) -> None:
        # The pipeline hands one event per aggregate per call; successive calls follow source order.
        calls = [events(40, aggregates=40, start=start) for start in range(1, 400, 40)]
        run(publish_all(sink_backend, calls))
        delivered = sink_backend.read_back()
        assert len(delivered) == 400
        assert_in_order_per_aggregate(delivered)

    def test_an_order_keeping_sink_stores_runs_of_one_aggregate_in_one_call_in_order(
        self, sink_backend: SinkBackend
    ) -> None:
        if not sink_backend.declared.keeps_order:
            pytest.skip("declares no keeps_order: gets at most one event per aggregate per call")
        # What the pipeline hands such a sink: each aggregate's events as a run, in source order.
        # Runs of 57 or 58: no common chunk size (10, 50, 100 ...) falls between two aggregates,
        # so a sink sending a call's chunks at once interleaves a run.
        runs = sorted(events(400, aggregates=7), key=lambda e: (e.aggregate_id or "", e.position))
        run(publish_all(sink_backend, [runs[:200], runs[200:]]))
        delivered = sink_backend.read_back()
        assert len(delivered) == 400
        assert_in_order_per_aggregate(delivered)

    def test_a_resent_event_is_stored_again_unless_the_sink_dedupes_by_id(
        self, sink_backend: SinkBackend
    ) -> None:
        """A re-send (after a crash, or a lost acknowledgement) is acknowledged again; the
        broker keeps it once when the sink declares `dedupes_by_id`, else once per send."""
        given = events(10, aggregates=10)
        run(publish_all(sink_backend, [given, given]))
        copies = 1 if sink_backend.declared.dedupes_by_id else 2
        delivered = sorted(line["event_id"] for line in sink_backend.read_back())
        assert delivered == sorted(event.event_id for event in given * copies)

    def test_a_broken_destination_never_reports_an_acknowledgement(self, sink_backend: SinkBackend) -> None:
        """Either the call fails as a whole (start or publish raises a connector's error, so the
        pipeline retries every event) or every result is a Failure."""
        run(_publish_to_a_broken_destination(sink_backend.broken(), events(10, aggregates=3)))

    def test_an_acknowledged_event_is_stored_when_publish_returns(self, sink_backend: SinkBackend) -> None:
        """None means the broker has the event now, not once the sink flushes a buffer of its
        own: read back before `close`, everything acknowledged is there."""
        given = events(20, aggregates=20)
        run(_publish_and_read_back_before_close(sink_backend, given))

    def test_concurrent_calls_each_deliver_their_own_events_once(self, sink_backend: SinkBackend) -> None:
        """The pipeline makes several calls at once (their aggregates apart); what one call does
        to the connection it shares must not lose, repeat or hold another's events."""
        given = events(100, aggregates=100)
        calls = [given[start : start + 25] for start in range(0, 100, 25)]
        run(_publish_at_once(sink_backend, calls))
        assert_each_delivered_once(sink_backend.read_back(), given)

    def test_a_call_as_large_as_the_pipeline_makes_is_delivered_whole(
        self, sink_backend: SinkBackend
    ) -> None:
        """A call holds up to `publish_batch_size` events (1000 by default): a sink whose broker
        takes fewer per request sends them in several, and acknowledges only what it sent."""
        size = PipelineConfig().publish_batch_size
        given = events(size, aggregates=size)
        run(publish_all(sink_backend, [given]))
        assert_each_delivered_once(sink_backend.read_back(), given)

    def test_an_event_the_broker_refuses_gets_a_failure_that_is_not_transient(
        self, sink_backend: SinkBackend
    ) -> None:
        """A refusal is the broker's answer about one event: not `transient` (the broker as a
        whole did not answer), so the relay stays ready and the event is dead-lettered in time
        instead of being retried as an outage."""
        if sink_backend.refused is None:
            pytest.skip("no event the broker refuses (SinkBackend.refused)")
        given = events(5, aggregates=5)
        given[2] = sink_backend.refused(given[2])
        results = run(_publish_once(sink_backend, given))
        assert len(results) == len(given), "one result per event"
        assert results[2] is not None, "acknowledged, yet the broker refuses it"
        assert not results[2].transient, "a refusal reported as the broker not answering"

    def test_close_flushes_everything_that_was_acknowledged(self, sink_backend: SinkBackend) -> None:
        acknowledged = run(_acknowledged_ids(sink_backend))
        assert len(acknowledged) == 300, "a working broker acknowledges every event"
        delivered = {line["event_id"] for line in sink_backend.read_back()}
        assert sorted(acknowledged - delivered) == [], "acknowledged but not delivered"

    @pytest.mark.parametrize("how", ["refused", "silent"])
    def test_while_the_broker_is_away_and_events_wait_the_relay_is_not_ready_and_recovers_once_it_is_back(
        self, sink_backend: SinkBackend, how: str
    ) -> None:
        """Readiness and `outbox_relay_up{component="sink"}` follow what the broker did: down while
        it refuses connections (or accepts them and never answers) and events wait, up again once
        it is back, with every event delivered and in order per aggregate. An event sent while
        the broker was away may be stored twice (its request arrived, its acknowledgement did not:
        at-least-once), unless the sink declares `dedupes_by_id`; no other is."""
        if sink_backend.outage is None:
            pytest.skip("no server to take away")
        with sink_backend.outage() as outage:
            bugs = raised_bugs(outage.sink)
            before, during = events(10, aggregates=5), events(20, aggregates=5, start=11)
            run(relay_through_an_outage(outage, how, before, during))
            delivered = outage.read_back()
        assert bugs == [], f"publish raised {bugs[:1]!r}: not a connector's error, a bug in the sink"
        counts = Counter(line["event_id"] for line in delivered)
        assert set(counts) == {event.event_id for event in before + during}, "lost events"
        may_repeat = set() if sink_backend.declared.dedupes_by_id else {e.event_id for e in during}
        assert {i for i, n in counts.items() if n > 1} <= may_repeat, "repeated events"
        assert_in_order_per_aggregate(first_deliveries(delivered))


async def _publish_to_a_broken_destination(sink: Sink, given: list[OutboxEvent]) -> None:
    try:
        await sink.start()
        results = await sink.publish(given)
    except CALL_FAILURES:
        return  # the whole call failed: the pipeline retries every event of it
    finally:
        with suppress(*CALL_FAILURES):  # (closing a broken destination may fail the same way)
            await sink.close()
    assert len(results) == len(given), "one result per event"
    assert all(result is not None for result in results), "an event was acked that was never delivered"


async def _publish_and_read_back_before_close(backend: SinkBackend, given: list[OutboxEvent]) -> None:
    sink = backend.sink
    await sink.start()
    try:
        results = await within(backend.call_bound, sink.publish(given), "publish")
        assert results == [None] * len(given), "a working broker acknowledges every event"
        delivered = {line["event_id"] for line in backend.read_back()}
        missing = sorted({event.event_id for event in given} - delivered)
        assert missing == [], "acknowledged, yet not at the broker before close"
    finally:
        await within(backend.call_bound, sink.close(), "close")


async def _publish_once(backend: SinkBackend, given: list[OutboxEvent]) -> list[PublishResult]:
    await backend.sink.start()
    try:
        return await within(backend.call_bound, backend.sink.publish(given), "publish")
    finally:
        await within(backend.call_bound, backend.sink.close(), "close")


async def _publish_at_once(backend: SinkBackend, calls: list[list[OutboxEvent]]) -> None:
    """Start the sink, make the calls concurrently (every event must be acknowledged), close."""
    sink = backend.sink
    await sink.start()
    made = [within(backend.call_bound, sink.publish(call), "publish") for call in calls]
    for call, results in zip(calls, await asyncio.gather(*made), strict=True):
        assert results == [None] * len(call), "a working broker acknowledges every event"
    await within(backend.call_bound, sink.close(), "close")


async def _acknowledged_ids(backend: SinkBackend) -> set[str]:
    """Publish 300 events in three calls, close; the ids of those the sink acknowledged."""
    sink = backend.sink
    acknowledged: set[str] = set()
    await sink.start()
    for start in (1, 101, 201):
        given = events(100, aggregates=100, start=start)
        results = await within(backend.call_bound, sink.publish(given), "publish")
        assert len(results) == len(given), "one result per event"
        acknowledged.update(
            event.event_id for event, result in zip(given, results, strict=True) if not result
        )
    await within(backend.call_bound, sink.close(), "close")
    return acknowledged
