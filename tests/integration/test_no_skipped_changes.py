"""Nothing committed is ever skipped: a change the relay cannot turn into an event stops progress
loudly (the slot is not confirmed past it) or is dead-lettered with its content; real PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox_relay.assembly import build_source
from outbox_relay.config import parse_config
from tests.support import (
    dead_letters,
    read_lines,
    relay_config,
    run_relay_until,
    slot_confirmed,
    source_setup_sql,
    wal_insert_position,
)


def _logical(dsn: str, out: Path, **source: Any) -> dict[str, Any]:
    config = relay_config(dsn, {"type": "file", "path": str(out)})
    config["outboxes"][0]["source"] = {
        "type": "postgres-logical",
        "dsn": dsn,
        "poll_interval": "100ms",
        **source,
    }
    return config


def _create_slot_and_publication(config: dict[str, Any]) -> None:
    outbox = parse_config(config, "t.yaml", {}).outboxes[0]
    source_dsn, statements = source_setup_sql(outbox)
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _insert(dsn: str, count: int, table: str = "outbox", aggregate: str = "order") -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            f"INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload)"
            " SELECT %s, 'agg-' || (i %% 5), 'Created', jsonb_build_object('i', i)"
            " FROM generate_series(1, %s) AS i RETURNING event_id::text",
            (aggregate, count),
        ).fetchall()
    return {row[0] for row in rows}


async def _run_while_refused(config: dict[str, Any], seconds: float = 3.0) -> None:
    """Run the relay for a while; it must say it is not ready the whole time after its start."""
    started = time.monotonic()
    seen_unready = []

    def done(relay: Any) -> bool:
        ready, _ = relay.readiness()
        if time.monotonic() - started > 1.0:  # (once it had time to start, or to fail starting)
            seen_unready.append(not ready)
        return time.monotonic() - started > seconds

    await run_relay_until(config, done, timeout=seconds + 20)
    assert seen_unready, "the relay said it was ready while it could not relay"
    assert all(seen_unready), "the relay said it was ready while it could not relay"


async def test_a_column_mapping_the_table_lacks_holds_the_slot_and_every_event_arrives_once_fixed(
    dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    broken = _logical(dsn, out, columns={"event_type": "kind"})
    _create_slot_and_publication(broken)
    expected = _insert(dsn, 50)
    committed = wal_insert_position(dsn)  # (the end of the inserting transaction's commit record)
    await _run_while_refused(broken)
    assert read_lines(out) == []
    assert slot_confirmed(dsn) < committed, "the slot was confirmed past events that were never delivered"
    fixed = _logical(dsn, out)
    await run_relay_until(fixed, lambda _: {line["event_id"] for line in read_lines(out)} >= expected)


async def test_inserts_into_a_published_table_the_config_does_not_name_hold_the_slot(
    dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE extra (LIKE outbox INCLUDING ALL)")
        conn.execute("CREATE PUBLICATION outbox_relay FOR TABLE outbox, extra WITH (publish = 'insert')")
        conn.execute("SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')")
    config = _logical(dsn, out, tables=["public.outbox"])
    expected = _insert(dsn, 10, table="extra")
    committed = wal_insert_position(dsn)
    expected |= _insert(dsn, 10)
    await _run_while_refused(config)
    assert slot_confirmed(dsn) < committed, "the slot was confirmed past inserts that were skipped"
    both = _logical(dsn, out, tables=["public.outbox", "public.extra"])
    await run_relay_until(both, lambda _: {line["event_id"] for line in read_lines(out)} >= expected)


@pytest.mark.parametrize("source", ["postgres-polling", "postgres-logical"])
async def test_a_row_whose_created_at_has_no_iso_form_is_dead_lettered_while_the_rest_flows(
    dsn: str, tmp_path: Path, source: str
) -> None:
    out = tmp_path / "out.jsonl"
    config = relay_config(dsn, {"type": "file", "path": str(out)})
    if source == "postgres-logical":
        config = _logical(dsn, out)
        _create_slot_and_publication(config)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for when in ("infinity", "-infinity", "10000-01-01"):
            conn.execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at)"
                " VALUES ('order', %s, 'Created', '{}', %s)",
                (f"odd-{when}", when),
            )
    expected = _insert(dsn, 20)
    await run_relay_until(
        config, lambda _: {line["event_id"] for line in read_lines(out)} >= expected, timeout=20
    )
    parked = await dead_letters(dsn)
    assert sorted(letter.aggregate_id for letter in parked) == [
        "odd--infinity",
        "odd-10000-01-01",
        "odd-infinity",
    ]
    assert all("created_at" in letter.error for letter in parked)


def test_a_position_column_that_allows_null_or_repeats_is_refused(dsn: str, tmp_path: Path) -> None:
    """A row without a position would never be read; two rows with one would be marked together."""
    from tests.conftest import run_cli
    from tests.support import write_config

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE loose (id bigint DEFAULT nextval('outbox_position_seq'), eid uuid DEFAULT"
            " gen_random_uuid(), kind text, agg text, ev text, body jsonb, done_at timestamptz)"
        )
        conn.execute("INSERT INTO loose (id, kind, agg, ev, body) VALUES (NULL, 'order', 'a', 'E', '{}')")
    columns = {"position": "id", "event_id": "eid", "aggregate_type": "kind", "aggregate_id": "agg",
               "event_type": "ev", "payload": "body", "headers": None, "created_at": None,
               "published_at": "done_at"}  # fmt: skip
    path = write_config(tmp_path, relay_config(dsn, {"type": "stdout"}, table="loose", columns=columns))
    check = run_cli("check", "-c", str(path), "--connect")
    assert check.returncode == 1
    assert "position column public.loose.id must be NOT NULL and unique" in check.stdout, check.stdout


async def test_message_mode_keeps_numbers_as_written_and_dead_letters_what_no_broker_can_carry(
    dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    config = _logical(dsn, out, mode="message")
    _create_slot_and_publication(config)
    messages = [
        '{"event_id": "e1", "aggregate_type": "order", "aggregate_id": 123456789012345678901234567890,'
        ' "event_type": "Paid", "payload": {"n": 1}, "headers": {"amount": 1.10}}',
        '{"event_id": "e2", "aggregate_type": "order", "aggregate_id": "a",'
        ' "event_type": "Paid", "payload": {}, "headers": {"trace": "\\ud800"}}',
        '{"event_id": "e3", "aggregate_type": "order", "aggregate_id": "b", "event_type": "Paid",'
        ' "payload": 2}',
    ]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for message in messages:
            conn.execute("SELECT pg_logical_emit_message(true, 'outbox', %s)", (message,))
    await run_relay_until(config, lambda _: {line["event_id"] for line in read_lines(out)} >= {"e1", "e3"})
    first = read_lines(out)[0]
    assert first["aggregate_id"] == "123456789012345678901234567890"
    assert first["headers"]["amount"] == "1.10"
    (letter,) = await dead_letters(dsn)
    assert letter.event_id == "e2"
    assert "lone surrogate" in letter.error


async def test_a_partitioned_outbox_is_relayed_in_table_mode(dsn: str, tmp_path: Path) -> None:
    """With publish_via_partition_root, PostgreSQL 15 describes the partition too, although its
    inserts come under the partitioned table's name: that description is no error."""
    from outbox_relay.runner import set_up_database

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE pout (position bigint GENERATED ALWAYS AS IDENTITY, event_id uuid NOT NULL"
            " DEFAULT gen_random_uuid(), aggregate_type text NOT NULL, aggregate_id text NOT NULL,"
            " event_type text NOT NULL, payload jsonb NOT NULL, headers jsonb NOT NULL DEFAULT '{}',"
            " created_at timestamptz NOT NULL DEFAULT clock_timestamp()) PARTITION BY LIST (aggregate_type)"
        )
        conn.execute("CREATE TABLE pout_order PARTITION OF pout FOR VALUES IN ('order')")
    out = tmp_path / "out.jsonl"
    config = _logical(dsn, out, tables=["pout"])
    outbox = parse_config(config, "t.yaml", {}).outboxes[0]
    await set_up_database(outbox, build_source(outbox, 0))
    expected = _insert(dsn, 5, table="pout")
    await run_relay_until(config, lambda _: {line["event_id"] for line in read_lines(out)} >= expected)


async def test_a_table_dropped_from_the_publication_while_running_stops_the_relay_loudly(
    dsn: str, tmp_path: Path
) -> None:
    """PostgreSQL decodes an insert with the publication as it was then, so inserts made while
    the table is out of the publication never reach the relay, whatever it confirms: it must
    notice, stop and say so, not run on as if all were well."""
    out = tmp_path / "out.jsonl"
    config = _logical(dsn, out)
    _create_slot_and_publication(config)
    first = _insert(dsn, 5)
    stage: dict[str, Any] = {}

    def done(relay: Any) -> bool:
        if "altered" not in stage and {line["event_id"] for line in read_lines(out)} >= first:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("ALTER PUBLICATION outbox_relay DROP TABLE outbox")
            stage["altered"] = wal_insert_position(dsn)
            stage["unseen"] = _insert(dsn, 5)
            stage["at"] = time.monotonic()
        if "altered" in stage and time.monotonic() - stage["at"] > 3:
            stage["ready"] = relay.readiness()[0]
            return True
        return False

    await run_relay_until(config, done, timeout=30)
    assert stage["ready"] is False, "the relay said it was ready with the table out of the publication"
