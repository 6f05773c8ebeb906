"""Both PostgreSQL sources hand on each payload exactly as stored, against a real PostgreSQL: a
`json` or `text` column byte for byte, `jsonb` as PostgreSQL renders it, `bytea` as its bytes,
and in message mode the text of the `payload` value as it stands in the message. The events are
written with the producer helpers (`write_event`, `emit_event`) where they apply, so what those
send is checked too; and end to end through `outbox-relay run --drain` to the file sink."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbox_relay.assembly import build_dead_letter_store, build_source
from outbox_relay.config import parse_config
from outbox_relay.connectors.sources.postgres_polling import default_table_ddl
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.identifiers import parse_table_name
from outbox_relay.interfaces import Sink
from outbox_relay.outbox import emit_event, write_event
from outbox_relay.pipeline import Pipeline
from tests.conftest import run_cli
from tests.payloads import (
    BYTES_PAYLOAD,
    JSON_PAYLOADS,
    JSONB_PAYLOADS,
    TEXT_PAYLOAD,
    in_a_line,
    read_lines,
)
from tests.support import dead_letters, run_relay_until, source_setup_sql, write_config

_JSON_WS = b" \t\r\n"
_TYPES = ("json", "jsonb", "text", "bytea")
_CONTENT_TYPES = {
    "json": "application/json",
    "jsonb": "application/json",
    "text": "text/plain; charset=utf-8",
    "bytea": "application/octet-stream",
}


def _event_id(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(parts)))


def _create_tables(dsn: str) -> None:
    """outbox_json, outbox_jsonb, outbox_text, outbox_bytea: the default table with the payload
    column of that type."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for kind in _TYPES:
            table = f"public.outbox_{kind}"
            conn.execute(default_table_ddl(parse_table_name(table)))
            conn.execute(
                sql.SQL("ALTER TABLE {} ALTER COLUMN payload TYPE {} USING payload::text::{}").format(
                    sql.Identifier("outbox_" + kind), sql.SQL(kind), sql.SQL(kind)
                )
            )


def _write_rows(dsn: str) -> dict[str, tuple[bytes, str]]:
    """Write the awkward payloads into the four tables; {event id: (expected payload, content
    type)}. JSON goes through `write_event` as text; jsonb is expected as PostgreSQL renders it."""
    expected: dict[str, tuple[bytes, str]] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, payload in JSON_PAYLOADS.items():
            event_id = _event_id("json", name)
            write_event(
                conn, "payload", name, "Checked", payload, table="public.outbox_json", event_id=event_id
            )
            expected[event_id] = (payload, "application/json")
        for name, payload in JSONB_PAYLOADS.items():
            event_id = _event_id("jsonb", name)
            write_event(
                conn, "payload", name, "Checked", payload, table="public.outbox_jsonb", event_id=event_id
            )
            row = conn.execute("SELECT %s::jsonb::text", (payload.decode(),)).fetchone()
            assert row is not None
            expected[event_id] = (row[0].encode(), "application/json")
        for kind, column_value in (("text", TEXT_PAYLOAD.decode()), ("bytea", BYTES_PAYLOAD)):
            event_id = _event_id(kind, "any")
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (event_id, aggregate_type, aggregate_id, event_type, payload)"
                    " VALUES (%s, 'payload', %s, 'Checked', %s)"
                ).format(sql.Identifier("outbox_" + kind)),
                (event_id, kind, column_value),
            )
            expected[event_id] = (TEXT_PAYLOAD if kind == "text" else BYTES_PAYLOAD, _CONTENT_TYPES[kind])
    return expected


def _emit_messages(dsn: str) -> dict[str, bytes]:
    """Emit the JSON payloads as WAL messages (`emit_event`, and two written by hand with an
    escaped member name, a duplicate and odd spacing); {event id: expected payload}."""
    expected: dict[str, bytes] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, payload in JSON_PAYLOADS.items():
            event_id = _event_id("message", name)
            emit_event(conn, "payload", name, "Checked", payload, {"kind": name}, event_id=event_id)
            expected[event_id] = payload.strip(_JSON_WS)  # (whitespace around a value is not part of it)
        by_hand = {
            _event_id("message", "escaped-name"): (
                '{ "pay\\u006coad" :\n [1.10, {"payload": 2}] ,"event_id":"%s","aggregate_type":"payload",'
                '"aggregate_id":"h1","event_type":"Checked"}',
                b'[1.10, {"payload": 2}]',
            ),
            _event_id("message", "duplicate"): (
                '{"payload": 1, "event_id":"%s","aggregate_type":"payload","aggregate_id":"h2",'
                '"event_type":"Checked","headers":{},"p\\u0061yload"\t:\t-0.0e-0 }',
                b"-0.0e-0",
            ),
        }
        for event_id, (content, payload) in by_hand.items():
            conn.execute("SELECT pg_logical_emit_message(true, 'outbox', %s::text)", (content % event_id,))
            expected[event_id] = payload
    return expected


def _polling_outbox(dsn: str, kind: str, out: Path) -> dict[str, Any]:
    return {
        "name": f"polling_{kind}",
        "source": {
            "type": "postgres-polling",
            "dsn": dsn,
            "table": f"public.outbox_{kind}",
            "poll_interval": "100ms",
        },
        "sink": {"type": "file", "path": str(out)},
        "retry": {"initial": "20ms", "max": "200ms"},
    }


def _logical_outbox(dsn: str, mode: str, out: Path) -> dict[str, Any]:
    return {
        "name": f"logical_{mode}",
        "source": {
            "type": "postgres-logical",
            "dsn": dsn,
            "mode": mode,
            "slot": f"payload_{mode}",
            "publication": f"payload_{mode}",
            # (message mode reads WAL messages, not tables: it refuses a `tables` list)
            **({"tables": [f"public.outbox_{kind}" for kind in _TYPES]} if mode == "table" else {}),
            "poll_interval": "100ms",
        },
        "sink": {"type": "file", "path": str(out)},
        "retry": {"initial": "20ms", "max": "200ms"},
    }


def _init(config: dict[str, Any]) -> None:
    """What init-db runs for each outbox of `config` (the tables exist already)."""
    for index, outbox in enumerate(parse_config(config, "t.yaml", {}).outboxes):
        source_dsn, statements = source_setup_sql(outbox, index)
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)


def _config(*outboxes: dict[str, Any]) -> dict[str, Any]:
    return {"outboxes": list(outboxes), "http": {"port": 0}}


async def _fetch_all(config: dict[str, Any], index: int, wanted: set[str]) -> list[OutboxEvent]:
    """Start the source of outbox `index`, fetch until every wanted event arrived, acknowledge."""
    source = build_source(parse_config(config, "t.yaml", {}).outboxes[index], index)
    await source.start()
    events: list[OutboxEvent] = []
    try:
        deadline = time.monotonic() + 60
        while not wanted <= {e.event_id for e in events}:
            assert time.monotonic() < deadline, f"{len(events)} of {len(wanted)} events arrived"
            fetched = await source.fetch(1000)
            events += fetched
            if not fetched:
                await asyncio.sleep(0.05)
        await source.ack(events)
    finally:
        await source.close()
    return events


def _differences(events: list[OutboxEvent], expected: dict[str, tuple[bytes, str]]) -> list[str]:
    got = {e.event_id: (e.payload, e.content_type) for e in events if e.event_id in expected}
    return [
        f"{event_id}: got {got[event_id][1]} {got[event_id][0][:80]!r}, want {want[1]} {want[0][:80]!r}"
        for event_id, want in expected.items()
        if got.get(event_id) != want
    ]


async def test_the_polling_source_hands_on_each_column_type_as_stored(dsn: str, tmp_path: Path) -> None:
    _create_tables(dsn)
    config = _config(*(_polling_outbox(dsn, kind, tmp_path / f"{kind}.jsonl") for kind in _TYPES))
    _init(config)
    expected = _write_rows(dsn)
    events: list[OutboxEvent] = []
    for index, kind in enumerate(_TYPES):
        wanted = {event_id for event_id in expected if event_id in _ids_of(kind, expected)}
        events += await _fetch_all(config, index, wanted)
    assert not _differences(events, expected)


async def test_the_logical_source_hands_on_each_column_type_as_stored(dsn: str, tmp_path: Path) -> None:
    _create_tables(dsn)
    config = _config(_logical_outbox(dsn, "table", tmp_path / "out.jsonl"))
    _init(config)
    expected = _write_rows(dsn)
    events = await _fetch_all(config, 0, set(expected))
    assert not _differences(events, expected)


async def test_message_mode_hands_on_the_payload_text_as_it_stands_in_the_message(
    dsn: str, tmp_path: Path
) -> None:
    config = _config(_logical_outbox(dsn, "message", tmp_path / "out.jsonl"))
    _init(config)
    expected = {event_id: (payload, "application/json") for event_id, payload in _emit_messages(dsn).items()}
    events = await _fetch_all(config, 0, set(expected))
    assert not _differences(events, expected)
    assert {e.headers["kind"] for e in events if "kind" in e.headers} == set(JSON_PAYLOADS)


def test_run_drain_writes_every_payload_to_the_file_sink_as_stored(dsn: str, tmp_path: Path) -> None:
    """End to end: four polling outboxes (one per column type) and message mode, `run --drain`."""
    _create_tables(dsn)
    files = {kind: tmp_path / f"{kind}.jsonl" for kind in (*_TYPES, "message")}
    config = _config(
        *(_polling_outbox(dsn, kind, files[kind]) for kind in _TYPES),
        _logical_outbox(dsn, "message", files["message"]),
    )
    _init(config)
    rows = _write_rows(dsn)
    messages = _emit_messages(dsn)
    result = run_cli("run", "-c", str(write_config(tmp_path, config)), "--drain", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    wrong: list[str] = []
    for kind, path in files.items():
        delivered = read_lines(path)
        if kind == "message":
            want = {event_id: in_a_line(payload) for event_id, payload in messages.items()}
        else:
            want = {
                event_id: _as_in_a_line(payload, content_type)
                for event_id, (payload, content_type) in rows.items()
                if event_id in _ids_of(kind, rows)
            }
        got = {event_id: _decoded(delivered.get(event_id), kind) for event_id in want}
        wrong += [f"{kind} {i}: got {got[i]!r:.120}, want {w!r:.120}" for i, w in want.items() if got[i] != w]
    assert not wrong, "\n".join(wrong)


class _RefusesPoison(Sink):
    """Refuses, for good, every event whose payload says "poison" (as a broker refuses a message
    it will never take); acknowledges the rest."""

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        return [Failure("refused", permanent=True) if b"poison" in e.payload else None for e in events]


async def test_a_dead_letter_replayed_in_message_mode_keeps_its_payload_bytes(
    dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    config = _config(_logical_outbox(dsn, "message", out))
    config["outboxes"][0]["dead_letter"] = {"after_attempts": 1}
    _init(config)
    payload = b'{"poison": true, "price": 1.10, "a": 123456789012345678901234567890, "n": 1E+2}'
    with psycopg.connect(dsn, autocommit=True) as conn:
        poison = emit_event(conn, "payload", "p1", "Checked", payload)
    outbox = parse_config(config, "t.yaml", {}).outboxes[0]
    pipeline = Pipeline(
        outbox.name,
        build_source(outbox, 0),
        _RefusesPoison(),
        retry=outbox.retry,
        tuning=outbox.pipeline,
        dead_letter=outbox.dead_letter,
        dead_letters=build_dead_letter_store(outbox, 0),
    )
    await run_relay_until(config, lambda _: _parked(dsn), pipelines=[pipeline])
    assert [letter.payload for letter in await dead_letters(dsn, outbox.name)] == [payload]

    path = write_config(tmp_path, config)
    replayed = run_cli("dlq", "replay", "-c", str(path), "--event-id", poison)
    assert replayed.returncode == 0, replayed.stderr
    drained = run_cli("run", "-c", str(path), "--drain")
    assert drained.returncode == 0, drained.stderr[-3000:]
    assert read_lines(out) == {poison: payload}


def _parked(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM outbox_relay_dead_letters").fetchone()
    return bool(row and row[0])


def _ids_of(kind: str, expected: dict[str, tuple[bytes, str]]) -> set[str]:
    """The event ids written into the table of this column type."""
    names = {"json": JSON_PAYLOADS, "jsonb": JSONB_PAYLOADS}.get(kind, {"any": b""})
    return {_event_id(kind, name) for name in names} & set(expected)


def _as_in_a_line(payload: bytes, content_type: str) -> bytes:
    return in_a_line(payload) if content_type == "application/json" else payload


def _decoded(line_payload: bytes | None, kind: str) -> bytes | None:
    """Text is embedded in a line as a JSON string: the text it stands for."""
    if line_payload is None or kind != "text":
        return line_payload
    import json

    return str(json.loads(line_payload)).encode()


@pytest.mark.parametrize("source_type", ["postgres-polling", "postgres-logical"])
async def test_a_payload_column_declared_as_a_domain_is_read_as_its_base_type(
    dsn: str, tmp_path: Path, source_type: str
) -> None:
    """CREATE DOMAIN blob AS bytea: the bytes arrive as bytes, not as bytea's hex text; a domain
    over a domain over jsonb stays JSON."""
    from outbox_relay.runner import set_up_database
    from tests.support import read_lines as read_file_lines
    from tests.support import relay_config

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE DOMAIN blob AS bytea")
        conn.execute("CREATE DOMAIN doc AS jsonb")
        conn.execute("CREATE DOMAIN doc2 AS doc")
        for table, kind in (("outbox_blob", "blob"), ("outbox_doc", "doc2")):
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                    " event_id uuid NOT NULL DEFAULT gen_random_uuid(), aggregate_type text NOT NULL,"
                    " aggregate_id text NOT NULL, event_type text NOT NULL, payload {} NOT NULL,"
                    " headers jsonb NOT NULL DEFAULT '{{}}', created_at timestamptz NOT NULL DEFAULT now(),"
                    " published_at timestamptz)"
                ).format(sql.Identifier(table), sql.Identifier(kind))
            )
    expected = {"outbox_blob": ("payload_base64", "AAF/gP8="), "outbox_doc": ("payload", {"n": 1.1})}
    for table in expected:
        out = tmp_path / f"{table}.jsonl"
        config = relay_config(dsn, {"type": "file", "path": str(out)}, table=table)
        if source_type == "postgres-logical":
            config["outboxes"][0]["source"] = {
                "type": source_type, "dsn": dsn, "tables": [table], "slot": table, "publication": table,
            }  # fmt: skip
            outbox = parse_config(config, "t.yaml", {}).outboxes[0]
            await set_up_database(outbox, build_source(outbox, 0))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (aggregate_type, aggregate_id, event_type, payload)"
                    " VALUES ('o', 'a', 'E', %s)"
                ).format(sql.Identifier(table)),
                (b"\x00\x01\x7f\x80\xff" if table == "outbox_blob" else '{"n": 1.10}',),
            )
        await run_relay_until(config, lambda _, o=out: bool(read_file_lines(o)))
        (line,) = read_file_lines(out)
        key, value = expected[table]
        assert line[key] == value, table
