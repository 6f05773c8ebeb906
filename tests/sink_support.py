"""Helpers for the per-sink integration tests: events, and publishing the way the pipeline does."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from outbox_relay.events import OutboxEvent
from outbox_relay.interfaces import BacklogStats, ConnectorError, Sink, Source
from tests.harness.process import Server
from tests.support import REPO

S = TypeVar("S", bound=Sink)


def random_event_id(_position: int) -> str:
    return str(uuid.uuid4())


def make_events(
    count: int,
    aggregates: int,
    start: int = 1,
    *,
    aggregate_type: str = "order",
    event_id: Callable[[int], str] = random_event_id,
    epoch: float = 1_700_000_000.25,
) -> list[OutboxEvent]:
    """Events at positions start.. over `aggregates` aggregates, with a JSON payload that is not
    ASCII and two headers of their own; `event_id(position)` names each, `epoch` + position is
    its creation time."""
    return [
        OutboxEvent(
            position=i,
            event_id=event_id(i),
            aggregate_type=aggregate_type,
            aggregate_id=f"order-{i % aggregates}",
            event_type="OrderUpdated",
            payload=b'{"seq": %d, "text": "caf\xc3\xa9"}' % i,
            headers={"traceparent": f"00-trace-{i}-01", "correlation_id": "c-1"},
            created_at=epoch + i,
        )
        for i in range(start, start + count)
    ]


class ListSource(Source):
    """A source in memory, so that a sink's test puts a real pipeline in front of it without a
    database: `add` writes events as an application would; `acked` is what was acknowledged."""

    kind = "list"

    def __init__(self) -> None:
        self._events: list[OutboxEvent] = []
        self._handed = 0
        self._arrived = asyncio.Event()
        self.acked: list[OutboxEvent] = []

    def add(self, events: Sequence[OutboxEvent]) -> None:
        self._events += events
        self._arrived.set()

    @property
    def pending(self) -> int:
        return len(self._events) - len(self.acked)

    async def start(self) -> None:
        pass

    async def fetch(self, limit: int) -> list[OutboxEvent]:
        events = self._events[self._handed : self._handed + limit]
        self._handed += len(events)
        return events

    async def ack(self, events: Sequence[OutboxEvent]) -> None:
        self.acked += events

    async def wait_for_events(self) -> None:
        self._arrived.clear()
        if self._handed == len(self._events):
            waiter = asyncio.ensure_future(self._arrived.wait())
            try:
                await asyncio.wait((waiter,), timeout=0.1)
            finally:
                waiter.cancel()

    @property
    def caught_up(self) -> bool:
        return self._handed == len(self._events)

    async def backlog(self) -> BacklogStats:
        return BacklogStats(pending=self.pending, oldest_age_seconds=0.0)


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait (without blocking the event loop) until `condition()` holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g}s: {what}"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def started_sink(sink: S) -> AsyncIterator[S]:
    """The sink, started; closed when the block ends."""
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


async def relay_events(
    sink: Sink,
    events: list[OutboxEvent],
    *,
    batch: int,
    deadline_s: float = 30.0,
    pause_s: float = 0.2,
    allow_permanent: bool = False,
) -> int:
    """Publish the way the pipeline does: at most one event per aggregate per call, the next
    event of an aggregate only after the previous one was acknowledged, failures retried after a
    pause. Returns how many event publications failed (a raising call counts all its events).
    A permanent failure fails the test unless `allow_permanent` (then it is retried too)."""
    lanes: dict[str | None, deque[OutboxEvent]] = {}
    for event in events:
        lanes.setdefault(event.aggregate_id, deque()).append(event)
    failed = 0
    deadline = time.monotonic() + deadline_s
    while any(lanes.values()):
        assert time.monotonic() < deadline, f"events still unacknowledged after {deadline_s:g}s"
        heads = [lane[0] for lane in lanes.values() if lane][:batch]
        try:
            results = await sink.publish(heads)
        except ConnectorError:
            failed += len(heads)
            await asyncio.sleep(pause_s)
            continue
        assert len(results) == len(heads)
        for event, result in zip(heads, results, strict=True):
            if result is None:
                lanes[event.aggregate_id].popleft()
            else:
                assert allow_permanent or not result.permanent, (
                    f"a permanent failure during an outage: {result.reason}"
                )
                failed += 1
        if any(result is not None for result in results):
            await asyncio.sleep(pause_s)
    return failed


async def relay_rounds_during(
    sink: Sink,
    disturbance: Callable[[], None],
    *,
    aggregates: int,
    pause_s: float = 0.2,
    between_s: float = 0.01,
    allow_permanent: bool = False,
) -> tuple[list[OutboxEvent], int]:
    """Round after round, the next event of every aggregate (each round relayed as by
    `relay_events`), while `disturbance` runs in a thread, until it returned and three more rounds
    went through. Returns the events of all rounds and how many publications failed."""
    events: list[OutboxEvent] = []
    failed = 0
    disturbing = asyncio.create_task(asyncio.to_thread(disturbance))
    rounds_after = 0
    while rounds_after < 3:
        if disturbing.done():
            disturbing.result()
            rounds_after += 1
        round_events = make_events(aggregates, aggregates, start=len(events) + 1)
        events += round_events
        failed += await relay_events(
            sink,
            round_events,
            batch=aggregates,
            deadline_s=30,
            pause_s=pause_s,
            allow_permanent=allow_permanent,
        )
        await asyncio.sleep(between_s)
    return events, failed


def stop_and_start(server: Server, *, after_s: float, down_s: float) -> Callable[[], None]:
    """A disturbance for `relay_rounds_during`: stop the (owned) server after `after_s` seconds and
    start it again `down_s` seconds later."""

    def disturb() -> None:
        time.sleep(after_s)
        server.stop()
        time.sleep(down_s)
        server.start()

    return disturb


def missing_extra_message(sink_config: dict[str, Any], module: str) -> str:
    """What building a relay with this sink says when `module` cannot be imported: run in a
    child process in which the module is made unimportable (sys.modules[name] = None)."""
    code = f"""
import sys
sys.modules[{module!r}] = None
from outbox_relay.config import parse_config
from outbox_relay.runner import SetupError, build_sink
config = parse_config({{"outboxes": [{{"name": "o", "source": {{"type": "postgres-polling", "dsn": "postgresql://x/y"}},
    "sink": {sink_config!r}}}]}}, "relay.yaml", {{}})
try:
    build_sink(config.outboxes[0], 0)
except SetupError as exc:
    print(exc)
else:
    print("built")
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
