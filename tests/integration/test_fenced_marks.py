"""The polling source under a lease marks rows only while the lease's token is its own, in the
same statement (a real PostgreSQL). Proves the fence by itself: no deadline passes and no
session is ended here, only the token in the lease row changes."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import pytest

from outbox_relay.config import parse_config
from outbox_relay.interfaces import Fenced
from outbox_relay.leadership import lease_key
from tests.support import insert_events, relay_config, unpublished


@dataclass
class _Term:
    """A lease term that never runs out: only the token decides."""

    table: str
    key: str
    token: int

    def valid(self) -> bool:
        return True


async def test_an_ack_whose_token_is_no_longer_the_leases_marks_nothing_and_says_fenced(dsn: str) -> None:
    from outbox_relay.assembly import build_source

    insert_events(dsn, 5)
    outbox = parse_config(relay_config(dsn, {"type": "stdout"}), "t.yaml", {}).outboxes[0]
    key = lease_key("orders", "table public.outbox")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox_relay_leases (lease, outbox, holder, token, expires_at)"
            " VALUES (%s, 'orders', 'test pid 1 aaaa', 7, now() + interval '1 hour')",
            (key,),
        )
    source = build_source(outbox, 0)
    source.fence_with(_Term('"public"."outbox_relay_leases"', key, 7))
    await source.start()
    try:
        events = await source.fetch(10)
        await source.ack(events[:2])  # the token is its own: marked
        assert unpublished(dsn) == 3
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE outbox_relay_leases SET token = 8, holder = 'test pid 2 bbbb'")
        with pytest.raises(Fenced):
            await source.ack(events[2:])
        assert unpublished(dsn) == 3, "a holder whose token is not the lease's marked rows"
    finally:
        await source.close()
