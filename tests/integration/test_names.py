"""Names from the config (schemas, tables, columns, the publication, the dead-letter table) in
every command against a real PostgreSQL: never executed as SQL, read as PostgreSQL reads them
(unquoted folds to lower case, double-quoted is exact), and resolved as the server resolves them
(an unqualified name through the connection's search_path)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from outbox_relay.outbox import write_event
from tests.conftest import StartRelay, run_cli
from tests.harness.postgres import PostgresServer
from tests.support import read_lines, set_up_outbox_database, wait_for, write_config

COMMANDS = (
    ("check",),
    ("init-db", "--print-sql"),
    ("init-db",),
    ("check", "--connect"),
    ("run", "--drain"),
    ("status",),
    ("dlq", "list"),
)
DEFAULT_COLUMNS = {
    "position": "position",
    "event_id": "event_id",
    "aggregate_type": "aggregate_type",
    "aggregate_id": "aggregate_id",
    "event_type": "event_type",
    "payload": "payload",
    "headers": "headers",
    "created_at": "created_at",
    "published_at": "published_at",
}


def _quoted(name: str) -> str:
    """A name as the config writes it to mean exactly `name`: double-quoted."""
    return '"' + name.replace('"', '""') + '"'


def _padded(name: str, size: int = 63) -> str:
    """`name` filled up with `é` (2 bytes) and `x` to exactly `size` bytes of UTF-8."""
    while len(name.encode()) + 2 <= size:
        name += "é"
    return name + "x" * (size - len(name.encode()))


@pytest.fixture
def database(pg: PostgresServer) -> Iterator[str]:
    """A fresh, empty database with a `canary` table that no command may ever drop."""
    dsn = pg.create_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.canary (alive int); INSERT INTO public.canary VALUES (1)")
    try:
        yield dsn
    finally:
        pg.drop_database(dsn)


def _canary_alive(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT to_regclass('public.canary') IS NOT NULL").fetchone() == (True,)


def _config(
    dsn: str,
    kind: str,
    out: Path,
    *,
    dead_letter_table: str = "outbox_relay_dead_letters",
    **source: Any,
) -> dict[str, Any]:
    base: dict[str, Any] = {"type": kind, "dsn": dsn, "poll_interval": "100ms"}
    if kind == "postgres-logical":
        base["slot"] = f"relay_{uuid.uuid4().hex[:12]}"  # slots are per server: one per test
    return {
        "outboxes": [
            {
                "name": "orders",
                "source": {**base, **source},
                "sink": {"type": "file", "path": str(out)},
                "retry": {"initial": "20ms", "max": "200ms"},
                "dead_letter": {"table": dead_letter_table},
            }
        ],
        "http": {"port": 0},
        "log": {"format": "json", "level": "info"},
    }


def _create_table(dsn: str, schema: str | None, table: str, columns: dict[str, str]) -> None:
    """An outbox table with these column names (and its schema), as an application would."""
    c = {key: sql.Identifier(name) for key, name in columns.items()}
    name = sql.Identifier(table) if schema is None else sql.Identifier(schema, table)
    with psycopg.connect(dsn, autocommit=True) as conn:
        if schema is not None:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {t} ({position} bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
                " {event_id} uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE, {aggregate_type} text NOT NULL,"
                " {aggregate_id} text NOT NULL, {event_type} text NOT NULL, {payload} jsonb NOT NULL,"
                " {headers} jsonb NOT NULL DEFAULT '{{}}', {created_at} timestamptz NOT NULL DEFAULT"
                " clock_timestamp(), {published_at} timestamptz)"
            ).format(t=name, **c)
        )


def _insert(dsn: str, schema: str | None, table: str, columns: dict[str, str], count: int) -> set[str]:
    c = {key: sql.Identifier(name) for key, name in columns.items()}
    name = sql.Identifier(table) if schema is None else sql.Identifier(schema, table)
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL(
                "INSERT INTO {t} ({aggregate_type}, {aggregate_id}, {event_type}, {payload})"
                " SELECT 'order', 'order-' || (i % 3), 'Created', jsonb_build_object('i', i)"
                " FROM generate_series(1, {n}) AS i RETURNING {event_id}::text"
            ).format(t=name, n=sql.Literal(count), **c)
        ).fetchall()
    return {row[0] for row in rows}


def _relayed(out: Path) -> set[str]:
    return {line["event_id"] for line in read_lines(out)}


def _ok(result: subprocess.CompletedProcess[str], command: tuple[str, ...]) -> None:
    assert result.returncode == 0, f"{' '.join(command)}: {result.stdout}{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr


# --- hostile names ---------------------------------------------------------------------------

HOSTILE_SCHEMA = "Odd.Schema'; DROP TABLE canary; --"
HOSTILE_TABLE = _padded('Out"Box \\ 🙂; DROP TABLE canary; --')  # 63 bytes
HOSTILE_COLUMNS = {
    "position": "Pos$--",
    "event_id": 'Event"Id; DROP TABLE canary; --',
    "aggregate_type": "agg.type",
    "aggregate_id": "agg id \\",
    "event_type": "ÉvENT_type",
    "payload": _padded("Payload'); DROP TABLE canary; --"),
    "headers": "he'aders",
    "created_at": "created at",
    "published_at": 'published"at',
}
HOSTILE_DEAD_LETTERS = _padded("DL'; DROP TABLE canary; --")
HOSTILE_PUBLICATION = 'Pub\'; DROP TABLE canary; -- \\ "x", y'


@pytest.mark.parametrize("kind", ["postgres-polling", "postgres-logical"])
def test_every_command_works_with_hostile_but_valid_names_and_never_runs_them_as_sql(
    database: str, tmp_path: Path, cli_env: dict[str, str], kind: str
) -> None:
    _create_table(database, HOSTILE_SCHEMA, HOSTILE_TABLE, HOSTILE_COLUMNS)
    out = tmp_path / "out.jsonl"
    table = f"{_quoted(HOSTILE_SCHEMA)}.{_quoted(HOSTILE_TABLE)}"
    columns = {key: _quoted(name) for key, name in HOSTILE_COLUMNS.items()}
    if kind == "postgres-polling":
        source: dict[str, Any] = {"table": table, "columns": columns}
    else:
        del columns["position"], columns["published_at"]
        source = {"tables": [table], "columns": columns, "publication": _quoted(HOSTILE_PUBLICATION)}
    config = _config(database, kind, out, dead_letter_table=_quoted(HOSTILE_DEAD_LETTERS), **source)
    path = write_config(tmp_path, config)
    expected: set[str] = set()
    for command in COMMANDS:
        if command == ("run", "--drain"):
            expected = _insert(database, HOSTILE_SCHEMA, HOSTILE_TABLE, HOSTILE_COLUMNS, 5)
        result = run_cli(*command, "-c", str(path), env=cli_env)
        _ok(result, command)
        assert _canary_alive(database), f"{' '.join(command)} dropped the canary"
        if command == ("init-db", "--print-sql"):
            assert table in result.stdout
    assert _relayed(out) == expected
    again = run_cli("init-db", "-c", str(path), env=cli_env)  # idempotent
    _ok(again, ("init-db",))
    with psycopg.connect(database) as conn:
        assert conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (_quoted(HOSTILE_DEAD_LETTERS),)
        ).fetchone() == (True,)
        if kind == "postgres-polling":
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(
                    sql.Identifier(HOSTILE_SCHEMA, HOSTILE_TABLE),
                    sql.Identifier(HOSTILE_COLUMNS["published_at"]),
                )
            ).fetchone()
            assert row == (0,), "every relayed row is marked published"
        else:
            row = conn.execute(
                "SELECT count(*) FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s"
                " AND tablename = %s",
                (HOSTILE_PUBLICATION, HOSTILE_SCHEMA, HOSTILE_TABLE),
            ).fetchone()
            assert row == (1,), "the publication of that name publishes that table"
    assert _canary_alive(database)


def test_the_printed_sql_of_init_db_runs_as_it_is_and_creates_exactly_the_named_objects(
    database: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    _create_table(database, HOSTILE_SCHEMA, HOSTILE_TABLE, HOSTILE_COLUMNS)
    table = f"{_quoted(HOSTILE_SCHEMA)}.{_quoted(HOSTILE_TABLE)}"
    columns = {key: _quoted(name) for key, name in HOSTILE_COLUMNS.items()}
    config = _config(
        database,
        "postgres-polling",
        tmp_path / "out.jsonl",
        dead_letter_table=_quoted(HOSTILE_DEAD_LETTERS),
        table=table,
        columns=columns,
    )
    printed = run_cli("init-db", "--print-sql", "-c", str(write_config(tmp_path, config)), env=cli_env)
    _ok(printed, ("init-db", "--print-sql"))
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(printed.stdout.encode())  # the whole script, as psql -f would run it
        triggers = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = 'outbox_relay_notify'",
            (table,),
        ).fetchone()
        dead_letters = conn.execute(
            "SELECT to_regclass(%s)::text", (_quoted(HOSTILE_DEAD_LETTERS),)
        ).fetchone()
    assert triggers == (1,)
    assert dead_letters == (_quoted(HOSTILE_DEAD_LETTERS),)
    assert _canary_alive(database)


@pytest.mark.parametrize(
    ("kind", "bad", "expected"),
    [
        (
            "postgres-polling",
            {
                "table": "public.outbox; DROP TABLE canary; --",
                "columns": {
                    "payload": 'payload"; DROP TABLE canary; --',
                    "position": '"pos"; DROP TABLE canary; --"',
                    "event_id": '"id\x00"',
                },
                "notify_channel": "x'); DROP TABLE canary; --",
            },
            {
                "source.table": "not a valid unquoted name: outbox; DROP TABLE canary; --",
                "source.columns.payload": "has a double quote inside a part",
                "source.columns.position": "text follows a closing double quote",
                "source.columns.event_id": "must not contain a NUL character",
                "source.notify_channel": "must match",
                "dead_letter.table": "has more than two dot-separated parts",
            },
        ),
        (
            "postgres-logical",
            {
                "tables": ['"outbox; DROP TABLE canary; --', "a b", '"' + "é" * 32 + '"'],
                "columns": {"event_id": "id.x"},
                "publication": "pub'; DROP TABLE canary; --",
                "slot": 'Slot"; DROP TABLE canary; --',
            },
            {
                "source.tables[0]": "has an unbalanced double quote",
                "source.tables[1]": "double-quote it: '\"a b\"'",
                "source.tables[2]": "a name part is 64 bytes long, PostgreSQL allows 63",
                "source.columns.event_id": "is one name, without a schema",
                "source.publication": "not a valid unquoted name",
                "source.slot": "must match ^[a-z0-9_]{1,63}$",
                "dead_letter.table": "has more than two dot-separated parts",
            },
        ),
    ],
)
def test_every_command_refuses_invalid_names_with_file_key_and_reason_on_one_line_each(
    database: str,
    tmp_path: Path,
    cli_env: dict[str, str],
    kind: str,
    bad: dict[str, Any],
    expected: dict[str, str],
) -> None:
    config = _config(
        database, kind, tmp_path / "out.jsonl", dead_letter_table="a.b.c; DROP TABLE canary", **bad
    )
    path = write_config(tmp_path, config)
    for command in COMMANDS:
        result = run_cli(*command, "-c", str(path), env=cli_env)
        assert result.returncode == 2, f"{' '.join(command)}: {result.stdout}{result.stderr}"
        assert result.stdout == ""
        assert "Traceback" not in result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == len(expected), lines
        for line in lines:
            prefix = f"{path}: outboxes[0]."
            assert line.startswith(prefix), line
            key, reason = line.removeprefix(prefix).split(": ", 1)
            assert expected[key] in reason, line
    assert _canary_alive(database)


@pytest.mark.parametrize(
    ("kind", "source", "key"),
    [
        (
            "postgres-polling",
            {"columns": {"published_at": 'published_at" IS NULL; DROP TABLE canary; --'}},
            "source.columns.published_at",
        ),
        (  # (a mapping of its own: init-db does not create the table, goes on to the publication)
            "postgres-logical",
            {"tables": ['outbox"; DROP TABLE canary; --'], "columns": {"created_at": None}},
            "source.tables[0]",
        ),
    ],
)
def test_sql_written_into_a_column_or_table_name_is_refused_and_never_executed(
    database: str, tmp_path: Path, cli_env: dict[str, str], kind: str, source: dict[str, Any], key: str
) -> None:
    _create_table(database, "public", "outbox", DEFAULT_COLUMNS)
    path = write_config(tmp_path, _config(database, kind, tmp_path / "out.jsonl", **source))
    results = [run_cli(command, "-c", str(path), env=cli_env) for command in ("check", "init-db")]
    assert _canary_alive(database)
    for result in results:
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.startswith(f"{path}: outboxes[0].{key}: has a double quote inside a part")
        assert len(result.stderr.splitlines()) == 1


# --- mixed case, quotes and the search_path ---------------------------------------------------

QUOTED_COLUMNS = {
    "position": "Position",
    "event_id": "EventId",
    "aggregate_type": "AggregateType",
    "aggregate_id": "Aggregate.Id",
    "event_type": "EventType",
    "payload": "Payload",
    "headers": "Headers",
    "created_at": "CreatedAt",
    "published_at": "PublishedAt",
}


@pytest.mark.parametrize("kind", ["postgres-polling", "postgres-logical"])
@pytest.mark.parametrize(
    ("written", "schema", "table", "columns"),
    [
        ("public.OutBox", "public", "outbox", DEFAULT_COLUMNS),  # folded, as PostgreSQL does
        ('"OutBox"', "public", "OutBox", DEFAULT_COLUMNS),
        ('"Odd.Schema"."Out Box"', "Odd.Schema", "Out Box", QUOTED_COLUMNS),
    ],
)
def test_mixed_case_and_quoted_names_mean_the_same_table_in_check_init_db_and_run(
    database: str,
    tmp_path: Path,
    cli_env: dict[str, str],
    kind: str,
    written: str,
    schema: str,
    table: str,
    columns: dict[str, str],
) -> None:
    if columns is not DEFAULT_COLUMNS:  # init-db creates only the default table
        _create_table(database, schema, table, columns)
    mapping = {key: _quoted(name) for key, name in columns.items()}
    if kind == "postgres-logical":
        del mapping["position"], mapping["published_at"]
        source: dict[str, Any] = {"tables": [written], "columns": mapping}
    else:
        source = {"table": written, "columns": mapping}
    out = tmp_path / "out.jsonl"
    path = write_config(tmp_path, _config(database, kind, out, **source))
    for command in (("init-db",), ("check", "--connect")):
        _ok(run_cli(*command, "-c", str(path), env=cli_env), command)
    with psycopg.connect(database) as conn:
        found = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relname ILIKE 'out%%box' AND c.relkind = 'r'"
        ).fetchall()
    assert found == [(schema, table)], "one table, the one the name means"
    expected = _insert(database, schema, table, columns, 6)
    if columns is DEFAULT_COLUMNS:  # the producer helper reads the name as the config does
        with psycopg.connect(database) as conn:
            expected.add(write_event(conn, "order", "order-9", "Created", {"i": 9}, table=written))
    _ok(run_cli("run", "--drain", "-c", str(path), env=cli_env), ("run", "--drain"))
    assert _relayed(out) == expected


@pytest.mark.parametrize("kind", ["postgres-polling", "postgres-logical"])
def test_a_name_that_differs_only_in_case_is_refused_with_its_double_quoted_spelling(
    database: str, tmp_path: Path, cli_env: dict[str, str], kind: str
) -> None:
    _create_table(database, None, "OutBox", DEFAULT_COLUMNS)
    _create_table(database, "s", "t", {**DEFAULT_COLUMNS, "event_id": "EventId"})

    def check(table: str, **source: Any) -> str:
        named = {"table": table} if kind == "postgres-polling" else {"tables": [table]}
        path = write_config(tmp_path, _config(database, kind, tmp_path / "out.jsonl", **named, **source))
        result = run_cli("check", "--connect", "-c", str(path), env=cli_env)
        assert result.returncode == 1, result.stdout + result.stderr
        return result.stdout

    assert (
        'table outbox does not exist (run: outbox-relay init-db); there is a table "OutBox": names'
        " without double quotes are folded to lower case, write it with its double quotes"
        " (in YAML: '\"OutBox\"')"
    ) in check("OutBox")
    assert (
        'table s.t has no column for columns.event_id=EventId (there is a column "EventId": write it'
        " with its double quotes)"
    ) in check("s.t", columns={"event_id": "EventId"})


@pytest.mark.parametrize("kind", ["postgres-polling", "postgres-logical"])
def test_an_unqualified_name_is_the_table_the_search_path_finds_in_init_db_check_and_run(
    database: str, tmp_path: Path, cli_env: dict[str, str], kind: str
) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA other")
    dsn = make_conninfo(database, options="-csearch_path=other")
    table: dict[str, Any] = {"table": "outbox"} if kind == "postgres-polling" else {"tables": ["outbox"]}
    out = tmp_path / "out.jsonl"
    path = write_config(tmp_path, _config(dsn, kind, out, **table))
    _ok(run_cli("init-db", "-c", str(path), env=cli_env), ("init-db",))
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT to_regclass('other.outbox') IS NOT NULL").fetchone() == (True,)
        assert conn.execute("SELECT to_regclass('public.outbox')").fetchone() == (None,)
    check = run_cli("check", "--connect", "-c", str(path), env=cli_env)
    _ok(check, ("check", "--connect"))
    assert "other.outbox" in check.stdout
    expected = _insert(database, "other", "outbox", DEFAULT_COLUMNS, 7)
    _ok(run_cli("run", "--drain", "-c", str(path), env=cli_env), ("run", "--drain"))
    assert _relayed(out) == expected


@pytest.mark.parametrize("kind", ["postgres-polling", "postgres-logical"])
def test_init_db_never_makes_a_second_table_when_the_name_finds_one_further_along_the_search_path(
    database: str, tmp_path: Path, cli_env: dict[str, str], kind: str
) -> None:
    """`CREATE TABLE IF NOT EXISTS outbox` looks only in the search_path's first schema: with
    public.outbox there and a schema `app` first on the path, it would create app.outbox, and
    the relay would then read that empty table."""
    set_up_outbox_database(database)  # public.outbox and the dead-letter table
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app")
    dsn = make_conninfo(database, options="-csearch_path=app,public")
    table: dict[str, Any] = {"table": "outbox"} if kind == "postgres-polling" else {"tables": ["outbox"]}
    out = tmp_path / "out.jsonl"
    path = write_config(tmp_path, _config(dsn, kind, out, **table))
    _ok(run_cli("init-db", "-c", str(path), env=cli_env), ("init-db",))
    with psycopg.connect(database) as conn:
        made = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'app'").fetchone()
    assert made == (0,), "init-db made a table in app"
    expected = _insert(database, "public", "outbox", DEFAULT_COLUMNS, 3)
    _ok(run_cli("run", "--drain", "-c", str(path), env=cli_env), ("run", "--drain"))
    assert _relayed(out) == expected


def test_a_publication_of_other_tables_than_configured_is_refused_by_check_init_db_and_run(
    database: str, tmp_path: Path, cli_env: dict[str, str], start_relay: StartRelay
) -> None:
    _create_table(database, "public", "outbox", DEFAULT_COLUMNS)
    _create_table(database, "other", "outbox", DEFAULT_COLUMNS)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE PUBLICATION outbox_relay FOR TABLE other.outbox WITH (publish = 'insert')")
    path = write_config(
        tmp_path, _config(database, "postgres-logical", tmp_path / "out.jsonl", tables=["outbox"])
    )
    mismatch = (
        "publication outbox_relay does not match the configured tables: it does not publish"
        " public.outbox, so their inserts would never reach the relay (run: outbox-relay init-db to"
        " add them); it publishes other.outbox, which tables: does not list, so their inserts could"
        " not be turned into events"
    )
    check = run_cli("check", "--connect", "-c", str(path), env=cli_env)
    assert check.returncode == 1, check.stdout
    assert mismatch in check.stdout, check.stdout
    init = run_cli("init-db", "-c", str(path), env=cli_env)
    assert init.returncode == 1
    assert mismatch in init.stderr
    assert len(init.stderr.splitlines()) == 1
    log = tmp_path / "relay-0.log"
    relay = start_relay(path)
    wait_for(lambda: log.exists() and mismatch in log.read_text(), 20, "the relay to refuse to start")
    relay.terminate()
    assert relay.wait(timeout=30) == 0
    # A publication that lacks a configured table only: init-db adds it.
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("ALTER PUBLICATION outbox_relay DROP TABLE other.outbox")
    init = run_cli("init-db", "-c", str(path), env=cli_env)
    _ok(init, ("init-db",))
    assert "publication outbox_relay now also publishes public.outbox" in init.stdout
    _ok(run_cli("check", "--connect", "-c", str(path), env=cli_env), ("check", "--connect"))
