"""The demo's application: orders that go through their lifecycle, many at once, each step one
transaction that updates the order's row and writes its event to the outbox (as the docs of
`write_event` show), numbered per order so that the read-back can check order and gaps."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import psycopg

from outbox_relay.outbox import write_event_async

#: An order's events, in the order they happen.
LIFECYCLE = ("OrderPlaced", "OrderPaid", "OrderShipped", "OrderDelivered")
#: The demo's own outbox table: on a database given with --dsn it never touches the
#: application's outbox, and with its own NOTIFY channel and no lease, wakes no relay of the
#: application's.
DEMO_OUTBOX = "public.outbox_relay_demo"
#: The channel its NOTIFY trigger wakes the demo's relay on (not the default one of the
#: application's relay).
DEMO_OUTBOX_CHANNEL = "outbox_relay_demo"
#: Its dead-letter table, apart from the application's for the same reason.
DEMO_DEAD_LETTERS = "public.outbox_relay_demo_dead_letters"
#: The business table beside the outbox (created if missing; the demo's rows only).
ORDERS_TABLE_SQL = (
    "CREATE TABLE IF NOT EXISTS demo_orders ("
    " id text PRIMARY KEY, status text NOT NULL, amount numeric(10, 2) NOT NULL,"
    " updated_at timestamptz NOT NULL DEFAULT now())"
)
_PLACE = "INSERT INTO demo_orders (id, status, amount) VALUES (%s, %s, %s)"
_ADVANCE = "UPDATE demo_orders SET status = %s, updated_at = now() WHERE id = %s"


@dataclass
class Written:
    """What the writer committed: event_id -> (order id, sequence in its lifecycle)."""

    run_id: str
    events: dict[str, tuple[str, int]] = field(default_factory=dict)
    orders: int = 0


class OrderBook:
    """Keeps `open_orders` orders in progress and picks which one moves next, at random: their
    events interleave in the outbox, while each order's own steps stay in lifecycle order."""

    def __init__(self, run_id: str, open_orders: int = 20, seed: int | None = None) -> None:
        self._run_id = run_id
        self._random = random.Random(seed)
        self._next_number = 0
        #: order id -> the sequence number of its next event (1 = OrderPlaced)
        self._open: dict[str, int] = {}
        for _ in range(open_orders):
            self._open_one()

    def _open_one(self) -> None:
        self._next_number += 1
        self._open[f"order-{self._run_id}-{self._next_number}"] = 1

    def next_step(self) -> tuple[str, int]:
        """(order id, sequence) of the next event; an order that reaches its end is replaced."""
        order_id = self._random.choice(list(self._open))
        sequence = self._open[order_id]
        if sequence == len(LIFECYCLE):
            del self._open[order_id]
            self._open_one()
        else:
            self._open[order_id] = sequence + 1
        return order_id, sequence


async def _write_step(
    conn: psycopg.AsyncConnection[object], run_id: str, order_id: str, sequence: int, amount: float
) -> str:
    event_type = LIFECYCLE[sequence - 1]
    status = event_type.removeprefix("Order").lower()
    async with conn.transaction():
        if sequence == 1:
            await conn.execute(_PLACE, (order_id, status, amount))
        else:  # (the update locks the order's row: its events commit in order)
            await conn.execute(_ADVANCE, (status, order_id))
        payload = {"order_id": order_id, "sequence": sequence, "status": status, "amount": amount}
        trace = f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-01"
        return await write_event_async(
            conn,
            "order",
            order_id,
            event_type,
            payload,
            {"traceparent": trace, "demo_run": run_id},
            table=DEMO_OUTBOX,
        )


async def write_orders(dsn: str, rate: float, stop: asyncio.Event, written: Written) -> None:
    """Write order events at `rate` a second until `stop` is set, recording each once committed."""
    book = OrderBook(written.run_id)
    amounts: dict[str, float] = {}
    interval = 1.0 / rate
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute(ORDERS_TABLE_SQL)
        await conn.commit()
        next_at = time.monotonic()
        while not stop.is_set():
            order_id, sequence = book.next_step()
            amount = amounts.setdefault(order_id, round(random.uniform(5, 500), 2))
            event_id = await _write_step(conn, written.run_id, order_id, sequence, amount)
            written.events[event_id] = (order_id, sequence)
            if sequence == len(LIFECYCLE):
                written.orders += 1
                del amounts[order_id]
            next_at += interval
            pause = next_at - time.monotonic()
            if pause > 0:  # (at most one interval: the stop is seen soon enough)
                await asyncio.sleep(pause)
