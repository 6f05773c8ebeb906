"""What the pipeline's tasks share: the in-flight window, the queues between them and the events
that wake them, plus the small waiting helpers they use.

In-flight state is kept here once: `InFlight.count` is every event fetched and not yet
acknowledged to the source, wherever it is (in a lane, out to the sink, on its way to the
dead-letter store or to the ack). The lanes and the held aggregates keep where events are, not
how many.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from outbox_relay.events import OutboxEvent


class ParkRequest(NamedTuple):
    """An event on its way to the dead-letter store, why, and as what (`dead` or `held`)."""

    event: OutboxEvent
    reason: str
    permanent: bool
    state: str


class InFlight:
    """The in-flight window: events fetched and not yet acknowledged to the source, at most
    `limit` (memory and what a crash would send again stay bounded, whatever the backlog)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        #: Set whenever room may have been freed: a fetch waiting for room looks again.
        self.space_freed = asyncio.Event()

    def room(self, unconfirmed: int) -> int:
        """Events that may be fetched now; `unconfirmed` is what the source still holds back
        (acknowledged, not confirmed yet)."""
        return self.limit - max(self.count, unconfirmed)

    def fetched(self, count: int) -> None:
        self.count += count

    def acknowledged(self, count: int) -> None:
        self.count -= count
        self.space_freed.set()


@dataclass
class Flow:
    """The queues between the tasks and the events that wake them."""

    window: InFlight
    parking: list[ParkRequest] = field(default_factory=list)
    acks: list[OutboxEvent] = field(default_factory=list)
    dispatch_wake: asyncio.Event = field(default_factory=asyncio.Event)
    release_wake: asyncio.Event = field(default_factory=asyncio.Event)
    park_wake: asyncio.Event = field(default_factory=asyncio.Event)
    ack_wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set once fetching ended: dispatch and release wind down.
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set once nothing more is published: what is queued for the store is the last of it.
    dispatch_done: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set once nothing more is parked: what is queued for the ack is the last of it.
    park_done: asyncio.Event = field(default_factory=asyncio.Event)

    def park(self, request: ParkRequest) -> None:
        self.parking.append(request)
        self.park_wake.set()

    def ack(self, events: list[OutboxEvent]) -> None:
        self.acks.extend(events)
        self.ack_wake.set()


async def batches(
    queue: list[Any], wake: asyncio.Event, upstream_done: asyncio.Event
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


async def wait_either(
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


async def first_of(awaitable: Awaitable[Any], stop: asyncio.Event) -> None:
    """Wait for `awaitable` or `stop`, whichever comes first; the other is cancelled."""
    main = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((main, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not main.done():
            main.cancel()
        await asyncio.gather(main, stopper, return_exceptions=True)
