"""`outbox-relay demo`: an embedded PostgreSQL, sample order events written continuously,
relayed to stdout, and a progress line (rate and lag) on stderr once a second."""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
import warnings
from typing import Any

import psycopg

from outbox_relay.config import parse_config
from outbox_relay.logs import configure_logging
from outbox_relay.outbox import write_event_async
from outbox_relay.runner import Relay, build_pipelines, database_setup

_STATUSES = ("OrderPlaced", "OrderPaid", "OrderShipped", "OrderDelivered")


def _embedded_postgres() -> tuple[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR in containers
            import pgserver
    except ImportError:
        print(
            "outbox-relay demo: the embedded PostgreSQL needs: pip install 'outbox-relay[demo]'"
            " (or pass --dsn / DATABASE_URL)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    data_dir = tempfile.mkdtemp(prefix="outbox-relay-demo-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(data_dir, cleanup_mode="delete")  # type: ignore[attr-defined]
    return str(server.get_uri()), server


async def _write_orders(dsn: str, rate: int, stop: asyncio.Event, counter: list[int]) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        interval = 1.0 / max(rate, 1)
        next_at = time.monotonic()
        order = 0
        while not stop.is_set():
            order += 1
            order_id = f"order-{order % 100}"
            async with conn.transaction():
                await write_event_async(
                    conn,
                    "order",
                    order_id,
                    _STATUSES[order % len(_STATUSES)],
                    {"order_id": order_id, "amount": round(random.uniform(5, 500), 2)},
                    {"traceparent": f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-01"},
                )
            counter[0] += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def _progress(relay: Relay, counter: list[int], stop: asyncio.Event) -> None:
    pipeline = relay.pipelines[0]
    last_published, last_time = 0, time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(1.0)
        now = time.monotonic()
        rate = (pipeline.published - last_published) / (now - last_time)
        last_published, last_time = pipeline.published, now
        try:
            lag = f"{(await pipeline.source.backlog()).oldest_age_seconds:.3f}s"
        except Exception:
            lag = "?"
        print(
            f"demo: written={counter[0]} published={pipeline.published} rate={rate:.0f}/s lag={lag}",
            file=sys.stderr,
            flush=True,
        )


async def _demo(dsn: str, rate: int, duration: float) -> int:
    config = parse_config(
        {
            "outboxes": [
                {
                    "name": "orders",
                    "source": {"type": "postgres-polling", "dsn": dsn},
                    "sink": {"type": "stdout"},
                }
            ],
            "http": {"port": 0},
            "log": {"format": "console", "level": "warning"},
        },
        file="(demo)",
    )
    configure_logging(config.log.format, config.log.level)
    pipelines = build_pipelines(config)
    # The outbox table and the dead-letter table, as `init-db` creates them.
    statements, _ = database_setup(config.outboxes[0], pipelines[0].source)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            await conn.execute(statement)
    relay = Relay(config, pipelines)
    counter = [0]
    writer = asyncio.create_task(_write_orders(dsn, rate, relay.stop, counter))
    progress = asyncio.create_task(_progress(relay, counter, relay.stop))
    if duration:
        asyncio.get_running_loop().call_later(duration, relay.stop.set)
    print(
        f"demo: writing {rate} order events/s into the outbox, relaying them to stdout; Ctrl-C stops",
        file=sys.stderr,
    )
    try:
        return await relay.run()
    finally:
        relay.stop.set()
        await asyncio.gather(writer, progress, return_exceptions=True)


def run_demo(dsn: str | None, rate: int, duration: float) -> int:
    server = None
    if dsn is None:
        dsn, server = _embedded_postgres()
    try:
        return asyncio.run(_demo(dsn, rate, duration))
    except KeyboardInterrupt:
        return 0
    finally:
        if server is not None:
            server.cleanup()
