"""The polling source and the pipeline end to end, against a real PostgreSQL and the file sink."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox_relay.assembly import build_source
from outbox_relay.config import parse_config
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import Sink
from outbox_relay.outbox import write_event
from outbox_relay.pipeline import Pipeline
from outbox_relay.testing import MemoryDeadLetters
from tests.harness.postgres import PostgresServer
from tests.support import (
    assert_complete_and_ordered,
    dead_letters,
    event_ids,
    insert_events,
    read_lines,
    relay_config,
    run_relay_until,
    set_up_outbox_database,
    unpublished,
)


def _file_sink(tmp_path: Path) -> dict[str, Any]:
    return {"type": "file", "path": str(tmp_path / "out.jsonl")}


async def test_every_event_reaches_the_file_sink_with_headers_and_in_order_per_aggregate(
    dsn: str, tmp_path: Path
) -> None:
    insert_events(dsn, 3000, aggregates=37)
    out = tmp_path / "out.jsonl"
    await run_relay_until(relay_config(dsn, _file_sink(tmp_path)), lambda r: unpublished(dsn) == 0)
    lines = read_lines(out)
    assert assert_complete_and_ordered(lines, event_ids(dsn)) == 0
    first = lines[0]
    assert first["payload"]["note"] == "x" * 64
    headers = first["headers"]
    assert headers["traceparent"] == "00-abc-01"
    assert headers["event_id"] == first["event_id"]
    assert headers["position"] == str(first["position"])
    assert {"event_type", "aggregate_type", "aggregate_id", "created_at"} <= headers.keys()


async def test_a_row_that_commits_after_a_higher_position_is_not_skipped(dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    slow = psycopg.connect(dsn)
    try:
        # The slow transaction takes the lower position first and commits last.
        slow.execute("BEGIN")
        late_id = write_event(slow, "order", "late", "Created", {"n": 1})
        with psycopg.connect(dsn, autocommit=True) as fast:
            fast_id = write_event(fast, "order", "early", "Created", {"n": 2})

        async def relay_until_late_row() -> None:
            def done(_: Any) -> bool:
                delivered = {line["event_id"] for line in read_lines(out)}
                if fast_id in delivered and slow.info.transaction_status != 0:
                    slow.execute("COMMIT")  # now commit the lower position, after the higher one went out
                return late_id in delivered

            await run_relay_until(relay_config(dsn, _file_sink(tmp_path)), done, timeout=20)

        await relay_until_late_row()
    finally:
        slow.close()
    positions = [line["position"] for line in read_lines(out)]
    assert positions == sorted(positions, reverse=True), "the late row came after the higher one"
    assert unpublished(dsn) == 0


async def test_after_publish_delete_removes_exactly_the_relayed_rows(dsn: str, tmp_path: Path) -> None:
    insert_events(dsn, 500, aggregates=5)
    expected = event_ids(dsn)
    config = relay_config(dsn, _file_sink(tmp_path), after_publish="delete")

    def empty(_: Any) -> bool:
        return not event_ids(dsn)

    await run_relay_until(config, empty)
    assert assert_complete_and_ordered(read_lines(tmp_path / "out.jsonl"), expected) == 0


async def test_notify_wakes_the_relay_long_before_the_poll_interval(dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    config = relay_config(dsn, _file_sink(tmp_path), poll_interval="30s")
    latencies: list[float] = []

    async def write_and_time() -> None:
        await asyncio.sleep(0.5)  # let the relay start listening
        for i in range(5):
            started = time.monotonic()
            with psycopg.connect(dsn, autocommit=True) as conn:
                write_event(conn, "order", f"o{i}", "Created", {"i": i})
            while len(read_lines(out)) <= i:  # noqa: ASYNC110 - polling a file, no event to await
                await asyncio.sleep(0.005)
            latencies.append(time.monotonic() - started)

    writer = asyncio.ensure_future(write_and_time())
    await run_relay_until(config, lambda _: writer.done(), timeout=20)
    await writer
    assert len(latencies) == 5
    # The poll interval is 30 s: anything well below it was a NOTIFY wake-up (liveness, not speed).
    assert max(latencies) < 15.0, f"NOTIFY did not wake the relay: {latencies}"


class _RejectsOneAggregate(Sink):
    """A sink that refuses every event of one aggregate a number of times (an unhealthy consumer
    of a real broker would look the same to the pipeline)."""

    kind = "test"

    def __init__(self, path: Path, reject: str, times: int) -> None:
        self.path, self.reject, self.remaining = path, reject, times
        self.lines: list[tuple[str, int]] = []

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        results: list[PublishResult] = []
        for event in events:
            if event.aggregate_id == self.reject and self.remaining > 0:
                self.remaining -= 1
                results.append(Failure("rejected for the test"))
            else:
                self.lines.append((event.aggregate_id or "", event.position))
                results.append(None)
        return results


async def test_failing_aggregate_is_retried_in_order_while_other_aggregates_flow(
    dsn: str, tmp_path: Path
) -> None:
    insert_events(dsn, 400, aggregates=4)  # order-0 .. order-3, 100 events each
    config = parse_config(relay_config(dsn, {"type": "stdout"}), "t.yaml", {})
    outbox = config.outboxes[0]
    sink = _RejectsOneAggregate(tmp_path, reject="order-1", times=6)
    pipeline = Pipeline(
        outbox.name,
        build_source(outbox, 0),
        sink,
        retry=outbox.retry,
        tuning=outbox.pipeline,
        dead_letters=MemoryDeadLetters(),
    )
    relay = await run_relay_until(
        relay_config(dsn, {"type": "stdout"}), lambda _: unpublished(dsn) == 0, pipelines=[pipeline]
    )
    assert relay.pipelines[0].published == 400
    per_aggregate: dict[str, list[int]] = {}
    for aggregate, position in sink.lines:
        per_aggregate.setdefault(aggregate, []).append(position)
    assert all(p == sorted(p) and len(p) == 100 for p in per_aggregate.values())
    # While order-1 was held back, the others were not: order-1's first event arrived late.
    first_of_rejected = sink.lines.index(("order-1", per_aggregate["order-1"][0]))
    assert first_of_rejected > 3


async def test_a_row_with_null_aggregate_id_is_held_in_the_dead_letter_table_and_blocks_only_itself(
    dsn: str, tmp_path: Path
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE loose (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " eid uuid DEFAULT gen_random_uuid(), kind text, agg text, ev text, body jsonb,"
            " done_at timestamptz)"
        )
        conn.execute(
            "INSERT INTO loose (kind, agg, ev, body) VALUES ('order', 'a', 'E', '{}'),"
            " ('order', NULL, 'E', '{}'), ('order', 'b', 'E', '{}')"
        )
    columns = {
        "position": "id",
        "event_id": "eid",
        "aggregate_type": "kind",
        "aggregate_id": "agg",
        "event_type": "ev",
        "payload": "body",
        "headers": None,
        "created_at": None,
        "published_at": "done_at",
    }
    config = relay_config(dsn, _file_sink(tmp_path), table="public.loose", columns=columns, notify=False)
    config["outboxes"][0]["pipeline"] = {"stats_interval": "100ms"}
    config["outboxes"][0]["dead_letter"] = {"on_poison": "block"}

    def two_delivered_and_held(relay: Any) -> bool:
        return len(read_lines(tmp_path / "out.jsonl")) == 2 and len(relay.pipelines[0]._holding) == 1

    await run_relay_until(config, two_delivered_and_held)
    assert sorted(line["aggregate_id"] for line in read_lines(tmp_path / "out.jsonl")) == ["a", "b"]
    # Not dropped: held (on_poison: block) in the dead-letter table, where dlq list shows it.
    (held,) = await dead_letters(dsn)
    assert (held.aggregate_id, held.state, held.error) == (None, "held", "aggregate id is NULL")


async def test_memory_stays_bounded_by_the_in_flight_window(dsn: str, tmp_path: Path) -> None:
    insert_events(dsn, 5000, aggregates=50)
    config = relay_config(dsn, _file_sink(tmp_path), batch_size=100)
    config["outboxes"][0]["pipeline"] = {"max_in_flight": 150, "publish_batch_size": 40}
    peak = 0

    def track(relay: Any) -> bool:
        nonlocal peak
        peak = max(peak, relay.pipelines[0].held)
        return unpublished(dsn) == 0

    await run_relay_until(config, track)
    assert 0 < peak <= 150
    assert assert_complete_and_ordered(read_lines(tmp_path / "out.jsonl"), event_ids(dsn)) == 0


@pytest.mark.slow
async def test_database_restart_mid_run_loses_nothing(
    controlled_pg: PostgresServer, controlled_dsn: str, tmp_path: Path
) -> None:
    pg, dsn = controlled_pg, controlled_dsn
    insert_events(dsn, 20_000, aggregates=100)
    out = tmp_path / "out.jsonl"
    restarted = False

    def restart_once_then_finish(relay: Any) -> bool:
        nonlocal restarted
        if not restarted and len(read_lines(out)) > 2000:
            pg.restart()
            restarted = True
        return restarted and unpublished(dsn) == 0

    config = relay_config(dsn, _file_sink(tmp_path), batch_size=200, pipeline={"max_in_flight": 1000})
    await run_relay_until(config, restart_once_then_finish, timeout=90)
    duplicates = assert_complete_and_ordered(read_lines(out), event_ids(dsn))
    assert duplicates <= 1000, "duplicates are bounded by the in-flight window"


class _DownForAWhile(Sink):
    """A sink whose broker is unreachable for its first calls (every call raises)."""

    kind = "test"

    def __init__(self, failing_calls: int) -> None:
        self.failing_calls = failing_calls
        self.delivered: list[tuple[str, int]] = []
        self.readiness_seen: list[bool] = []
        self.pipeline: Pipeline | None = None

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        assert self.pipeline is not None
        self.readiness_seen.append(self.pipeline.ready)
        if self.failing_calls > 0:
            self.failing_calls -= 1
            raise ConnectionRefusedError("broker down for the test")
        self.delivered.extend((e.aggregate_id or "", e.position) for e in events)
        return [None] * len(events)


async def test_a_broker_outage_marks_nothing_and_the_backlog_drains_in_order_when_it_returns(
    dsn: str,
) -> None:
    insert_events(dsn, 1000, aggregates=10)
    config = relay_config(dsn, {"type": "stdout"})
    outbox = parse_config(config, "t.yaml", {}).outboxes[0]
    sink = _DownForAWhile(failing_calls=5)
    pipeline = sink.pipeline = Pipeline(
        outbox.name,
        build_source(outbox, 0),
        sink,
        retry=outbox.retry,
        tuning=outbox.pipeline,
        dead_letters=MemoryDeadLetters(),
    )

    def drained(relay: Any) -> bool:
        if not relay.pipelines[0].sink_ok:
            assert unpublished(dsn) == 1000 - len(sink.delivered), "only delivered events are marked"
        return unpublished(dsn) == 0

    await run_relay_until(config, drained, pipelines=[pipeline])
    # Ready before the outage, not ready while the broker refused, ready again after it returned.
    assert sink.readiness_seen[0] is True
    assert sink.readiness_seen[1:5] == [False] * 4
    assert sink.readiness_seen[-1] is True
    assert len(sink.delivered) == 1000
    per_aggregate: dict[str, list[int]] = {}
    for aggregate, position in sink.delivered:
        per_aggregate.setdefault(aggregate, []).append(position)
    assert all(p == sorted(p) for p in per_aggregate.values())


class _Hangs(Sink):
    """A broker that accepts the connection and then never answers."""

    kind = "test"

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        self.called.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_the_end_of_the_shutdown_grace_period_exits_even_when_the_broker_hangs(dsn: str) -> None:
    from outbox_relay.runner import Relay

    insert_events(dsn, 10)
    config = relay_config(dsn, {"type": "stdout"})
    config["shutdown_grace"] = "1s"
    parsed = parse_config(config, "t.yaml", {})
    outbox = parsed.outboxes[0]
    sink = _Hangs()
    pipeline = Pipeline(
        outbox.name,
        build_source(outbox, 0),
        sink,
        retry=outbox.retry,
        tuning=outbox.pipeline,
        dead_letters=MemoryDeadLetters(),
    )
    relay = Relay(parsed, [pipeline])
    run = asyncio.create_task(relay.run())
    await asyncio.wait_for(sink.called.wait(), 10)
    stopped_at = time.monotonic()
    relay.stop.set()
    assert await asyncio.wait_for(run, 10) == 1, "exit code 1: the grace period ran out"
    assert time.monotonic() - stopped_at < 20.0  # the hang would be forever
    assert unpublished(dsn) == 10, "nothing was marked that the broker did not acknowledge"


async def test_backlog_reports_pending_events_and_the_age_of_the_oldest(dsn: str) -> None:
    outbox = parse_config(relay_config(dsn, {"type": "stdout"}), "t.yaml", {}).outboxes[0]
    source = build_source(outbox, 0)
    await source.start()
    try:
        empty = await source.backlog()
        assert (empty.pending, empty.oldest_age_seconds) == (0, 0.0)
        insert_events(dsn, 30, aggregates=3)
        with psycopg.connect(dsn, autocommit=True) as conn:
            first = conn.execute("SELECT min(position) FROM outbox").fetchone()
            assert first is not None
            conn.execute(
                "UPDATE outbox SET created_at = now() - interval '90 seconds' WHERE position = %s", first
            )
            conn.execute(  # published rows count for neither figure, however old
                "UPDATE outbox SET published_at = now(), created_at = now() - interval '1 hour'"
                " WHERE position = (SELECT max(position) FROM outbox)"
            )
        stats = await source.backlog()
        assert stats.pending == 29
        assert 90 <= stats.oldest_age_seconds < 150
    finally:
        await source.close()


async def test_a_relay_started_before_its_table_exists_relays_once_init_db_has_created_it(
    pg: PostgresServer, tmp_path: Path
) -> None:
    dsn = pg.create_database()  # no outbox table yet
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    created = False

    def create_the_table_after_a_second(_relay: Any) -> bool:
        nonlocal created
        if not created and time.monotonic() - started > 1.0:  # the relay has failed to start by now
            set_up_outbox_database(dsn)  # what init-db runs
            insert_events(dsn, 20, aggregates=4)
            created = True
        return len(read_lines(out)) >= 20

    config = relay_config(dsn, _file_sink(tmp_path))
    await run_relay_until(config, create_the_table_after_a_second, timeout=30)
    assert assert_complete_and_ordered(read_lines(out), event_ids(dsn)) == 0


async def test_an_acknowledgement_the_database_refuses_is_retried_without_publishing_again(
    dsn: str, tmp_path: Path
) -> None:
    refuse_marks = (
        "CREATE FUNCTION refuse_marks() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'marking is refused for now'; END $$;"
        " CREATE TRIGGER refuse_marks BEFORE UPDATE ON outbox FOR EACH ROW EXECUTE FUNCTION refuse_marks()"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(refuse_marks)
    insert_events(dsn, 200, aggregates=4)
    out = tmp_path / "out.jsonl"
    refused_since: float | None = None

    def allow_marks_a_second_after_everything_was_published(_: Any) -> bool:
        nonlocal refused_since
        if refused_since is None and len(read_lines(out)) >= 200:
            refused_since = time.monotonic()
        if refused_since is not None and time.monotonic() - refused_since > 1.0:
            assert unpublished(dsn) == 200, "nothing is marked while the database refuses"
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("DROP TRIGGER refuse_marks ON outbox")
            refused_since = float("inf")
        return unpublished(dsn) == 0

    config = relay_config(dsn, _file_sink(tmp_path), pipeline={"max_in_flight": 1000})
    await run_relay_until(config, allow_marks_a_second_after_everything_was_published)
    assert refused_since == float("inf")
    assert assert_complete_and_ordered(read_lines(out), event_ids(dsn)) == 0, "each event published once"
