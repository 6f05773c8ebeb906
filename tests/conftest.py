"""Fixtures shared by the integration tests: a real PostgreSQL (private cluster with
wal_level=logical, or RELAY_TEST_PG_DSN), one fresh database per test, and small helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.harness.postgres import PostgresServer, start_postgres
from tests.support import DEFAULT_TABLE_SQL


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def dsn(pg: PostgresServer) -> Iterator[str]:
    """A fresh database with the default outbox table, NOTIFY trigger included."""
    database = pg.create_database()
    with psycopg.connect(database, autocommit=True) as conn:
        for statement in DEFAULT_TABLE_SQL:
            conn.execute(statement)  # type: ignore[call-overload]
    try:
        yield database
    finally:
        pg.drop_database(database)


@pytest.fixture
def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
