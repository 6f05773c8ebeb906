"""Fixtures shared by the integration tests: a real PostgreSQL (private cluster with
wal_level=logical, or RELAY_TEST_PG_DSN), one fresh database per test, a Kafka-protocol broker
(private tansu, or KAFKA_BOOTSTRAP_SERVERS), and small helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.harness.kafka import ConsumedMessage, KafkaBroker, start_kafka
from tests.harness.postgres import PostgresServer, start_postgres
from tests.harness.rabbitmq import RabbitBroker, start_rabbitmq
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


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaBroker]:
    """A Kafka-protocol broker for the whole run: a private tansu, or KAFKA_BOOTSTRAP_SERVERS."""
    pytest.importorskip("confluent_kafka")
    broker = start_kafka()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitBroker]:
    """RabbitMQ for the whole run: RELAY_TEST_AMQP_URL, the node on 127.0.0.1:5672, or a private node."""
    pytest.importorskip("pika")
    broker = start_rabbitmq()
    try:
        yield broker
    finally:
        broker.close()


def _as_line(headers: dict[str, str], body: bytes | None) -> dict[str, Any]:
    """A broker message in the shape of a file-sink line (`tests.support.read_lines`): the
    standard headers as fields, `position` as int, `headers` as str, `payload` parsed JSON."""
    line: dict[str, Any] = {
        name: headers[name]
        for name in ("event_id", "event_type", "aggregate_type", "aggregate_id", "created_at")
    }
    line["position"] = int(headers["position"])
    line["headers"] = headers
    line["payload"] = json.loads(body or b"null")
    return line


def rabbit_message_as_line(message: dict[str, Any]) -> dict[str, Any]:
    return _as_line({k: str(v) for k, v in message["headers"].items()}, message["body"])


def kafka_message_as_line(message: ConsumedMessage) -> dict[str, Any]:
    return _as_line({name: (value or b"").decode() for name, value in message["headers"]}, message["value"])
