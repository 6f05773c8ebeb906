"""The exported contract suite against sinks a plugin's author could plausibly get wrong: each
flawed sink below passes every other test yet breaks the contract (relay.interfaces.Sink), and
must fail the test named for its flaw; a correct sink that re-sends must not fail."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import pytest

from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import SinkFeatures
from outbox_relay.testing import BrokerState, MemoryBroker, MemorySink, ScriptedFaults, positional_event_id
from outbox_relay.testing.memory import TIMED_OUT
from outbox_relay.testing.sink_contract import Outage, SinkBackend, SinkContract


@dataclass(eq=False)
class CoalescingSink(MemorySink):
    """A call that finds a batch request under way adds its events to it and waits for it, but
    the request carries the batch as it was when it started, and then clears all of it: events
    of overlapping calls are acknowledged and never sent."""

    _batch: list[OutboxEvent] = field(default_factory=list, init=False)
    _sending: asyncio.Future[None] | None = field(default=None, init=False)

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        self._batch += events
        if self._sending is None:
            self._sending = asyncio.ensure_future(self._send_batch(list(self._batch)))
        await asyncio.shield(self._sending)
        return [None] * len(events)

    async def _send_batch(self, batch: list[OutboxEvent]) -> None:
        await asyncio.sleep(0.01)
        self._sending = None
        for event in batch:
            self.broker.store(event)
        self._batch.clear()


@dataclass(eq=False)
class BufferingSink(MemorySink):
    """Acknowledges what it queued in a buffer of its own, and sends the buffer at close."""

    _buffer: list[OutboxEvent] = field(default_factory=list, init=False)

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        await self._connect()
        self._buffer += events
        return [None] * len(events)

    async def close(self) -> None:
        for event in self._buffer:
            self.broker.store(event)


@dataclass(eq=False)
class ChunkedSink(MemorySink):
    """Declares keeps_order, and sends a call in chunks of 100 at once, the last chunk first."""

    features: SinkFeatures = field(default_factory=lambda: SinkFeatures(keeps_order=True))

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        chunks = [events[start : start + 100] for start in range(0, len(events), 100)]
        for chunk in reversed(chunks):
            await super().publish(chunk)
        return [None] * len(events)


@dataclass(eq=False)
class CappedSink(MemorySink):
    """Its broker takes 128 events per request; it sends one request and acknowledges all."""

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        sent = await super().publish(events[:128])
        return sent + [None] * (len(events) - len(sent))


class FloatBroker(MemoryBroker):
    """Stores each body as it comes out of a JSON codec that reads every number as a float."""

    def store(self, event: OutboxEvent) -> None:
        body = json.dumps(json.loads(event.payload, parse_int=float)).encode()
        super().store(replace(event, payload=body))


@dataclass(eq=False)
class HangingSink(MemorySink):
    """Awaits, without a timeout, an answer that never comes to its second call."""

    _calls: int = field(default=0, init=False)

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        self._calls += 1
        if self._calls == 2:
            await asyncio.Event().wait()
        return await super().publish(events)


@dataclass(eq=False)
class ClosedChannelSink(MemorySink):
    """Starts properly, but lets its client library's RuntimeError out of `publish` when an open
    connection is cut, instead of a connector's error."""

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        if self.broker.state is BrokerState.REFUSING:
            raise RuntimeError("the channel is closed")
        return await super().publish(events)


@dataclass(eq=False)
class ConfirmLostSink(MemorySink):
    """Correct: when the broker goes silent the way a paused server does, a request still
    reaches it and is stored, and its confirm never comes back; the sink times out and reports
    a transient Failure, and the pipeline re-sends later: a second copy, which at-least-once
    allows (the sink does not declare `dedupes_by_id`)."""

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        if self.broker.state is not BrokerState.SILENT:
            return await super().publish(events)
        for event in events:
            self.broker.store(event)
        await asyncio.sleep(self.timeout)
        return [TIMED_OUT] * len(events)


@dataclass(eq=False)
class TooLargeIsTransientSink(MemorySink):
    """Reports its broker's "message too large" refusal, an event's own fault, as transient."""

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        results = await super().publish(events)
        too_large = Failure("message too large", transient=True)
        return [too_large if len(e.payload) > 65_536 else r for e, r in zip(events, results, strict=True)]


def _too_large(event: OutboxEvent) -> OutboxEvent:
    return replace(event, payload=b'{"pad": "%s"}' % (b"x" * 100_000))


def _backend(make: Callable[[MemoryBroker], MemorySink], broker: MemoryBroker | None = None) -> SinkBackend:
    """A backend of `make`'s sinks, each in front of a broker of its own (`broker` for the first)."""

    def unreachable() -> MemorySink:
        down = MemoryBroker()
        down.refuse()
        return make(down)

    @contextmanager
    def outage() -> Iterator[Outage]:
        away = MemoryBroker()
        yield Outage(make(away), away.lines, away.refuse, away.silence, away.restore)

    first = broker or MemoryBroker()
    return SinkBackend(make(first), first.lines, unreachable, outage, call_bound=1.0)


OUTAGE_TEST = (
    "test_while_the_broker_is_away_and_events_wait_the_relay_is_not_ready_and_recovers_once_it_is_back"
)

FLAWS = [
    (CoalescingSink, "test_concurrent_calls_each_deliver_their_own_events_once"),
    (BufferingSink, "test_an_acknowledged_event_is_stored_when_publish_returns"),
    (ChunkedSink, "test_an_order_keeping_sink_stores_runs_of_one_aggregate_in_one_call_in_order"),
    (CappedSink, "test_a_call_as_large_as_the_pipeline_makes_is_delivered_whole"),
    (HangingSink, "test_events_of_one_aggregate_arrive_in_publish_order_across_calls"),
]


@pytest.mark.parametrize(("sink", "test"), FLAWS, ids=[sink.__name__ for sink, _ in FLAWS])
def test_a_flawed_sink_fails_the_test_for_its_flaw(sink: type[MemorySink], test: str) -> None:
    backend = _backend(lambda broker: sink(broker))
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        getattr(SinkContract(), test)(backend)


def test_a_body_whose_numbers_passed_through_a_float_fails() -> None:
    backend = _backend(MemorySink, FloatBroker())
    with pytest.raises(AssertionError, match="body changed"):
        SinkContract().test_every_event_is_delivered_with_body_and_all_headers(backend)


def test_a_sink_raising_a_bug_when_its_connection_is_cut_fails() -> None:
    backend = _backend(lambda broker: ClosedChannelSink(broker))
    test = getattr(SinkContract(), OUTAGE_TEST)
    with pytest.raises(AssertionError, match="a bug in the sink"):
        test(backend, "refused")


def test_a_correct_sink_that_re_sends_what_a_silent_broker_stored_passes() -> None:
    backend = _backend(lambda broker: ConfirmLostSink(broker))
    test = getattr(SinkContract(), OUTAGE_TEST)
    test(backend, "silent")


def test_a_sink_reporting_a_refusal_as_transient_fails() -> None:
    backend = replace(_backend(lambda broker: TooLargeIsTransientSink(broker)), refused=_too_large)
    test = SinkContract().test_an_event_the_broker_refuses_gets_a_failure_that_is_not_transient
    with pytest.raises(AssertionError, match="not answering"):
        test(backend)


def test_a_sink_reporting_a_refusal_as_permanent_passes() -> None:
    poison = ScriptedFaults(poison=frozenset({positional_event_id(3)}))  # the call's third event
    backend = _backend(lambda broker: MemorySink(broker, faults=poison))
    SinkContract().test_an_event_the_broker_refuses_gets_a_failure_that_is_not_transient(
        replace(backend, refused=lambda event: event)
    )
