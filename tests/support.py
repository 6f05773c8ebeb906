"""Helpers for tests and benchmarks: write events, build configs, read the file sink back."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from outbox_relay.assembly import build_source
from outbox_relay.config import OutboxConfig, parse_config
from outbox_relay.events import OutboxEvent
from outbox_relay.interfaces import database_source
from outbox_relay.runner import database_setup
from tests.harness.postgres import PostgresServer

REPO = Path(__file__).resolve().parents[1]


def insert_events(dsn: str, count: int, aggregates: int = 10, *, table: str = "outbox") -> None:
    """Insert `count` events spread round-robin over `aggregates` aggregates, in one statement."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {table} (aggregate_type, aggregate_id, event_type, payload, headers)"
            " SELECT 'order', 'order-' || (i %% %s), 'OrderUpdated',"
            " jsonb_build_object('seq', i, 'note', repeat('x', 64)), '{\"traceparent\": \"00-abc-01\"}'"
            " FROM generate_series(1, %s) AS i",
            (aggregates, count),
        )


def relay_config(dsn: str, sink: dict[str, Any], **source: Any) -> dict[str, Any]:
    pipeline = source.pop("pipeline", {})
    return {
        "outboxes": [
            {
                "name": "orders",
                "source": {"type": "postgres-polling", "dsn": dsn, "poll_interval": "100ms", **source},
                "sink": sink,
                "retry": {"initial": "20ms", "max": "200ms"},
                "pipeline": pipeline,
            }
        ],
        "http": {"port": 0},
        "log": {"format": "json", "level": "info"},
    }


def source_setup_sql(outbox: OutboxConfig, index: int = 0) -> tuple[str, list[sql.Composed]]:
    """The source's database and the statements that set its outbox table up (no dead-letter or
    lease table)."""
    dsn = outbox.source.database()
    assert dsn is not None, "a PostgreSQL source"
    return dsn, database_source(build_source(outbox, index), "set its table up").init_sql()


def _default_setup_sql() -> list[sql.Composed]:
    outbox = parse_config(relay_config("postgresql://unused", {"type": "stdout"}), "t.yaml", {}).outboxes[0]
    statements, _ = database_setup(outbox, build_source(outbox, 0))
    return statements


# What `init-db` runs for a default config: the outbox table, its index and trigger, and the
# dead-letter table.
DEFAULT_TABLE_SQL = _default_setup_sql()


def set_up_outbox_database(dsn: str) -> None:
    """Run in the database at `dsn` what `init-db` runs for a default config (idempotent)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in DEFAULT_TABLE_SQL:
            conn.execute(statement)


def create_outbox_database(pg: PostgresServer) -> str:
    """A fresh database on `pg` set up as `init-db` sets one up; returns its DSN."""
    dsn = pg.create_database()
    set_up_outbox_database(dsn)
    return dsn


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a file sink's file: what follows the last newline is a line
    still being written, or one a SIGKILL tore (the sink cuts it off when it starts again)."""
    if not path.exists():
        return []
    *complete, _ = path.read_text().split("\n")
    return [json.loads(line) for line in complete if line.strip()]


def assert_complete_and_ordered(delivered: Iterable[dict[str, Any]], expected_ids: set[str]) -> int:
    """Every expected event delivered at least once, and per aggregate each first delivery has a
    higher position than every earlier delivery (a repeat of an already-delivered event is a
    duplicate, allowed by at-least-once). Returns the number of duplicates."""
    seen: set[str] = set()
    last_position: dict[str, int] = defaultdict(lambda: -1)
    duplicates = 0
    for message in delivered:
        event_id, aggregate = message["event_id"], message["aggregate_id"]
        if event_id in seen:
            duplicates += 1
            continue
        seen.add(event_id)
        assert message["position"] > last_position[aggregate], (
            f"aggregate {aggregate}: position {message['position']} after {last_position[aggregate]}"
        )
        last_position[aggregate] = message["position"]
    missing = expected_ids - seen
    assert not missing, f"{len(missing)} events never delivered, e.g. {sorted(missing)[:3]}"
    return duplicates


def event_ids(dsn: str, table: str = "outbox") -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {row[0] for row in conn.execute(f"SELECT event_id::text FROM {table}")}


async def run_relay_until(
    config: dict[str, Any],
    done: Any,
    *,
    timeout: float = 30.0,
    pipelines: Any = None,
) -> Any:
    """Run a relay in this process until `done(relay)` is true (checked every 20 ms), then stop it
    gracefully. Fails the test when `timeout` passes first. Returns the relay."""
    import asyncio
    import time

    from outbox_relay.runner import Relay

    relay = Relay(parse_config(config, "test.yaml", {}), pipelines)
    task = asyncio.create_task(relay.run())
    deadline = time.monotonic() + timeout
    try:
        while not done(relay):
            if task.done():
                raise AssertionError(f"relay stopped early: {task.result()}")
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(0.02)
    finally:
        relay.stop.set()
        code = await asyncio.wait_for(task, 30)
    assert code == 0
    return relay


def unpublished(dsn: str, table: str = "outbox", *, where: str = "true") -> int:
    """Rows of the outbox (those matching the SQL condition `where`) not marked published yet."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE published_at IS NULL AND {where}").fetchone()
        return int(row[0]) if row else -1


def marked_ids(dsn: str, table: str = "outbox") -> set[str]:
    """The event ids of the rows marked published."""
    with psycopg.connect(dsn) as conn:
        return {
            r[0] for r in conn.execute(f"SELECT event_id::text FROM {table} WHERE published_at IS NOT NULL")
        }


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `condition()` until true; fail the test naming `what` after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


async def dead_letters(dsn: str, outbox: str = "orders") -> list[Any]:
    """The dead letters parked for `outbox`, as the relay's own store reads them."""
    from outbox_relay.deadletters import DeadLetterStore

    store = DeadLetterStore(dsn)
    try:
        return await store.entries(outbox)
    finally:
        await store.close()


def write_config(directory: Path, config: dict[str, Any], name: str = "relay.yaml") -> Path:
    import yaml

    path = directory / name
    path.write_text(yaml.safe_dump(config))
    return path


def start_relay(config_path: Path, *extra: str, log: Path | None = None, capture: bool = False) -> Any:
    """`outbox-relay run` as a child process; its logs go to `log` (a file, so a chatty relay can
    never block on a full pipe) or are discarded. With `capture`, its stdout and stderr are pipes
    of text instead, for `communicate()`."""
    import contextlib
    import subprocess
    import sys

    command = [sys.executable, "-m", "outbox_relay", "run", "-c", str(config_path), *extra]
    if capture:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    with log.open("ab") if log is not None else contextlib.nullcontext(subprocess.DEVNULL) as stderr:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO)


def stop_relay(relay: Any) -> None:
    """SIGTERM a relay started by `start_relay` and check that it exits 0 within 30 s."""
    import signal

    relay.send_signal(signal.SIGTERM)
    assert relay.wait(timeout=30) == 0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str) -> str:
    """The body of a GET (also of an error status); raises OSError when nothing answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as error:
        return str(error.read().decode())


def outbox_events(dsn: str) -> list[OutboxEvent]:
    """The rows now in the outbox as the polling source reads them."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT position, event_id::text, aggregate_type, aggregate_id, event_type, payload::text,"
            " headers::text, extract(epoch from created_at)::float8 FROM outbox ORDER BY position"
        ).fetchall()
    return [
        OutboxEvent(
            position=position,
            event_id=event_id,
            aggregate_type=aggregate_type,
            aggregate_id=aggregate_id,
            event_type=event_type,
            payload=payload.encode(),
            headers=json.loads(headers),
            created_at=created,
        )
        for position, event_id, aggregate_type, aggregate_id, event_type, payload, headers, created in rows
    ]


def wal_insert_position(dsn: str) -> int:
    """Where the server's WAL ends now (written or not), as a number: what any later change
    lies past."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None
    return int(row[0])


def slot_confirmed(dsn: str, slot: str = "outbox_relay") -> int:
    """The replication slot's confirmed_flush_lsn, as a number."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def pipeline_with_sink(config: dict[str, Any], sink: Any) -> Any:
    """The pipeline of the config's first outbox, with `sink` instead of the configured one."""
    from outbox_relay.assembly import build_pipeline

    return build_pipeline(parse_config(config, "t.yaml", {}).outboxes[0], 0, sink)


@contextlib.contextmanager
def login_role(dsn: str) -> Iterator[str]:
    """A role of its own that may log in (and nothing else yet), dropped afterwards."""
    role = f"relay_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        yield role
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def grant_tables(dsn: str, role: str) -> None:
    """Every privilege on the tables and sequences of schema public (the outbox, its dead-letter
    and lease tables) to `role`."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for objects in ("TABLES", "SEQUENCES"):
            conn.execute(
                sql.SQL("GRANT ALL ON ALL {} IN SCHEMA public TO {}").format(
                    sql.SQL(objects), sql.Identifier(role)
                )
            )
