"""Databases whose encoding or session defaults differ from the usual, against a real PostgreSQL:
the relay talks UTF-8 and pins the settings whose text output it reads (relay.pgsession), so it
delivers the same bytes and timestamps; a SQL_ASCII database is refused in one sentence."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from outbox_relay.outbox import emit_event, write_event
from tests.conftest import run_cli
from tests.harness.postgres import PostgresServer
from tests.payloads import BYTES_PAYLOAD, read_lines
from tests.support import set_up_outbox_database, write_config


@pytest.fixture
def make_database(pg: PostgresServer) -> Iterator[Any]:
    """make_database(encoding, **settings): a fresh database in that encoding (locale C), with
    `ALTER DATABASE ... SET name = value` for each setting and the default outbox set up as
    init-db sets it up; dropped afterwards."""
    created: list[str] = []

    def make(encoding: str = "UTF8", **settings: str) -> str:
        name = f"relay_test_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL(
                    "CREATE DATABASE {} ENCODING {} TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"
                ).format(sql.Identifier(name), sql.Literal(encoding))
            )
            created.append(name)
            for setting, value in settings.items():
                conn.execute(
                    sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                        sql.Identifier(name), sql.Identifier(setting), sql.Literal(value)
                    )
                )
        dsn = psycopg.conninfo.make_conninfo(pg.dsn, dbname=name)
        set_up_outbox_database(dsn)
        return dsn

    yield make
    for name in created:
        pg.drop_database(name)


def _outbox(name: str, dsn: str, out: Path, source_type: str, **source: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"type": source_type, "dsn": dsn, "poll_interval": "100ms", **source}
    if source_type == "postgres-logical":
        settings.setdefault("slot", f"relay_{name}")
        settings.setdefault("publication", f"relay_{name}")
    return {
        "name": name,
        "source": settings,
        "sink": {"type": "file", "path": str(out)},
        "retry": {"initial": "20ms", "max": "200ms"},
    }


def _write(tmp_path: Path, *outboxes: dict[str, Any], name: str = "relay.yaml") -> Path:
    return write_config(tmp_path, {"outboxes": list(outboxes), "http": {"port": 0}}, name)


def _init_db(path: Path) -> None:
    result = run_cli("init-db", "-c", str(path))
    assert result.returncode == 0, result.stderr


# --- SQL_ASCII --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source_type", "lease"),
    [("postgres-polling", True), ("postgres-logical", False)],  # refused by the lease / the source
)
def test_a_sql_ascii_database_is_refused_in_one_sentence_by_init_db_check_and_run(
    make_database: Any, tmp_path: Path, source_type: str, lease: bool
) -> None:
    dsn = make_database("SQL_ASCII")
    outbox = _outbox("orders", dsn, tmp_path / "out.jsonl", source_type)
    outbox["lease"] = {"enabled": lease}
    path = _write(tmp_path, outbox)
    database = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    sentence = f"database {database} has encoding SQL_ASCII"
    init = run_cli("init-db", "-c", str(path))
    assert init.returncode == 1
    assert sentence in init.stderr
    assert "Traceback" not in init.stderr
    if source_type == "postgres-logical":  # set up by hand, so that check and run get that far
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE PUBLICATION outbox_relay FOR TABLE outbox WITH (publish = 'insert')")
            conn.execute("SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')")

    check = run_cli("check", "-c", str(path), "--connect")
    assert check.returncode == 1
    failed = yaml.safe_load(check.stdout)["outbox orders"]["connect"]["database"]
    assert failed["ok"] is False, failed
    assert failed["error"].startswith(sentence), failed
    assert "Traceback" not in check.stdout + check.stderr

    run = run_cli("run", "-c", str(path), timeout=60)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if "SQL_ASCII" in line]
    assert lines == [f"{path}: outboxes[0] (orders): {sentence}" + lines[0].split(sentence, 1)[1]]
    assert "Traceback" not in run.stderr


# --- encodings PostgreSQL converts ------------------------------------------------------------------

# Text each encoding can hold (LATIN1: Western European; EUC_JP: Japanese).
_TEXTS = {"LATIN1": "Müller café £ ÿ ½", "EUC_JP": "日本語のテキスト ｶﾀｶﾅ"}


@pytest.mark.parametrize("encoding", sorted(_TEXTS))
def test_a_database_in_another_encoding_is_delivered_as_utf8(
    make_database: Any, tmp_path: Path, encoding: str
) -> None:
    """Polling and logical table mode on any encoding; message mode on a single-byte encoding,
    and refused in one sentence on a multi-byte one other than UTF8."""
    dsn = make_database(encoding)
    text = _TEXTS[encoding]
    files = {kind: tmp_path / f"{kind}.jsonl" for kind in ("polling", "table", "message")}
    outboxes = [
        _outbox("polling", dsn, files["polling"], "postgres-polling"),
        _outbox("table", dsn, files["table"], "postgres-logical"),
    ]
    message = _outbox("message", dsn, files["message"], "postgres-logical", mode="message")
    # One config each: two outboxes on one table would race for its events (check refuses it).
    configs = {
        outbox["name"]: _write(tmp_path, outbox, name=f"{outbox['name']}.yaml")
        for outbox in (*outboxes, message)
    }
    for config in configs.values():
        _init_db(config)
    payload = json.dumps({"text": text, "price": 1.10}, ensure_ascii=False).replace("1.1", "1.10")
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)"
            " VALUES ('order', %s, 'Created', %s::jsonb, %s::jsonb) RETURNING event_id::text, payload::text",
            (text, payload, json.dumps({"note": text})),
        ).fetchone()
        assert row is not None
        event_id, rendered = row
        message_id = emit_event(conn, "order", text, "Created", payload, {"note": text})

    if encoding == "LATIN1":
        run = run_cli("run", "-c", str(configs["message"]), "--drain", timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        assert read_lines(files["message"]) == {message_id: payload.encode()}
        assert json.loads(files["message"].read_text())["aggregate_id"] == text
    else:
        check = run_cli("check", "-c", str(configs["message"]), "--connect")
        assert check.returncode == 1
        assert f"its encoding {encoding} is neither UTF8 nor a single-byte encoding" in check.stdout
        run = run_cli("run", "-c", str(configs["message"]), "--drain", timeout=120)
        assert run.returncode == 2
        assert "outboxes[0] (message): message mode cannot read WAL messages" in run.stderr
    for kind in ("polling", "table"):
        run = run_cli("run", "-c", str(configs[kind]), "--drain", timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
    for kind in ("polling", "table"):
        assert read_lines(files[kind]) == {event_id: rendered.encode()}, kind
        line = json.loads(files[kind].read_text())
        assert (line["aggregate_id"], line["headers"]["note"]) == (text, text), kind


def test_message_mode_on_a_single_byte_database_converts_as_the_server_does(
    make_database: Any, tmp_path: Path
) -> None:
    """WIN1252 has bytes with no character (0x81, ...): a message holding one is not altered
    but dead-lettered; its neighbours are delivered, converted as PostgreSQL converts text."""
    dsn = make_database("WIN1252")
    out = tmp_path / "out.jsonl"
    path = _write(tmp_path, _outbox("message", dsn, out, "postgres-logical", mode="message"))
    _init_db(path)
    good = '{"text": "\u20ac \u201equoted\u201c \u2013 \u0152uvre \u017e", "n": 1.10}'
    with psycopg.connect(dsn, autocommit=True) as conn:
        first = emit_event(conn, "order", "o1", "Created", good)
        # The bytea form of pg_logical_emit_message writes the byte 0x81 itself.
        bad = b'{"event_id":"e-bad","aggregate_type":"order","aggregate_id":"o2","event_type":"E",'
        bad += b'"payload":"\x81"}'
        conn.execute("SELECT pg_logical_emit_message(true, 'outbox', %s::bytea)", (bad,))
        last = emit_event(conn, "order", "o3", "Created", good)
    run = run_cli("run", "-c", str(path), "--drain", timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert read_lines(out) == {first: good.encode(), last: good.encode()}
    with psycopg.connect(dsn) as conn:
        parked = conn.execute("SELECT payload, error FROM outbox_relay_dead_letters").fetchall()
    assert [(bytes(payload), "0x81" in error) for payload, error in parked] == [(bad, True)]


# --- session defaults -------------------------------------------------------------------------------


def test_database_defaults_for_the_settings_the_relay_reads_change_nothing_delivered(
    make_database: Any, tmp_path: Path
) -> None:
    """DateStyle, TimeZone, bytea_output and extra_float_digits set on the database: the polling
    source and logical table mode still deliver the exact bytes and creation times. The DSN's
    own `options` (a search_path here) are kept."""
    dsn = make_database(
        DateStyle="SQL, DMY", TimeZone="Asia/Kathmandu", bytea_output="escape", extra_float_digits="-15"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app")
        conn.execute("CREATE TABLE app.events (LIKE public.outbox INCLUDING ALL)")
        conn.execute("ALTER TABLE app.events ALTER COLUMN payload TYPE bytea USING payload::text::bytea")
    with_path = psycopg.conninfo.make_conninfo(dsn, options="-c search_path=app,public")
    files = {kind: tmp_path / f"{kind}.jsonl" for kind in ("polling", "table")}
    configs = [
        _write(tmp_path, outbox, name=f"{outbox['name']}.yaml")
        for outbox in (
            _outbox("polling", with_path, files["polling"], "postgres-polling", table="events"),
            _outbox("table", dsn, files["table"], "postgres-logical", tables=["app.events"]),
        )
    ]
    for config in configs:
        _init_db(config)
    created = {
        "2024-02-29 23:59:59.123456+00": "2024-02-29T23:59:59.123456+00:00",
        "1999-12-31 18:15:00.000001+00": "1999-12-31T18:15:00.000001+00:00",
        "2038-01-19 03:14:08+00": "2038-01-19T03:14:08+00:00",
    }
    expected: dict[str, str] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for stamp, iso in created.items():
            row = conn.execute(
                "INSERT INTO app.events (aggregate_type, aggregate_id, event_type, payload, created_at)"
                " VALUES ('order', 'o1', 'Created', %s, %s::timestamptz) RETURNING event_id::text",
                (BYTES_PAYLOAD, stamp),
            ).fetchone()
            assert row is not None
            expected[row[0]] = iso
    for config in configs:
        run = run_cli("run", "-c", str(config), "--drain", timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
    for kind, out in files.items():
        assert read_lines(out) == dict.fromkeys(expected, BYTES_PAYLOAD), kind
        times = {line["event_id"]: line["headers"]["created_at"] for line in map(json.loads, out.open())}
        assert times == expected, kind


@pytest.mark.parametrize("source_type", ["postgres-polling", "postgres-logical"])
def test_a_search_path_from_a_libpq_service_file_is_kept(
    make_database: Any, tmp_path: Path, source_type: str
) -> None:
    """The relay pins its session settings without replacing the `options` of a service file."""
    dsn = make_database()
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA other")
        conn.execute("CREATE TABLE other.outbox (LIKE public.outbox INCLUDING ALL)")
    services = tmp_path / "pg_service.conf"
    services.write_text(
        "[relaytest]\n"
        + "".join(f"{key}={params[key]}\n" for key in ("host", "port", "dbname", "user") if key in params)
        + "options=-csearch_path=other\n"
    )
    env = {**os.environ, "PGSERVICEFILE": str(services)}
    where = {"table": "outbox"} if source_type == "postgres-polling" else {"tables": ["outbox"]}
    path = _write(
        tmp_path, _outbox("orders", "service=relaytest", tmp_path / "out.jsonl", source_type, **where)
    )
    init = run_cli("init-db", "-c", str(path), env=env)
    assert init.returncode == 0, init.stderr
    with psycopg.connect(dsn, autocommit=True) as conn:
        event_id = write_event(conn, "order", "a", "E", {"n": 1}, table="other.outbox")
    run = run_cli("run", "-c", str(path), "--drain", env=env, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert list(read_lines(tmp_path / "out.jsonl")) == [event_id]
