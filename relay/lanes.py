"""Per-aggregate lanes: the ordering rule of the pipeline, as pure logic.

A lane hands out its first events (up to `depth` consecutive ones, in order) only when nothing of
it is out already and it is not waiting for a retry: the next events of an aggregate go out once
the previous ones were all acknowledged. Lanes of other aggregates are independent, so one
failing aggregate never holds back the rest.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Iterable
from itertools import islice

from outbox_relay.events import OutboxEvent


class _Lane:
    __slots__ = ("events", "out", "retrying")

    def __init__(self) -> None:
        self.events: deque[OutboxEvent] = deque()
        self.out = 0  # events at the front of `events` handed out and not yet settled
        # Its first event failed and is being retried: that event goes out alone, so that each
        # retry does not send the events behind it again as well.
        self.retrying = False


class Lanes:
    """Holds fetched events until they are acknowledged, one FIFO lane per aggregate.

    Lanes become ready in the order their head events arrived, which keeps the overall publish
    order close to source order.
    """

    def __init__(self) -> None:
        self._lanes: dict[Hashable, _Lane] = {}
        self._ready: deque[Hashable] = deque()
        self._waiting: list[tuple[float, int, Hashable, _Lane]] = []  # (retry_at, tiebreak, key, lane) heap
        self._tiebreak = 0

    def __len__(self) -> int:
        """Events held, including those being published or waiting for a retry. (Counted here
        on demand: the pipeline's one count of events in flight is its window, relay.flow.)"""
        return sum(len(lane.events) for lane in self._lanes.values())

    @property
    def blocked_lanes(self) -> int:
        """Lanes whose head failed and waits for a retry."""
        return len(self._waiting)

    def add(self, events: Iterable[OutboxEvent]) -> None:
        """Append events (in source order) to their lanes."""
        lanes = self._lanes
        for event in events:
            key = event.lane_key
            lane = lanes.get(key)
            if lane is None:
                lane = lanes[key] = _Lane()
                self._ready.append(key)
            lane.events.append(event)

    def take(self, limit: int, now: float, depth: int = 1) -> list[OutboxEvent]:
        """The first events, up to `depth` of each, of ready lanes, at most `limit` in all; a
        lane's events are consecutive and in order. Those lanes stay out until every event
        handed out was settled: `succeeded` (in order), or `failed`/`hold` of the first one
        not acknowledged, which takes the rest of them back."""
        self._release_due(now)
        batch: list[OutboxEvent] = []
        ready, lanes = self._ready, self._lanes
        while ready and len(batch) < limit:
            lane = lanes[ready.popleft()]
            if depth == 1 or lane.retrying:
                lane.out = 1
                batch.append(lane.events[0])
                continue
            lane.out = min(depth, len(lane.events), limit - len(batch))
            batch.extend(islice(lane.events, lane.out))
        return batch

    def succeeded(self, event: OutboxEvent) -> None:
        """The lane's first event was acknowledged: drop it. Once nothing of the lane is out, its
        next event becomes ready."""
        self.all_succeeded((event,))

    def all_succeeded(self, events: Iterable[OutboxEvent]) -> None:
        """`succeeded` of each event in turn (those a call acknowledged, in order): one call per
        settled call, not one per event."""
        lanes, ready = self._lanes, self._ready
        for event in events:
            key = event.lane_key
            lane = lanes[key]
            head = lane.events.popleft()
            assert head is event, "events of a lane are acknowledged in order"
            lane.retrying = False
            lane.out = max(lane.out - 1, 0)
            if lane.out:
                continue
            if lane.events:
                ready.append(key)
            else:
                del lanes[key]

    def failed(self, event: OutboxEvent, retry_at: float) -> None:
        """The lane's first event failed: the lane waits until `retry_at`, then offers the same
        event again, alone; the events handed out after it are taken back, whatever their own
        results were (they must not be acknowledged ahead of it), and follow once it is settled."""
        key = event.lane_key
        lane = self._lanes[key]
        assert lane.events[0] is event, "only a lane's first event can fail"
        lane.out = 0
        lane.retrying = True
        self._tiebreak += 1
        heapq.heappush(self._waiting, (retry_at, self._tiebreak, key, lane))

    def hold(self, event: OutboxEvent) -> None:
        """The lane's first event stays out on its own (it is being dead-lettered); the events
        handed out after it are taken back. `succeeded(event)` then frees the lane."""
        lane = self._lanes[event.lane_key]
        assert lane.events[0] is event, "only a lane's first event can be held"
        lane.out = 1

    def evict(self, key: Hashable) -> list[OutboxEvent]:
        """Take a whole lane out (its aggregate moves to the held store): its events in order,
        including the first one if it is out. Nothing of it is handed out afterwards; a later
        `add` of the same key starts a new lane."""
        lane = self._lanes.pop(key, None)
        if lane is None:
            return []
        if key in self._ready:
            self._ready.remove(key)
        # (Its retry, if one is scheduled, is dropped when it comes due: see `_release_due`.)
        return list(lane.events)

    def waiting_keys(self) -> list[Hashable]:
        """Lanes waiting for the retry of their first event."""
        lanes = self._lanes
        return list(dict.fromkeys(key for _, _, key, lane in self._waiting if lanes.get(key) is lane))

    def head(self, key: Hashable) -> OutboxEvent | None:
        """The first event of a lane, or None when there is no such lane."""
        lane = self._lanes.get(key)
        return lane.events[0] if lane is not None and lane.events else None

    def next_retry_at(self) -> float | None:
        return self._waiting[0][0] if self._waiting else None

    def has_ready(self, now: float) -> bool:
        self._release_due(now)
        return bool(self._ready)

    def _release_due(self, now: float) -> None:
        waiting, lanes = self._waiting, self._lanes
        while waiting and waiting[0][0] <= now:
            _, _, key, lane = heapq.heappop(waiting)
            if lanes.get(key) is lane:  # (not evicted since)
                self._ready.append(key)
