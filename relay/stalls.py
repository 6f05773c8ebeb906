"""Calls that do not return: what makes the relay's liveness (`/healthz`) fail, as pure logic.

A pipeline wraps each call it makes to the outside world in `CallTracker.call(stage)`: a fetch
from the source, a publish to the sink, an ack to the source, a write to or read from the
dead-letter store, the publish of a held event being released. Every one of those is bounded by
its connector's own timeout (see `Sink`), so a call still out far beyond that is hung: a
connection that vanished without a reset, a client library that lost a wake-up. Nothing else
would tell: the loop runs, /readyz may still say what the last call that returned said, and the
pipeline waits forever. Past `http.stuck_after`, /healthz says so and the pod is restarted.

What is not a stall: waiting on purpose. Sleeping before a retry, waiting for new events (NOTIFY,
WAL, the poll interval), waiting for room in the in-flight window or for a held aggregate's turn
are not calls, so they are never tracked; a relay that is idle or backing off is alive.

What is not measured here: a blocked event loop. /healthz is served by the same loop, so a loop
that is blocked (or a process that is frozen) does not answer it at all, and the probe fails by
its own timeout: that is the loop-lag check, made by the kubelet at the threshold the chart sets.
Measuring the lag in-process and failing /healthz after a long block would restart a relay whose
loop is running again: the restart cures nothing by then and costs a failover.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Stall:
    """A call out for longer than the threshold: its stage, for how long, and whether this is
    the first time it is reported (to log it once, not at every probe)."""

    stage: str
    seconds: float
    first: bool


class _Call:
    __slots__ = ("reported", "stage", "started")

    def __init__(self, stage: str, started: float) -> None:
        self.stage = stage
        self.started = started
        self.reported = False


class CallTracker:
    """The calls a pipeline has out now, each with its stage and when it began.

    Invariant: the calls are kept in the order they began (dict insertion order, with a clock
    that never goes back), so the oldest is always the first: `oldest` costs nothing, however
    many publishes are out at once.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count()

    def __len__(self) -> int:
        """Calls out now."""
        return len(self._calls)

    @contextmanager
    def call(self, stage: str) -> Iterator[None]:
        """Track the call made inside the block as `stage`, until the block exits (returned,
        raised or cancelled)."""
        key = next(self._ids)
        self._calls[key] = _Call(stage, self._clock())
        try:
            yield
        finally:
            del self._calls[key]

    def oldest(self) -> tuple[str, float] | None:
        """(stage, seconds out) of the call out the longest; None when none is out."""
        call = self._first()
        return None if call is None else (call.stage, max(self._clock() - call.started, 0.0))

    def stalled(self, threshold: float) -> Stall | None:
        """The call out the longest when it has been out for more than `threshold` seconds;
        `first` is true the first time this returns that call."""
        call = self._first()
        if call is None:
            return None
        seconds = self._clock() - call.started
        if seconds <= threshold:
            return None
        first, call.reported = not call.reported, True
        return Stall(call.stage, seconds, first)

    def _first(self) -> _Call | None:
        return next(iter(self._calls.values()), None)
