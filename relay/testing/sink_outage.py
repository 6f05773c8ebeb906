"""The outage half of the sink contract suite (outbox_relay.testing.sink_contract): a pipeline
relaying through a broker that is taken away and given back, and what a sink raised meanwhile."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY

from outbox_relay.config import PipelineConfig, RetryConfig
from outbox_relay.events import OutboxEvent, PublishResult
from outbox_relay.interfaces import ConnectorError, Sink
from outbox_relay.pipeline import Pipeline
from outbox_relay.testing.deadletters import MemoryDeadLetters
from outbox_relay.testing.events import eventually
from outbox_relay.testing.memory import MemorySource

Lines = list[dict[str, Any]]

#: What a sink may raise for "the whole call failed" (the destination, not the sink, is broken):
#: anything else, a TypeError say, is a bug in the sink, and the suite fails it as one.
CALL_FAILURES: tuple[type[Exception], ...] = (ConnectorError, OSError)


@dataclass
class Outage:
    """A sink whose broker can be taken away: `refuse()` makes it unreachable (open connections
    cut, new ones refused), `silence()` makes it hang (connections accepted, never answered),
    `restore()` brings it back as it was. `read_back` reads what this sink delivered."""

    sink: Sink
    read_back: Callable[[], Lines]
    refuse: Callable[[], None]
    silence: Callable[[], None]
    restore: Callable[[], None]


def sink_up(outbox: str) -> float | None:
    return REGISTRY.get_sample_value("outbox_relay_up", {"outbox": outbox, "component": "sink"})


def raised_bugs(sink: Sink) -> list[Exception]:
    """From now on, what the sink's `publish` raises that is not a connector's error (a bug in
    the sink, which the pipeline survives but the suite reports), in a list."""
    bugs: list[Exception] = []
    publish = sink.publish

    async def reporting(events: Sequence[OutboxEvent]) -> list[PublishResult]:
        try:
            return await publish(events)
        except CALL_FAILURES:
            raise
        except Exception as bug:
            bugs.append(bug)
            raise

    with suppress(AttributeError):  # (a sink with __slots__ and no __dict__ is not watched)
        sink.publish = reporting  # type: ignore[method-assign]
    return bugs


def first_deliveries(lines: Lines) -> Lines:
    """Each event's first delivery, in delivery order: what a consumer dropping repeats sees."""
    firsts: dict[str, dict[str, Any]] = {}
    for line in lines:
        firsts.setdefault(line["event_id"], line)
    return list(firsts.values())


async def relay_through_an_outage(
    outage: Outage, how: str, before: list[OutboxEvent], during: list[OutboxEvent]
) -> None:
    """Relay `before` through a pipeline, take the broker away (`how`: "refused" or "silent"),
    write `during`, and give the broker back once the relay has stayed not ready for a while."""
    outbox = f"contract-{uuid.uuid4().hex[:12]}"  # gauges of this test's own
    source = MemorySource()
    pipeline = Pipeline(
        outbox,
        source,
        outage.sink,
        retry=RetryConfig(initial=0.05, max=0.5),
        tuning=PipelineConfig(stats_interval=0.1),
        dead_letters=MemoryDeadLetters(),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(pipeline.run(stop))
    try:
        source.add(before)
        await eventually(lambda: source.pending == 0, 60, "the events before the outage acknowledged")
        assert pipeline.ready
        assert sink_up(outbox) == 1
        outage.refuse() if how == "refused" else outage.silence()
        source.add(during)
        await _not_ready_while_away(pipeline, source, outbox)
        outage.restore()
        await eventually(
            lambda: source.pending == 0 and pipeline.ready and sink_up(outbox) == 1,
            90,
            "every event acknowledged, and ready with outbox_relay_up{component=sink} 1 again",
        )
    finally:
        stop.set()
        await asyncio.wait_for(running, 60)


async def _not_ready_while_away(pipeline: Pipeline, source: MemorySource, outbox: str) -> None:
    waiting = source.pending
    await eventually(
        lambda: not pipeline.ready and sink_up(outbox) == 0,
        60,
        "the relay not ready and outbox_relay_up{component=sink} 0 while the broker is away",
    )
    # It stays so for as long as the broker is away and events wait, however many publish calls
    # come back with nothing but transient failures meanwhile.
    watch_until = time.monotonic() + 3
    while time.monotonic() < watch_until:
        assert source.pending == waiting, "an event was acknowledged while the broker was away"
        assert not pipeline.ready, "ready while the broker is away"
        assert sink_up(outbox) == 0, "the sink marked up while the broker is away"
        await asyncio.sleep(0.05)
