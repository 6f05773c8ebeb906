"""Helpers for the per-sink integration tests: events, and publishing the way the pipeline does.
Events, the in-memory source and `eventually` are the package's own (outbox_relay.testing)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from outbox_relay.events import OutboxEvent
from outbox_relay.interfaces import ConnectorError, Sink
from outbox_relay.testing import MemorySource, eventually, make_events
from outbox_relay.testing.events import random_event_id
from tests.harness.process import Server
from tests.support import REPO

__all__ = [
    "ListSource",
    "eventually",
    "make_events",
    "missing_extra_message",
    "random_event_id",
    "relay_events",
    "relay_rounds_during",
    "started_sink",
    "stop_and_start",
]

S = TypeVar("S", bound=Sink)

#: A source in memory, so that a sink's test puts a real pipeline in front of it without a
#: database: `add` writes events as an application would; `acked` is what was acknowledged.
ListSource = MemorySource


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
from outbox_relay.assembly import SetupError, build_sink
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
