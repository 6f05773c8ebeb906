"""Per-aggregate lanes: the ordering rule of the pipeline, as pure logic.

An event is handed out only when it is the head of its lane (every earlier event of its aggregate
was acknowledged) and its lane is neither busy (head being published) nor waiting for a retry.
Lanes of other aggregates are independent, so one failing aggregate never holds back the rest.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Iterable

from relay.events import OutboxEvent


class _Lane:
    __slots__ = ("busy", "events", "retry_at")

    def __init__(self) -> None:
        self.events: deque[OutboxEvent] = deque()
        self.busy = False
        self.retry_at = 0.0


class Lanes:
    """Holds fetched events until they are acknowledged, one FIFO lane per aggregate.

    Lanes become ready in the order their head events arrived, which keeps the overall publish
    order close to source order.
    """

    def __init__(self) -> None:
        self._lanes: dict[Hashable, _Lane] = {}
        self._ready: deque[Hashable] = deque()
        self._waiting: list[tuple[float, int, Hashable]] = []  # (retry_at, tiebreak, key) heap
        self._tiebreak = 0
        self._count = 0

    def __len__(self) -> int:
        """Events held, including those being published or waiting for a retry."""
        return self._count

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
            self._count += 1

    def take(self, limit: int, now: float) -> list[OutboxEvent]:
        """Heads of up to `limit` ready lanes; those lanes are busy until `succeeded`/`failed`."""
        self._release_due(now)
        batch: list[OutboxEvent] = []
        ready, lanes = self._ready, self._lanes
        while ready and len(batch) < limit:
            lane = lanes[ready.popleft()]
            lane.busy = True
            batch.append(lane.events[0])
        return batch

    def succeeded(self, event: OutboxEvent) -> None:
        """The head was acknowledged: drop it; the lane's next event becomes ready."""
        key = event.lane_key
        lane = self._lanes[key]
        head = lane.events.popleft()
        assert head is event, "only a lane's head can be acknowledged"
        self._count -= 1
        lane.busy = False
        if lane.events:
            self._ready.append(key)
        else:
            del self._lanes[key]

    def failed(self, event: OutboxEvent, retry_at: float) -> None:
        """The head failed: the lane waits until `retry_at`, then offers the same event again."""
        key = event.lane_key
        lane = self._lanes[key]
        assert lane.events[0] is event, "only a lane's head can fail"
        lane.busy = False
        lane.retry_at = retry_at
        self._tiebreak += 1
        heapq.heappush(self._waiting, (retry_at, self._tiebreak, key))

    def next_retry_at(self) -> float | None:
        return self._waiting[0][0] if self._waiting else None

    def has_ready(self, now: float) -> bool:
        self._release_due(now)
        return bool(self._ready)

    def _release_due(self, now: float) -> None:
        waiting = self._waiting
        while waiting and waiting[0][0] <= now:
            _, _, key = heapq.heappop(waiting)
            self._ready.append(key)
