"""The container path of the test harness, for real: PostgreSQL, RabbitMQ and Kafka containers
started through testcontainers where a Docker engine (or podman's API service) has the images.

Each test is skipped, with the reason, where no engine answers or its image cannot be had:
docs/test-servers.md says how to point these tests at an engine and at images of your own.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from outbox_relay.config import parse_config
from tests.conftest import consume_event_ids, controlled_postgres, kafka_message_as_line, rabbit_delivered
from tests.harness import containers
from tests.harness.docker_engine import engine_client, image_availability
from tests.harness.kafka import start_kafka
from tests.harness.postgres import PostgresServer, start_postgres
from tests.harness.rabbitmq import consistent_hash_available, declare_queue, drain_queue, start_rabbitmq
from tests.harness.server_choice import MODE_ENV_VAR
from tests.support import (
    assert_complete_and_ordered,
    create_outbox_database,
    event_ids,
    insert_events,
    read_lines,
    relay_config,
    run_relay_until,
    source_setup_sql,
    unpublished,
)


@contextmanager
def _containers_only(server: str) -> Iterator[None]:
    """RELAY_TEST_SERVERS=containers and `server` not configured; skips where no container of
    `server` can be had."""
    spec = containers.SERVERS[server]
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(spec.configured_by, raising=False)
        patch.setenv(MODE_ENV_VAR, "auto")
        choice = containers.choice_for(server)
        if choice.kind != "container":
            pytest.skip(f"no {spec.label} container can be had here: {choice.reason}")
        patch.setenv(MODE_ENV_VAR, "containers")
        yield


@pytest.fixture(scope="module")
def container_env() -> Iterator[None]:
    with _containers_only("postgres"):
        yield


@pytest.fixture(scope="module")
def container_pg(container_env: None) -> Iterator[PostgresServer]:
    with start_postgres() as server:
        yield server


def test_start_postgres_gives_a_container_with_logical_decoding_that_the_harness_does_not_control(
    container_pg: PostgresServer,
) -> None:
    assert isinstance(container_pg, containers.PostgresContainerServer), container_pg
    assert not container_pg.owned
    with psycopg.connect(container_pg.dsn) as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
    with pytest.raises(RuntimeError, match="controlled_pg"):
        container_pg.restart()


async def test_the_logical_replication_relay_delivers_every_event_from_a_container(
    container_pg: PostgresServer, tmp_path: Path
) -> None:
    dsn = create_outbox_database(container_pg)
    try:
        out = tmp_path / "out.jsonl"
        config = relay_config(dsn, {"type": "file", "path": str(out)}, type="postgres-logical", mode="table")
        source_dsn, statements = source_setup_sql(parse_config(config, "t.yaml", {}).outboxes[0])
        with psycopg.connect(source_dsn, autocommit=True) as conn:
            for statement in statements:  # what `outbox-relay init-db` does: publication, slot
                conn.execute(statement)
        insert_events(dsn, 500, aggregates=10)  # after the slot: it streams what follows it
        expected = event_ids(dsn)

        def delivered(relay: object) -> bool:
            return out.exists() and {line["event_id"] for line in read_lines(out)} >= expected

        await run_relay_until(config, delivered, timeout=60)
        assert assert_complete_and_ordered(read_lines(out), expected) >= 0
    finally:
        container_pg.drop_database(dsn)


def test_a_test_that_must_restart_postgres_gets_a_private_cluster_instead_of_the_container(
    container_pg: PostgresServer,
) -> None:
    with controlled_postgres(container_pg) as controlled:
        assert controlled is not container_pg
        assert controlled.owned
        controlled.restart()


def test_closing_a_container_server_removes_the_container(container_env: None) -> None:
    server = start_postgres()
    assert isinstance(server, containers.PostgresContainerServer)
    container_id = server._removal.container.get_wrapped_container().id
    server.close()
    remaining = [c.id for c in engine_client().containers.list(all=True)]
    assert container_id not in remaining


def test_auto_falls_back_to_a_process_naming_the_image_an_engine_cannot_have(
    container_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MODE_ENV_VAR, "auto")
    absent = f"relay-test-absent-{os.getpid()}:0"
    monkeypatch.setenv("RELAY_TEST_PG_IMAGE", absent)
    image_availability.cache_clear()
    choice = containers.choice_for("postgres")
    assert choice.kind == "process"
    assert f"image {absent} is not in the engine and cannot be pulled" in choice.reason


def test_a_rabbitmq_container_takes_what_the_relay_publishes_and_has_the_consistent_hash_exchange(
    dsn: str, tmp_path: Path
) -> None:
    with _containers_only("rabbitmq"), start_rabbitmq() as rabbit:
        assert isinstance(rabbit, containers.RabbitContainerBroker), rabbit
        assert not rabbit.controllable
        assert consistent_hash_available(rabbit.url)
        exchange, queue = f"relaytest-{tmp_path.name}.x", f"relaytest-{tmp_path.name}.q"
        declare_queue(rabbit.url, queue, exchange, "#", exchange_type="topic")
        insert_events(dsn, 200, aggregates=5)
        sink = {"type": "rabbitmq", "url": rabbit.url, "exchange": exchange, "confirm_timeout": "5s"}
        asyncio.run(run_relay_until(relay_config(dsn, sink), lambda _: unpublished(dsn) == 0, timeout=60))
        delivered = rabbit_delivered(drain_queue(rabbit.url, queue, 200))
        assert assert_complete_and_ordered(delivered, event_ids(dsn)) == 0


def test_a_kafka_container_takes_what_the_relay_publishes_and_cannot_be_paused_from_here(
    dsn: str, tmp_path: Path
) -> None:
    with _containers_only("kafka"), start_kafka() as kafka:
        assert isinstance(kafka, containers.KafkaContainerBroker), kafka
        assert not kafka.owned
        with pytest.raises(RuntimeError, match="controlled_kafka"):
            kafka.pause()
        topic = f"relaytest-{tmp_path.name}"
        kafka.create_topic(topic, partitions=2)
        insert_events(dsn, 200, aggregates=5)
        sink = {"type": "kafka", "bootstrap_servers": kafka.bootstrap_servers, "topic": topic}
        asyncio.run(run_relay_until(relay_config(dsn, sink), lambda _: unpublished(dsn) == 0, timeout=60))
        messages = consume_event_ids(kafka, topic, event_ids(dsn), timeout=20)
        delivered = [kafka_message_as_line(m) for m in messages]
        assert assert_complete_and_ordered(delivered, event_ids(dsn)) == 0
