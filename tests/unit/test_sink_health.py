"""What the pipeline makes of a sink's results for readiness, `outbox_relay_up{component="sink"}`
and setup problems, with a scripted sink in memory (the contract suite does the same against
every real broker)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import pytest

from outbox_relay.config import PipelineConfig, RetryConfig
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import Sink
from outbox_relay.pipeline import Pipeline
from outbox_relay.testing import MemoryDeadLetters
from tests.sink_support import ListSource, eventually, make_events

Answer = Callable[[OutboxEvent], PublishResult]


class _Scripted(Sink):
    """Answers each event as `answer` says at the time of the call."""

    kind = "scripted"

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.taken: list[OutboxEvent] = []

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        results = [self.answer(event) for event in events]
        self.taken += [event for event, result in zip(events, results, strict=True) if result is None]
        return results


@asynccontextmanager
async def _running(sink: _Scripted, name: str) -> AsyncIterator[tuple[Pipeline, ListSource]]:
    source = ListSource()
    pipeline = Pipeline(
        name,
        source,
        sink,
        retry=RetryConfig(initial=0.05, max=0.3),
        tuning=PipelineConfig(stats_interval=0.1),
        dead_letters=MemoryDeadLetters(),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(pipeline.run(stop))
    try:
        yield pipeline, source
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)


def _unreachable(_: OutboxEvent) -> PublishResult:
    return Failure("connection refused", transient=True)


async def test_a_broker_gone_while_one_aggregate_fails_on_its_own_turns_the_relay_not_ready() -> None:
    """One aggregate's events keep failing while the broker takes the others (they fail "amid
    successes": no outage, the relay stays ready); then the broker goes away altogether. Those
    retries are then all there is to hear from it, and they must turn readiness false."""

    def one_backend_fails(event: OutboxEvent) -> PublishResult:
        return Failure("503 from b's backend", transient=True) if event.aggregate_id == "b" else None

    sink = _Scripted(one_backend_fails)
    async with _running(sink, "health-amid") as (pipeline, source):
        first = make_events(3, aggregates=3)
        first[1].aggregate_id = "b"
        source.add(first)
        for _ in range(30):  # others keep flowing, one event every 50 ms
            source.add(make_events(1, aggregates=1))
            await asyncio.sleep(0.05)
            assert pipeline.ready or not pipeline.started, "b failing on its own is not an outage"
        assert pipeline.ready
        sink.answer = _unreachable
        await eventually(lambda: not pipeline.ready, 10, "not ready once the broker is gone")
        sink.answer = lambda event: None
        await eventually(lambda: pipeline.ready and source.pending == 0, 10, "ready and drained")


async def test_a_broker_refusing_the_relays_credentials_is_a_setup_problem_said_once_nothing_parked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sink = _Scripted(lambda event: Failure("answered 401 Unauthorized", transient=True, setup=True))
    async with _running(sink, "health-setup") as (pipeline, source):
        source.add(make_events(5, aggregates=5))
        await eventually(lambda: bool(pipeline.problems.describe()), 10, "a setup problem")
        [problem] = pipeline.problems.describe()
        assert (problem["component"], problem["problem"]) == ("sink", "broker refused the relay")
        assert "401" in problem["error"]
        await eventually(lambda: not pipeline.ready, 10, "not ready")
        await asyncio.sleep(1.0)  # many retries: still waiting, none dead-lettered or dropped
        assert source.pending == 5
        assert sink.taken == []
        # (stdout, or stderr once a test before this one in the process configured logging)
        said = "".join(capsys.readouterr())
        assert said.count("setup problem: ") == 1, "said once, no retry lines"
        assert "will retry" not in said, "said once, no retry lines"
        sink.answer = lambda event: None
        await eventually(lambda: source.pending == 0, 10, "delivered once the credentials work")
        assert pipeline.problems.describe() == []
        assert pipeline.ready
