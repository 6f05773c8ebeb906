"""START_REPLICATION while another stream still holds the slot (the previous lease holder's,
ending): the logical source waits for the slot under the one retry policy, then starts, or
gives up after its deadline with an error that says who holds the slot; real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
import uuid

import psycopg
import pytest

from outbox_relay.connectors.sources.postgres_logical import PostgresLogicalConfig, setup
from outbox_relay.connectors.sources.postgres_logical.transport import ReplicationStream
from outbox_relay.interfaces import ConnectorError


def _config(dsn: str) -> PostgresLogicalConfig:
    """A config of its own slot, with the slot and the publication created."""
    config = PostgresLogicalConfig(type="postgres-logical", dsn=dsn, slot=f"t_{uuid.uuid4().hex[:12]}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in setup.init_sql(config):
            conn.execute(statement)
    return config


async def _streaming(config: PostgresLogicalConfig) -> ReplicationStream:
    stream = await ReplicationStream.open(config)
    await stream.start(config, 0)
    return stream


async def test_a_slot_let_go_within_the_wait_is_streamed(dsn: str) -> None:
    config = _config(dsn)
    holder = await _streaming(config)
    waiting = await ReplicationStream.open(config)

    async def let_go() -> None:
        await asyncio.sleep(0.5)
        await holder.close()

    release = asyncio.create_task(let_go())
    try:
        await waiting.start(config, 0)
    finally:
        await release
        await waiting.close()


async def test_a_slot_held_past_the_wait_is_refused_saying_who_holds_it(dsn: str) -> None:
    config = _config(dsn)
    holder = await _streaming(config)
    waiting = await ReplicationStream.open(config)
    started = time.monotonic()
    try:
        with pytest.raises(ConnectorError, match="is in use by another process"):
            await waiting.start(config, 0)
        assert time.monotonic() - started >= 2.0, "gave up before the slot release wait was over"
    finally:
        await waiting.close()
        await holder.close()
