"""The PostgreSQL sources put names from the config into statements as identifiers only."""

from __future__ import annotations

from typing import Any

from outbox_relay.assembly import build_source
from outbox_relay.config import parse_config
from outbox_relay.connectors.sources.postgres_logical import (
    _mismatch,
    _Publication,
    start_replication_command,
)
from outbox_relay.outbox import _statement
from outbox_relay.runner import database_setup


def _setup_sql(source: dict[str, Any], dead_letter_table: str = "outbox_relay_dead_letters") -> list[str]:
    config = {
        "outboxes": [
            {
                "name": "o",
                "source": {"dsn": "postgresql://unused", **source},
                "sink": {"type": "stdout"},
                "dead_letter": {"table": dead_letter_table},
            }
        ]
    }
    outbox = parse_config(config, "t.yaml", {}).outboxes[0]
    statements, _ = database_setup(outbox, build_source(outbox, 0))
    return [statement.as_string() for statement in statements]


def test_polling_init_sql_quotes_every_name_and_passes_the_channel_as_a_literal() -> None:
    statements = _setup_sql(
        {
            "type": "postgres-polling",
            "table": '"Odd.Schema"."Out ""Box""; DROP TABLE canary; --"',
            "columns": {"position": "Pos", "published_at": '"Published At"'},
        },
        dead_letter_table='"DL\'s"',
    )
    table = '"Odd.Schema"."Out ""Box""; DROP TABLE canary; --"'
    # First the application's table, as a suggestion under a comment that names nothing.
    assert statements[0].endswith('\nCREATE SCHEMA IF NOT EXISTS "Odd.Schema"')
    assert "canary" not in statements[0]
    assert statements[1].startswith(f'CREATE TABLE IF NOT EXISTS {table} (\n  "pos" bigint')
    assert statements[1].endswith('  "Published At" timestamptz\n)')
    assert statements[2] == (
        f'CREATE INDEX IF NOT EXISTS "Out ""Box""; DROP TABLE canary; --_unpublished" ON {table}'
        ' ("pos") WHERE "Published At" IS NULL'
    )
    assert statements[4] == f"DROP TRIGGER IF EXISTS outbox_relay_notify ON {table}"
    assert statements[5] == (
        f"CREATE TRIGGER outbox_relay_notify AFTER INSERT ON {table} FOR EACH STATEMENT"
        " EXECUTE FUNCTION outbox_relay_notify('outbox_relay')"
    )
    assert statements[6].startswith('CREATE TABLE IF NOT EXISTS "DL\'s" (\n')


def test_the_default_table_is_created_under_the_name_as_postgresql_reads_it() -> None:
    statements = _setup_sql({"type": "postgres-polling", "table": "Sales.OutBox"})
    assert statements[0] == 'CREATE SCHEMA IF NOT EXISTS "sales"'
    assert statements[1].startswith('CREATE TABLE IF NOT EXISTS "sales"."outbox" (\n')
    assert statements[2].startswith('CREATE INDEX IF NOT EXISTS "outbox_unpublished" ON "sales"."outbox"')
    public = _setup_sql({"type": "postgres-polling", "table": "public.outbox"})
    assert public[0].startswith('CREATE TABLE IF NOT EXISTS "public"."outbox" (\n')
    long = _setup_sql({"type": "postgres-polling", "table": "t" * 63})
    assert f'CREATE INDEX IF NOT EXISTS "{"t" * 51}_unpublished" ON "{"t" * 63}"' in long[1]
    unicode = _setup_sql({"type": "postgres-polling", "table": "é" * 31})  # 62 bytes
    assert f'CREATE INDEX IF NOT EXISTS "{"é" * 25}_unpublished" ON' in unicode[1]


def test_logical_init_sql_creates_the_publication_without_a_dollar_quoted_block() -> None:
    statements = _setup_sql(
        {
            "type": "postgres-logical",
            "tables": ["outbox", '"Odd"."Out; DROP TABLE canary"'],
            "publication": '"Pub\'; DROP TABLE canary; --"',
            "slot": "slot_1",
        }
    )
    assert statements[0].startswith('CREATE TABLE IF NOT EXISTS "outbox" (\n')
    assert statements[1] == 'CREATE SCHEMA IF NOT EXISTS "Odd"'
    assert statements[2].startswith('CREATE TABLE IF NOT EXISTS "Odd"."Out; DROP TABLE canary" (\n')
    assert statements[3] == (
        'CREATE PUBLICATION "Pub\'; DROP TABLE canary; --" FOR TABLE "outbox", "Odd"."Out; DROP TABLE canary"'
        " WITH (publish = 'insert', publish_via_partition_root = true)"
    )
    assert statements[4] == (
        "SELECT pg_create_logical_replication_slot('slot_1', 'pgoutput')"
        " WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'slot_1')"
    )
    assert not any("$$" in statement for statement in statements)
    message = _setup_sql({"type": "postgres-logical", "mode": "message", "publication": "Pub"})
    assert message[0] == "CREATE PUBLICATION \"pub\" WITH (publish = 'insert')"


def test_the_replication_command_quotes_the_publication_as_an_identifier_inside_a_literal() -> None:
    command = start_replication_command("outbox_relay", (1 << 32) + 0x10, '"It\'s a ""pub"", \\ x"')
    assert command.as_string() == (
        "START_REPLICATION SLOT \"outbox_relay\" LOGICAL 1/10 (proto_version '1',"
        " publication_names '\"It''s a \"\"pub\"\", \\ x\"', messages 'true')"
    )


def test_a_publication_mismatch_is_one_sentence_naming_both_sides() -> None:
    publication = _Publication("outbox_relay", False, True, [("other", "outbox")])
    assert _mismatch(publication, [("other", "outbox")]) is None
    assert _mismatch(publication, [("public", "OutBox")]) == (
        'publication outbox_relay does not match the configured tables: it does not publish public."OutBox",'
        " so their inserts would never reach the relay (run: outbox-relay init-db to add them); it"
        " publishes other.outbox, which tables: does not list, so their inserts could not be turned"
        " into events (add them to tables:, or ALTER PUBLICATION outbox_relay DROP TABLE them)"
    )
    everything = _Publication("Pub", True, False, [("other", "outbox"), ("public", "x")])
    sentence = _mismatch(everything, [("other", "outbox")])
    assert sentence is not None
    assert sentence.startswith(
        'publication "Pub" does not match the configured tables: it does not publish inserts'
    )
    assert "it publishes all tables (FOR ALL TABLES)" in sentence


def test_write_event_reads_its_table_name_as_the_config_does() -> None:
    assert _statement('"Odd.Schema"."Out Box"').as_string().startswith('INSERT INTO "Odd.Schema"."Out Box" (')
    assert _statement("public.OutBox").as_string().startswith('INSERT INTO "public"."outbox" (')
    assert _statement("outbox").as_string().startswith('INSERT INTO "outbox" (')
