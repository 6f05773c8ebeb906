"""A small application for the sidecar test, run in our image with another entrypoint
(`python /app/sidecar_app.py`), in the same pod as the relay.

Each transaction bumps one order's version (its business row) and writes the matching event with
outbox_relay.outbox.write_event: both commit together or not at all. The row lock the upsert takes
serializes one order's transactions, so each order's events commit in version order.

Environment: DATABASE_URL, EVENTS (how many), ORDERS (how many distinct orders).
"""

from __future__ import annotations

import json
import os

import psycopg

from outbox_relay.outbox import write_event

_BUMP = (
    "INSERT INTO orders (id, version) VALUES (%s, 1)"
    " ON CONFLICT (id) DO UPDATE SET version = orders.version + 1 RETURNING version"
)


def main() -> None:
    events = int(os.environ["EVENTS"])
    orders = int(os.environ["ORDERS"])
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        for n in range(events):
            order_id = f"order-{n % orders}"
            with conn.transaction():
                row = conn.execute(_BUMP, (order_id,)).fetchone()
                assert row is not None
                payload = {"order_id": order_id, "version": row[0]}
                write_event(conn, "order", order_id, "OrderVersioned", payload)
    print(json.dumps({"app": "committed", "events": events, "orders": orders}), flush=True)


if __name__ == "__main__":
    main()
