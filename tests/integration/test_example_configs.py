"""Every example config shipped in config/ works as shipped on an empty database: `init-db`,
`check --connect` and `run --drain` against the suite's private PostgreSQL, with the
environment variables the file reads pointed at test servers."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from outbox_relay.config import load_config
from outbox_relay.connectors.sources.outbox_table import write_events
from outbox_relay.events import OutboxEvent
from tests.conftest import run_cli
from tests.harness.postgres import PostgresServer
from tests.support import REPO, read_lines

EXAMPLES = sorted((REPO / "config").glob("*.yaml"))
EVENTS = 5


@pytest.fixture
def empty_database(pg: PostgresServer) -> Iterator[str]:
    """A database with nothing in it: no outbox table, no schema but public."""
    database = pg.create_database()
    try:
        yield database
    finally:
        pg.drop_database(database)


def example_env(database: str, tmp_path: Path) -> dict[str, str]:
    """The variables the examples read, pointed at this test's servers and files (the HTTP
    port off: parallel runs must not fight over the default one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "OUTBOX_FILE")}
    env.update(DATABASE_URL=database, OUTBOX_FILE=str(tmp_path / "out.jsonl"), RELAY_HTTP_PORT="0")
    return env


def create_application_table(example: Path, database: str, env: dict[str, str]) -> None:
    """What an example with a columns mapping asks of the application before `init-db`: its own
    table, created as `init-db --print-sql` shows (that output is run in full, as a DBA
    piping it to psql would)."""
    printed = run_cli("init-db", "--print-sql", "-c", str(example), env=env)
    assert printed.returncode == 0, printed.stderr
    if "the application's" in printed.stdout:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(printed.stdout.encode())


def write_sample_events(example: Path, env: dict[str, str]) -> set[str]:
    """Insert events into the example's outbox table through its column mapping, as an
    application would; returns their event ids."""
    (outbox,) = load_config(example, env).outboxes
    source: Any = outbox.source
    now = time.time()
    events = [
        OutboxEvent(0, str(uuid.uuid4()), "invoice", f"inv-{i % 2}", "InvoiceIssued", b'{"n": 1}', {}, now)
        for i in range(EVENTS)
    ]

    async def write() -> None:
        async with await psycopg.AsyncConnection.connect(source.dsn, autocommit=True) as conn:
            await write_events(conn, source.table_name().identifier(), source.columns.names(), events)

    asyncio.run(write())
    return {event.event_id for event in events}


def relayed_ids(example: Path, stdout: str, env: dict[str, str]) -> set[str]:
    """The event ids the example's sink received (stdout lines or the file)."""
    sink = yaml.safe_load(example.read_text())["outboxes"][0]["sink"]["type"]
    if sink == "file":
        return {line["event_id"] for line in read_lines(Path(env["OUTBOX_FILE"]))}
    assert sink == "stdout", f"{example.name}: a test for the sink {sink} is missing here"
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {line["event_id"] for line in lines if "event_id" in line}


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_config_sets_up_checks_and_relays_on_an_empty_database(
    example: Path, empty_database: str, tmp_path: Path
) -> None:
    env = example_env(empty_database, tmp_path)
    create_application_table(example, empty_database, env)
    init = run_cli("init-db", "-c", str(example), env=env)
    assert init.returncode == 0, init.stdout + init.stderr
    check = run_cli("check", "--connect", "-c", str(example), env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ok: false" not in check.stdout, check.stdout
    written = write_sample_events(example, env)
    run = run_cli("run", "--drain", "-c", str(example), env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert relayed_ids(example, run.stdout, env) == written


def test_init_db_says_a_missing_mapped_table_is_the_applications_and_how_to_create_it(
    empty_database: str, tmp_path: Path
) -> None:
    """init-db creates the default outbox table, never a table with a columns mapping: that is
    the application's (its migration would collide with one the relay made up)."""
    example = REPO / "config" / "file-sink.example.yaml"
    env = example_env(empty_database, tmp_path)
    init = run_cli("init-db", "-c", str(example), env=env)
    assert init.returncode == 1
    assert "billing.events does not exist" in init.stderr
    assert "the application's table" in init.stderr
    assert "init-db --print-sql" in init.stderr
    assert "run: outbox-relay init-db" not in init.stderr
    assert "Traceback" not in init.stderr
    check = run_cli("check", "--connect", "-c", str(example), env=env)
    database = yaml.safe_load(check.stdout)["outbox billing"]["connect"]["database"]
    assert "the application's table" in database["error"]
    assert "run: outbox-relay init-db" not in database["error"]


def test_init_db_creates_the_missing_schema_of_the_outbox_table_it_owns(
    empty_database: str, tmp_path: Path
) -> None:
    config = {
        "outboxes": [
            {
                "name": "sales",
                "source": {"type": "postgres-polling", "dsn": empty_database, "table": "sales.outbox"},
                "sink": {"type": "stdout"},
            }
        ],
        "http": {"port": 0},
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    init = run_cli("init-db", "-c", str(path), env=example_env(empty_database, tmp_path))
    assert init.returncode == 0, init.stderr
    with psycopg.connect(empty_database) as conn:
        assert conn.execute("SELECT to_regclass('sales.outbox')").fetchone() == ("sales.outbox",)


def test_logical_init_db_and_check_say_a_missing_mapped_table_is_the_applications(
    empty_database: str, tmp_path: Path
) -> None:
    columns = {"event_id": "id", "aggregate_type": "aggregatetype", "aggregate_id": "aggregateid"}
    source = {"type": "postgres-logical", "dsn": empty_database, "tables": ["debezium.outbox"]}
    config = {
        "outboxes": [
            {
                "name": "orders",
                "source": {**source, "columns": {**columns, "event_type": "type", "headers": None}},
                "sink": {"type": "stdout"},
            }
        ],
        "http": {"port": 0},
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    env = example_env(empty_database, tmp_path)
    init = run_cli("init-db", "-c", str(path), env=env)
    assert init.returncode == 1
    assert "debezium.outbox does not exist: with a columns mapping it is the application's" in init.stderr
    check = run_cli("check", "--connect", "-c", str(path), env=env)
    database = yaml.safe_load(check.stdout)["outbox orders"]["connect"]["database"]
    assert "the application's table" in database["error"]
    printed = run_cli("init-db", "--print-sql", "-c", str(path), env=env)
    assert 'CREATE TABLE IF NOT EXISTS "debezium"."outbox" (\n  "id" uuid' in printed.stdout
