"""Where a lease lives: one placement rule for `init-db` and the relay, and the lease key."""

from __future__ import annotations

import pytest

from outbox_relay.assembly import build_source
from outbox_relay.config import parse_config
from outbox_relay.identifiers import QualifiedName
from outbox_relay.leadership import lease_key, lease_table_in
from outbox_relay.runner import database_setup


@pytest.mark.parametrize(
    ("table", "schema", "expected"),
    [
        ("outbox_relay_leases", "app", QualifiedName("app", "outbox_relay_leases")),
        ("outbox_relay_leases", None, QualifiedName(None, "outbox_relay_leases")),
        ("ops.leases", "app", QualifiedName("ops", "leases")),
        ('"Mixed"', "app", QualifiedName("app", "Mixed")),
    ],
)
def test_an_unqualified_lease_table_lives_in_the_outbox_tables_schema(
    table: str, schema: str | None, expected: QualifiedName
) -> None:
    assert lease_table_in(table, schema) == expected


def test_init_db_creates_the_lease_table_where_the_rule_puts_it() -> None:
    config = parse_config(
        {
            "outboxes": [
                {
                    "name": "orders",
                    "source": {"type": "postgres-polling", "dsn": "postgresql://h/db", "table": "app.outbox"},
                    "sink": {"type": "stdout"},
                }
            ]
        }
    )
    outbox = config.outboxes[0]
    statements, _ = database_setup(outbox, build_source(outbox, 0))
    created = [s.as_string() for s in statements if "outbox_relay_leases" in s.as_string()]
    assert len(created) == 1
    assert created[0].startswith('CREATE TABLE IF NOT EXISTS "app"."outbox_relay_leases" (')


def test_the_lease_key_differs_by_what_the_outbox_reads() -> None:
    assert lease_key("orders", "table app.outbox") != lease_key("orders", "table ops.outbox")
    assert lease_key("orders", "table app.outbox").startswith("orders/")
