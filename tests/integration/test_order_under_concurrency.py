"""Per-aggregate order with real concurrent writers: serialized per aggregate (row lock), committing
late, below positions the relay has already passed. Both sources, several seeds; the file sink."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox_relay.assembly import build_source
from outbox_relay.config import parse_config
from outbox_relay.outbox import write_event
from tests.support import (
    assert_complete_and_ordered,
    read_lines,
    relay_config,
    run_relay_until,
    source_setup_sql,
)
from tests.writers import WriterPlan, message_writer, order_violations, start_writers, table_writer


def _file_sink(out: Path) -> dict[str, Any]:
    return {"type": "file", "path": str(out)}


def _logical_config(dsn: str, out: Path, mode: str) -> dict[str, Any]:
    config = relay_config(dsn, _file_sink(out))
    config["outboxes"][0]["source"] = {"type": "postgres-logical", "dsn": dsn, "mode": mode}
    outbox = parse_config(config, "t.yaml", {}).outboxes[0]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in source_setup_sql(outbox)[1]:
            conn.execute(statement)
    return config


def _delivered_ids(out: Path) -> set[str]:
    return {line["event_id"] for line in read_lines(out)}


async def test_a_late_commit_below_the_cursor_is_handed_out_before_the_next_event_of_its_aggregate(
    dsn: str,
) -> None:
    """The interleaving of the report, step by step against the source: A locks X and writes X#1;
    B writes Y above it and commits; the relay reads Y; A commits; C (serialized behind A by X's
    lock) writes X#2 and commits. Whatever the relay reads next must give X#1 before X#2."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE test_aggregates (id text PRIMARY KEY)")
        conn.execute("INSERT INTO test_aggregates VALUES ('X')")
    config = relay_config(dsn, {"type": "stdout"}, poll_interval="10s")
    source = build_source(parse_config(config, "t.yaml", {}).outboxes[0], 0)
    await source.start()
    try:
        with psycopg.connect(dsn) as a, psycopg.connect(dsn) as c:
            a.execute("SELECT 1 FROM test_aggregates WHERE id = 'X' FOR UPDATE")
            x1 = write_event(a, "order", "X", "First", {"n": 1})
            with psycopg.connect(dsn, autocommit=True) as b:
                y = write_event(b, "order", "Y", "Other", {"n": 0})
            handed_out = [e.event_id for e in await source.fetch(100)]
            assert handed_out == [y]
            a.commit()
            c.execute("SELECT 1 FROM test_aggregates WHERE id = 'X' FOR UPDATE")
            x2 = write_event(c, "order", "X", "Second", {"n": 2})
            c.commit()
        for _ in range(5):
            handed_out += [e.event_id for e in await source.fetch(100)]
    finally:
        await source.close()
    assert [e for e in handed_out if e in (x1, x2)] == [x1, x2], "X#2 was handed out before X#1"


async def _relay_concurrent_writers(
    config: dict[str, Any], dsn: str, out: Path, plan: WriterPlan, write: Any
) -> None:
    written = start_writers(dsn, plan, write)

    def done(_: Any) -> bool:
        if written.errors:
            raise AssertionError(f"a writer failed: {written.errors[0]!r}")
        return written.done.is_set() and _delivered_ids(out) >= written.ids

    await run_relay_until(config, done, timeout=120)
    lines = read_lines(out)
    assert order_violations(lines, written) == []
    assert len(written.ids) == plan.events
    assert_complete_and_ordered(lines, written.ids)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_polling_keeps_every_aggregates_order_under_concurrent_late_committing_writers(
    dsn: str, tmp_path: Path, seed: int
) -> None:
    out = tmp_path / "out.jsonl"
    config = relay_config(dsn, _file_sink(out))
    await _relay_concurrent_writers(config, dsn, out, WriterPlan(seed=seed), table_writer)


@pytest.mark.parametrize("seed", [1, 2])
async def test_logical_table_mode_keeps_every_aggregates_order_under_concurrent_writers(
    dsn: str, tmp_path: Path, seed: int
) -> None:
    out = tmp_path / "out.jsonl"
    config = _logical_config(dsn, out, "table")
    await _relay_concurrent_writers(config, dsn, out, WriterPlan(seed=seed), table_writer)


async def test_logical_message_mode_keeps_every_aggregates_order_under_concurrent_writers(
    dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    config = _logical_config(dsn, out, "message")
    await _relay_concurrent_writers(config, dsn, out, WriterPlan(seed=7), message_writer)


def test_check_warns_when_positions_are_not_drawn_in_order_by_the_insert(dsn: str, tmp_path: Path) -> None:
    from tests.conftest import run_cli
    from tests.support import write_config

    path = write_config(tmp_path, relay_config(dsn, {"type": "stdout"}))
    fine = run_cli("check", "-c", str(path), "--connect")
    assert fine.returncode == 0, fine.stdout
    assert "warning" not in fine.stdout, fine.stdout
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE outbox ALTER COLUMN position SET CACHE 20")
    cached = run_cli("check", "-c", str(path), "--connect")
    assert cached.returncode == 0
    assert "caches 20 values per session" in cached.stdout, cached.stdout
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE outbox ALTER COLUMN position DROP IDENTITY")
    unsequenced = run_cli("check", "-c", str(path), "--connect")
    assert "is not filled by an identity or serial sequence" in unsequenced.stdout, unsequenced.stdout


async def test_a_writer_open_for_the_whole_run_holds_back_only_its_own_event(
    dsn: str, tmp_path: Path
) -> None:
    """Its uncommitted row is a gap below everything read meanwhile: the others flow, and its
    event goes out once it commits."""
    out = tmp_path / "out.jsonl"
    with psycopg.connect(dsn) as long_open:
        late = write_event(long_open, "order", "slow", "Late", {"n": 1})
        others = set(_insert_many(dsn, 3000))
        await run_relay_until(
            relay_config(dsn, _file_sink(out)), lambda _: _delivered_ids(out) >= others, timeout=60
        )
        assert late not in _delivered_ids(out)
        long_open.commit()
    await run_relay_until(
        relay_config(dsn, _file_sink(out)), lambda _: late in _delivered_ids(out), timeout=30
    )


def _insert_many(dsn: str, count: int) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = []
        for start in range(0, count, 100):  # in many transactions, while the other one stays open
            rows += conn.execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)"
                " SELECT 'order', 'agg-' || (i %% 20), 'Created', jsonb_build_object('i', i)"
                " FROM generate_series(%s::int, %s::int) AS i RETURNING event_id::text",
                (start, start + 99),
            ).fetchall()
    return [row[0] for row in rows]
