"""An in-memory broker, sink and source (as Dramatiq's StubBroker is for Dramatiq): a pipeline
runs on them without a database or a server, so tests can drive the ordering and retry rules
through every fault a real broker or database shows (see relay.testing.faults).

- `MemoryBroker` stores messages in arrival order; `refuse()`, `silence()` and `restore()` take
  it away and give it back, as an outage does.
- `MemorySink` publishes to a broker through a fault plan and records every call.
- `MemorySource` is an outbox in memory: `add` writes events as an application would; what is
  acknowledged leaves it; `reopen()` is the source of a restarted relay.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from outbox_relay.events import LEASE_ENDED, Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import BacklogStats, ConnectorError, Sink, SinkFeatures, Source
from outbox_relay.testing.events import as_line
from outbox_relay.testing.faults import NO_FAULTS, CallFault, FaultPlan

#: The result of an event an order-keeping sink did not send, behind a failed one of its aggregate.
NOT_SENT = Failure("not sent: an earlier event of its aggregate failed in this call", transient=True)
#: The result of an event when the broker did not answer the call in time.
TIMED_OUT = Failure("no acknowledgement in time", transient=True)


@dataclass(frozen=True, slots=True)
class Message:
    """One message as the broker stored it."""

    event_id: str
    aggregate_type: str
    aggregate_id: str | None
    position: int
    headers: dict[str, str]
    payload: bytes

    @property
    def lane_key(self) -> tuple[str, str | None]:
        return (self.aggregate_type, self.aggregate_id)


class BrokerState(Enum):
    UP = "up"
    #: Connections refused: every call raises ConnectorError at once.
    REFUSING = "refusing"
    #: Connections accepted, never answered: every call waits for the sink's timeout.
    SILENT = "silent"


class MemoryBroker:
    """Messages in the order the broker stored them, repeats included (unless deduplicating)."""

    def __init__(self, *, dedupes_by_id: bool = False) -> None:
        self.messages: list[Message] = []
        self.state = BrokerState.UP
        self._dedupes_by_id = dedupes_by_id
        self._stored_ids: set[str] = set()

    def store(self, event: OutboxEvent) -> None:
        if self._dedupes_by_id and event.event_id in self._stored_ids:
            return
        self._stored_ids.add(event.event_id)
        self.messages.append(
            Message(
                event.event_id,
                event.aggregate_type,
                event.aggregate_id,
                event.position,
                event.standard_headers(),
                bytes(event.payload),
            )
        )

    def has(self, event_id: str) -> bool:
        return event_id in self._stored_ids

    def deliveries(self) -> Counter[str]:
        """How many times each event id was stored."""
        return Counter(message.event_id for message in self.messages)

    def lines(self) -> list[dict[str, Any]]:
        """The messages in the shape the contract suite reads back (see `as_line`)."""
        return [as_line(message.headers, message.payload) for message in self.messages]

    def refuse(self) -> None:
        self.state = BrokerState.REFUSING

    def silence(self) -> None:
        self.state = BrokerState.SILENT

    def restore(self) -> None:
        self.state = BrokerState.UP


@dataclass(frozen=True, slots=True)
class SinkCall:
    """One publish call as the sink saw it: what it was given, what it stored (event ids, in the
    order stored) and what it returned (empty when the call raised)."""

    events: tuple[OutboxEvent, ...]
    stored: tuple[str, ...]
    results: tuple[PublishResult, ...]

    @property
    def raised(self) -> bool:
        return len(self.results) != len(self.events)


@dataclass(eq=False)
class MemorySink(Sink):
    """A sink in front of a `MemoryBroker`, keeping the sink contract (relay.interfaces.Sink):
    one result per event; None only for a stored event; an order-keeping sink sends nothing of
    an aggregate after one of its events failed in the call; a silent broker costs `timeout`
    seconds, then transient failures; nothing is sent once `may_send()` is false."""

    broker: MemoryBroker = field(default_factory=MemoryBroker)
    features: SinkFeatures = field(default_factory=SinkFeatures)
    faults: FaultPlan = NO_FAULTS
    #: How long the sink waits for a broker that does not answer.
    timeout: float = 0.05
    kind: str = "memory"
    #: Every call, in the order made.
    calls: list[SinkCall] = field(default_factory=list, init=False)
    #: Aggregates handed to this sink while an earlier call holding events of theirs was still
    #: running: the pipeline broke the contract (no two concurrent calls hold one aggregate).
    overlapping: list[tuple[str, str | None]] = field(default_factory=list, init=False)
    _in_flight: Counter[tuple[str, str | None]] = field(default_factory=Counter, init=False, repr=False)
    #: How many times each event was sent (its attempts).
    _sends: Counter[str] = field(default_factory=Counter, init=False, repr=False)

    async def start(self) -> None:
        await self._connect()

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        keys = {event.lane_key for event in events}
        self.overlapping += [key for key in keys if self._in_flight[key]]
        self._in_flight.update(keys)
        try:
            return await self._publish(tuple(events))
        finally:
            self._in_flight.subtract(keys)

    async def _publish(self, given: tuple[OutboxEvent, ...]) -> list[PublishResult]:
        attempt = self._sends[given[0].event_id] + 1 if given else 0
        fault = self.faults.for_call(given, attempt)
        if fault is CallFault.RAISE or self.broker.state is BrokerState.REFUSING:
            self._count_sends(given)  # (an attempt, though nothing reached the broker)
            self.calls.append(SinkCall(given, (), ()))
            raise ConnectorError("the in-memory broker cannot be reached")
        if fault is CallFault.HANG or self.broker.state is BrokerState.SILENT:
            await asyncio.sleep(self.timeout)
            self._count_sends(given)
            results: list[PublishResult] = [TIMED_OUT] * len(given)
            self.calls.append(SinkCall(given, (), tuple(results)))
            return results
        results, stored = self._send(given, reorder=fault is CallFault.REORDER)
        self.calls.append(SinkCall(given, tuple(stored), tuple(results)))
        return results

    async def _connect(self) -> None:
        """What `start` finds: a refusing broker fails at once, a silent one after `timeout`."""
        if self.broker.state is BrokerState.REFUSING:
            raise ConnectorError("the in-memory broker refuses connections")
        if self.broker.state is BrokerState.SILENT:
            await asyncio.sleep(self.timeout)
            raise ConnectorError("the in-memory broker does not answer")

    def _count_sends(self, events: Sequence[OutboxEvent]) -> None:
        self._sends.update(event.event_id for event in events)

    def _send(
        self, events: tuple[OutboxEvent, ...], *, reorder: bool
    ) -> tuple[list[PublishResult], list[str]]:
        """Each event through its fault, in the order the broker completes them."""
        results: list[PublishResult] = [None] * len(events)
        stored: list[str] = []
        stopped: set[tuple[str, str | None]] = set()
        for index in _completion_order(events) if reorder else range(len(events)):
            event = events[index]
            self._sends[event.event_id] += 1
            if not self.may_send():
                results[index] = LEASE_ENDED
                continue
            if self.keeps_order and event.lane_key in stopped:
                results[index] = NOT_SENT
                continue
            fault = self.faults.for_event(event, self._sends[event.event_id])
            if fault is None or fault.stores:
                self.broker.store(event)
                stored.append(event.event_id)
            if fault is not None:
                results[index] = fault.failure()
                if not fault.stores:
                    stopped.add(event.lane_key)
        return results, stored


def _completion_order(events: Sequence[OutboxEvent]) -> list[int]:
    """Indexes of `events`, aggregate by aggregate from the last to appear to the first, each
    aggregate's own events in their order (see CallFault.REORDER)."""
    by_aggregate: dict[tuple[str, str | None], list[int]] = {}
    for index, event in enumerate(events):
        by_aggregate.setdefault(event.lane_key, []).append(index)
    return [index for indexes in reversed(by_aggregate.values()) for index in indexes]


@dataclass(frozen=True)
class SourceFaults:
    """Which calls of a source fail (1-based numbers of its `fetch` and `ack` calls): a failing
    fetch returns nothing and raises; a failing ack records nothing and raises."""

    fetches: frozenset[int] = frozenset()
    acks: frozenset[int] = frozenset()


def _as_read(event: OutboxEvent) -> OutboxEvent:
    """The event as read from the table again: what the pipeline noted on it left behind."""
    return replace(event, attempts=0, rejections=0, first_failed_at=None, failed_amid_successes=False)


class _Outbox:
    """The table the sources of one outbox share: events in position order, and the acknowledged."""

    def __init__(self) -> None:
        self.events: list[OutboxEvent] = []
        self.acked: list[OutboxEvent] = []
        self.acked_ids: set[str] = set()
        self.arrived = asyncio.Event()


class MemorySource(Source):
    """An outbox in memory, keeping the source contract (relay.interfaces.Source): `fetch` hands
    out each unacknowledged event once per instance, in order; `ack` is durable when it
    returns. With a `broker`, every acknowledged event that broker had not stored yet is noted
    in `premature_acks` (promise 4: marked only after the broker said yes)."""

    kind = "memory"

    def __init__(
        self, *, faults: SourceFaults = SourceFaults(), broker: MemoryBroker | None = None, poll: float = 0.1
    ) -> None:
        self._outbox = _Outbox()
        self._handed = 0
        self._faults = faults
        self._broker = broker
        self._poll = poll
        self._fetches = self._acks = 0
        #: Whether events are handed out as fresh copies (a restarted relay reads them anew from
        #: the table, with none of the first relay's attempts on them), not as the objects added.
        self._reads_anew = False
        self.premature_acks: list[OutboxEvent] = []

    def reopen(self) -> MemorySource:
        """The source of a relay started anew on the same outbox: it hands out again whatever was
        not acknowledged (at-least-once across restarts)."""
        again = MemorySource(faults=self._faults, broker=self._broker, poll=self._poll)
        again._outbox = self._outbox
        again._reads_anew = True
        return again

    def add(self, events: Sequence[OutboxEvent]) -> None:
        """Commit `events` to the outbox, after those already there (positions must grow)."""
        self._outbox.events += events
        self._outbox.arrived.set()

    @property
    def acked(self) -> list[OutboxEvent]:
        """Every acknowledged event, in the order acknowledged."""
        return self._outbox.acked

    @property
    def pending(self) -> int:
        return len(self._outbox.events) - len(self._outbox.acked_ids)

    async def start(self) -> None:
        pass

    async def fetch(self, limit: int) -> list[OutboxEvent]:
        self._fetches += 1
        if self._fetches in self._faults.fetches:
            raise ConnectorError("the in-memory outbox cannot be read")
        events: list[OutboxEvent] = []
        outbox = self._outbox.events
        while self._handed < len(outbox) and len(events) < limit:
            event = outbox[self._handed]
            self._handed += 1
            if event.event_id not in self._outbox.acked_ids:
                events.append(_as_read(event) if self._reads_anew else event)
        return events

    async def ack(self, events: Sequence[OutboxEvent]) -> None:
        self._acks += 1
        if self._acks in self._faults.acks:
            raise ConnectorError("the in-memory outbox cannot be written")
        if self._broker is not None:
            self.premature_acks += [event for event in events if not self._broker.has(event.event_id)]
        fresh = [event for event in events if event.event_id not in self._outbox.acked_ids]
        self._outbox.acked += fresh
        self._outbox.acked_ids.update(event.event_id for event in fresh)

    async def wait_for_events(self) -> None:
        arrived = self._outbox.arrived
        arrived.clear()
        if self.caught_up:
            try:
                await asyncio.wait_for(arrived.wait(), self._poll)
            except TimeoutError:
                pass

    @property
    def caught_up(self) -> bool:
        return self._handed == len(self._outbox.events)

    async def backlog(self) -> BacklogStats:
        return BacklogStats(pending=self.pending, oldest_age_seconds=0.0)
