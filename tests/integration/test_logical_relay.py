"""The logical replication source end to end: a real PostgreSQL with wal_level=logical, the file sink."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbox_relay.assembly import build_source
from outbox_relay.config import parse_config
from outbox_relay.connectors.sources import pgoutput
from outbox_relay.connectors.sources.postgres_logical import PostgresLogicalSource
from outbox_relay.outbox import emit_event, write_event
from outbox_relay.runner import Relay
from tests.conftest import StartRelay, consume_event_ids, kafka_message_as_line, run_cli
from tests.harness.kafka import KafkaBroker
from tests.harness.postgres import PostgresServer, start_postgres
from tests.harness.proxy import SwitchableProxy
from tests.support import (
    assert_complete_and_ordered,
    read_lines,
    run_relay_until,
    source_setup_sql,
    write_config,
)


def _config(dsn: str, out: Path, mode: str = "table", **source: Any) -> dict[str, Any]:
    pipeline = source.pop("pipeline", {})
    return {
        "outboxes": [
            {
                "name": "orders",
                "source": {
                    "type": "postgres-logical",
                    "dsn": dsn,
                    "mode": mode,
                    "poll_interval": "100ms",
                    **source,
                },
                "sink": {"type": "file", "path": str(out)},
                "retry": {"initial": "20ms", "max": "200ms"},
                "pipeline": pipeline,
            }
        ],
        "http": {"port": 0},
    }


def _init_db(config: dict[str, Any]) -> None:
    outbox = parse_config(config, "t.yaml", {}).outboxes[0]
    source_dsn, statements = source_setup_sql(outbox)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _delivered_ids(out: Path) -> set[str]:
    return {line["event_id"] for line in read_lines(out)}


def _bulk_insert(dsn: str, count: int, aggregates: int, transactions: int = 1) -> set[str]:
    ids: set[str] = set()
    with psycopg.connect(dsn, autocommit=True) as conn:
        per_tx = count // transactions
        for t in range(transactions):
            rows = conn.execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)"
                " SELECT 'order', 'order-' || (i %% %s), 'OrderUpdated', jsonb_build_object('seq', i)"
                " FROM generate_series(%s::int, %s::int) AS i RETURNING event_id::text",
                (aggregates, t * per_tx, (t + 1) * per_tx - 1),
            ).fetchall()
            ids.update(r[0] for r in rows)
    return ids


async def test_table_inserts_are_relayed_in_commit_order_and_rolled_back_ones_never(
    dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    config = _config(dsn, out)
    _init_db(config)
    with psycopg.connect(dsn) as first, psycopg.connect(dsn, autocommit=True) as second:
        early_position = write_event(first, "order", "x", "Created", {"n": 1})  # position lower, commits last
        late_commit = early_position
        committed_first = write_event(second, "order", "y", "Created", {"n": 2})
        first.commit()
        with second.transaction():
            write_event(second, "order", "z", "Doomed", {"n": 3})
            raise psycopg.Rollback()
    expected = {late_commit, committed_first} | _bulk_insert(dsn, 3000, aggregates=30, transactions=3)
    await run_relay_until(config, lambda _: _delivered_ids(out) >= expected)
    lines = read_lines(out)
    assert [line["event_id"] for line in lines[:2]] == [committed_first, late_commit], "commit order"
    assert "Doomed" not in {line["event_type"] for line in lines}
    assert assert_complete_and_ordered(lines, expected) == 0


async def test_backlog_reports_events_read_and_not_acknowledged_with_the_age_of_the_oldest(
    dsn: str, tmp_path: Path
) -> None:
    async with _started_source(dsn, tmp_path) as source:
        empty = await source.backlog()
        assert (empty.pending, empty.oldest_age_seconds) == (0, 0.0)
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at)"
                " SELECT 'order', 'order-' || i, 'Created', '{}', now() - interval '90 seconds'"
                " FROM generate_series(1, 30) AS i RETURNING event_id::text"
            ).fetchall()
        events = await _read_all(source, {row[0] for row in rows})
        held = await source.backlog()
        assert held.pending == 30
        assert 90 <= held.oldest_age_seconds < 150
        await source.ack(events)
        done = await source.backlog()
        assert (done.pending, done.oldest_age_seconds) == (0, 0.0)


async def test_message_mode_relays_emitted_messages_without_writing_any_table(
    dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    config = _config(dsn, out, mode="message")
    _init_db(config)
    expected: set[str] = set()
    with psycopg.connect(dsn) as conn:
        for i in range(300):
            expected.add(emit_event(conn, "order", f"o{i % 7}", "Paid", {"i": i}, {"traceparent": f"t{i}"}))
            if i % 50 == 49:
                conn.commit()
        conn.commit()
        emit_event(conn, "order", "o1", "Doomed", {})
        conn.rollback()
    await run_relay_until(config, lambda _: _delivered_ids(out) >= expected)
    lines = read_lines(out)
    assert assert_complete_and_ordered(lines, expected) == 0
    assert lines[0]["payload"] == {"i": 0}
    assert lines[0]["headers"]["traceparent"] == "t0"
    assert "Doomed" not in {line["event_type"] for line in lines}
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)


async def test_a_debezium_style_table_works_with_insert_then_delete_in_one_transaction(
    dsn: str, tmp_path: Path
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE outboxevent (id uuid PRIMARY KEY, aggregatetype varchar(255) NOT NULL,"
            " aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb)"
        )
    out = tmp_path / "out.jsonl"
    columns = {"event_id": "id", "aggregate_type": "aggregatetype", "aggregate_id": "aggregateid",
               "event_type": "type", "headers": None, "created_at": None}  # fmt: skip
    config = _config(dsn, out, tables=["public.outboxevent"], columns=columns)
    _init_db(config)
    with psycopg.connect(dsn) as conn:
        for i in range(20):
            conn.execute(
                "INSERT INTO outboxevent VALUES (gen_random_uuid(), 'Order', %s, 'OrderCreated', %s)",
                (f"{i % 3}", f'{{"i": {i}}}'),
            )
            conn.execute("DELETE FROM outboxevent")  # the row never needs to stay
            conn.commit()
    await run_relay_until(config, lambda _: len(read_lines(out)) >= 20)
    lines = read_lines(out)
    assert sorted(line["payload"]["i"] for line in lines) == list(range(20))
    for aggregate in ("0", "1", "2"):  # in commit order per aggregate
        seen = [line["payload"]["i"] for line in lines if line["aggregate_id"] == aggregate]
        assert seen == [i for i in range(20) if f"{i % 3}" == aggregate]
    assert {line["aggregate_type"] for line in lines} == {"Order"}


async def test_a_huge_single_transaction_streams_within_the_in_flight_window(
    dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    config = _config(dsn, out, pipeline={"max_in_flight": 1000})
    _init_db(config)
    expected = _bulk_insert(dsn, 50_000, aggregates=500, transactions=1)
    peak = 0

    def done(relay: Relay) -> bool:
        nonlocal peak
        peak = max(peak, relay.pipelines[0].held)
        return relay.pipelines[0].published >= 50_000

    await run_relay_until(config, done, timeout=120)
    assert 0 < peak <= 1000
    assert assert_complete_and_ordered(read_lines(out), expected) == 0


@pytest.mark.slow
async def test_a_postgres_restart_mid_stream_loses_nothing(
    controlled_pg: PostgresServer, controlled_dsn: str, tmp_path: Path
) -> None:
    pg, dsn = controlled_pg, controlled_dsn
    out = tmp_path / "out.jsonl"
    config = _config(dsn, out, batch_size=200, pipeline={"max_in_flight": 500})
    # (A restart longer than the lease, 1 s here, ends its term too: the relay then starts a
    # new term with a new source, which must still resume where this process confirmed.)
    config["outboxes"][0]["lease"] = {"time": "1s", "check_interval": "300ms"}
    _init_db(config)
    expected = _bulk_insert(dsn, 20_000, aggregates=100, transactions=20)
    # In a thread: a shutting-down walsender waits for the relay to confirm what it sent, so the
    # relay's event loop must keep running during the restart.
    restart = threading.Thread(target=pg.restart)

    first_term: list[Any] = []
    terms: list[Any] = []  # (each lease term runs a pipeline of its own)

    def restart_once(relay: Any) -> bool:
        if all(pipeline is not relay.pipelines[0] for pipeline in terms):
            terms.append(relay.pipelines[0])
        if restart.ident is None and relay.pipelines[0].published > 2000:
            first_term.append(relay.pipelines[0])
            restart.start()
        return bool(first_term) and not restart.is_alive() and _delivered_ids(out) >= expected

    await run_relay_until(config, restart_once, timeout=90)
    duplicates = assert_complete_and_ordered(read_lines(out), expected)
    # The relay outlived the restart, so it resumed where it had confirmed, even before
    # PostgreSQL 17, whose clean shutdown may save an older position for the slot; also in a
    # new lease term, with a new source. Each term that ended (the restart's, and on a busy
    # machine one more whose renewals came late) repeats at most its window.
    ended = max(len(terms) - 1, 1)
    assert duplicates <= (500 + 1000) * ended, (
        f"bounded by the in-flight window (and one transaction) x {ended}"
    )


async def test_after_a_failover_the_new_servers_slot_advances_over_acknowledged_events_only(
    tmp_path: Path,
) -> None:
    with start_postgres() as first, start_postgres() as second, SwitchableProxy(_port(first)) as proxy:
        for server in (first, second):
            server.create_database("outbox_failover")
        direct = {s: s.dsn.rsplit("/", 1)[0] + "/outbox_failover" for s in (first, second)}
        for server_dsn in direct.values():
            _init_db(_config(server_dsn, tmp_path / "unused.jsonl"))
        address = f"postgresql://postgres@127.0.0.1:{proxy.port}/outbox_failover"
        outbox = parse_config(_config(address, tmp_path / "out.jsonl"), "t.yaml", {}).outboxes[0]
        source = build_source(outbox, 0)
        await source.start()
        try:
            # The first server's WAL moves well past anywhere the second one's will reach.
            await source.ack(await _read_all(source, _bulk_insert(direct[first], 20_000, aggregates=10)))
            proxy.switch(_port(second))  # the address now leads to another server
            held = await _read_all(source, _bulk_insert(direct[second], 5, aggregates=5))
            await asyncio.sleep(1.5)  # standby status goes out at least once a second
            first_held = pgoutput.format_lsn(min(e.position for e in held))
            assert _slot_confirmed_before(direct[second], first_held), "confirmed past unpublished events"
            await source.ack(held)
            await source.fetch(1)  # sends the standby status with the new position
            # Before, the position confirmed to the first server was sent here too, and this
            # slot stayed put (its WAL kept) at least until this server's WAL passed it.
            assert not _slot_confirmed_before(direct[second], first_held), "acknowledged events are confirmed"
        finally:
            await source.close()


async def test_a_server_whose_wal_ends_before_the_confirmed_position_is_read_from_its_slot(
    dsn: str, tmp_path: Path
) -> None:
    async with _started_source(dsn, tmp_path) as source:
        await source.ack(await _read_all(source, _bulk_insert(dsn, 10, aggregates=5)))
        # As if the server had lost WAL this relay confirmed (a crash with fsync off): asking to
        # resume there would skip every transaction until the WAL reached it again.
        source._confirmed += 1 << 40
        await source._drop_stream()
        later = _bulk_insert(dsn, 5, aggregates=5)
        assert {e.event_id for e in await _read_all(source, later)} >= later


def _port(server: PostgresServer) -> int:
    """The TCP port of a server the test started (an external server has none recorded)."""
    assert server.port is not None, "a server started for the test listens on a port of its own"
    return server.port


@asynccontextmanager
async def _started_source(dsn: str, tmp_path: Path) -> AsyncIterator[Any]:
    """The logical source of the default test config, set up and started; closed afterwards."""
    config = _config(dsn, tmp_path / "out.jsonl")
    _init_db(config)
    source = build_source(parse_config(config, "t.yaml", {}).outboxes[0], 0)
    await source.start()
    try:
        yield source
    finally:
        await source.close()


async def _read_all(source: Any, expected: set[str]) -> list[Any]:
    """Fetch until every expected event arrived, reconnecting as the pipeline would."""
    events: list[Any] = []
    deadline = time.monotonic() + 30
    while not expected <= {e.event_id for e in events}:
        assert time.monotonic() < deadline, f"read {len(events)} of {len(expected)} events"
        try:
            events += await source.fetch(5000)
        except psycopg.OperationalError:
            await asyncio.sleep(0.1)
    return events


def _slot_confirmed_before(dsn: str, lsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn < %s::pg_lsn FROM pg_replication_slots"
            " WHERE slot_name = 'outbox_relay'",
            (lsn,),
        ).fetchone()
    assert row is not None
    return bool(row[0])


@pytest.mark.slow
def test_sigkill_mid_stream_loses_nothing_and_duplicates_stay_bounded(
    dsn: str, tmp_path: Path, start_relay: StartRelay
) -> None:
    out = tmp_path / "out.jsonl"
    config = _config(dsn, out, batch_size=500, pipeline={"max_in_flight": 2000})
    _init_db(config)
    expected = _bulk_insert(dsn, 40_000, aggregates=200, transactions=40)
    path = write_config(tmp_path, config)
    relay = start_relay(path)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.stat().st_size > 2_000_000):
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
    os.kill(relay.pid, signal.SIGKILL)
    assert relay.wait(timeout=10) == -signal.SIGKILL
    assert len(_delivered_ids(out)) < 40_000, "the kill happened mid-stream"
    result = run_cli("run", "-c", str(path), "--drain", timeout=120)
    assert result.returncode == 0, result.stderr
    duplicates = assert_complete_and_ordered(read_lines(out), expected)
    assert duplicates <= 2000 + 1000, "duplicates are bounded by the in-flight window (and one transaction)"


@pytest.mark.slow
async def test_heartbeats_keep_slot_lag_bounded_while_only_other_tables_are_busy(
    dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    config = _config(dsn, out, heartbeat_interval="200ms", status_interval="200ms")
    _init_db(config)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE busy (id bigserial PRIMARY KEY, filler text)")
    written = 0

    def busy_writer() -> None:
        nonlocal written
        with psycopg.connect(dsn, autocommit=True) as conn:
            start = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
            until = time.monotonic() + 3
            while time.monotonic() < until:
                conn.execute("INSERT INTO busy (filler) SELECT repeat('x', 500) FROM generate_series(1, 200)")
            row = conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", start).fetchone()
            written = int(row[0]) if row else 0

    writer = threading.Thread(target=busy_writer)
    started = time.monotonic()

    def settled(_: Any) -> bool:
        return written > 0 and time.monotonic() - started > 5

    writer.start()
    await run_relay_until(config, settled, timeout=30)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 FROM pg_replication_slots"
            " WHERE slot_name = 'outbox_relay'"
        ).fetchone()
    assert row is not None
    assert written > 5_000_000, "the busy table wrote enough WAL to matter"
    assert row[0] < written / 20, f"slot lag {row[0]} bytes after {written} bytes of unrelated WAL"


def test_check_names_missing_replication_privilege_and_a_slot_in_use(
    dsn: str, tmp_path: Path, start_relay: StartRelay
) -> None:
    out = tmp_path / "out.jsonl"
    config = _config(dsn, out)
    _init_db(config)
    path = write_config(tmp_path, config)
    relay = start_relay(path)
    try:
        deadline = time.monotonic() + 20
        while "in use by pid" not in (check := run_cli("check", "-c", str(path), "--connect")).stdout:
            assert time.monotonic() < deadline, check.stdout + check.stderr
            time.sleep(0.2)
        status = run_cli("status", "-c", str(path))
        assert "slot outbox_relay: lag_bytes=" in status.stdout
        assert "active (pid" in status.stdout
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=20)
    assert relay.returncode == 0
    role = f"relay_test_plain_{uuid.uuid4().hex[:12]}"  # a role of this test's own, dropped afterwards
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        plain = psycopg.conninfo.make_conninfo(dsn, user=role)
        write_config(tmp_path, _config(plain, out))
        check = run_cli("check", "-c", str(path), "--connect")
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    assert check.returncode == 1
    assert "lacks the REPLICATION attribute" in check.stdout


@pytest.mark.parametrize("mode", ["table", "message"])
async def test_both_modes_relay_into_kafka_in_commit_order_per_aggregate(
    dsn: str, tmp_path: Path, kafka: KafkaBroker, mode: str
) -> None:
    topic_prefix = f"logical-{mode}-{tmp_path.name[-8:]}"
    config = _config(dsn, tmp_path / "unused.jsonl", mode=mode)
    config["outboxes"][0]["sink"] = kafka.order_sink(topic_prefix, partitions=3)
    _init_db(config)
    expected: set[str] = set()
    with psycopg.connect(dsn) as conn:
        for i in range(600):
            write = write_event if mode == "table" else emit_event
            expected.add(write(conn, "order", f"o{i % 11}", "Updated", {"i": i}))
            if i % 40 == 39:
                conn.commit()
        conn.commit()
        (write_event if mode == "table" else emit_event)(conn, "order", "o1", "Doomed", {})
        conn.rollback()

    def all_acknowledged(relay: Any) -> bool:
        return bool(relay.pipelines[0].published >= 600)

    await run_relay_until(config, all_acknowledged, timeout=60)
    messages = consume_event_ids(kafka, f"{topic_prefix}.order", expected, timeout=20)
    lines = [kafka_message_as_line(m) for m in messages]
    assert "Doomed" not in {line["event_type"] for line in lines}
    assert assert_complete_and_ordered(lines, expected) == 0


async def test_a_new_source_in_the_same_process_resumes_where_the_last_one_confirmed(
    dsn: str, tmp_path: Path
) -> None:
    """A new lease term builds a new source. Before PostgreSQL 17 a restarted server may hold an
    older position for the slot than the one confirmed to it, so the new source asks for the
    position this process confirmed (the server takes the later of the two)."""
    async with _started_source(dsn, tmp_path) as first:
        expected = _bulk_insert(dsn, 50, aggregates=5)
        await first.ack(await _read_all(first, expected))
        confirmed = first._confirmed
        assert confirmed > 0
    config = _config(dsn, tmp_path / "out.jsonl")
    second = build_source(parse_config(config, "t.yaml", {}).outboxes[0], 0)
    assert isinstance(second, PostgresLogicalSource)
    await second.start()
    try:
        assert second._confirmed == confirmed
    finally:
        await second.close()
