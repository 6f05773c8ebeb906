"""How the commands that read the database (`status`, `dlq`) say what it answered."""

from __future__ import annotations

import psycopg

from outbox_relay.cli.common import database_error


def test_a_missing_table_names_init_db_as_the_fix() -> None:
    said = database_error(
        psycopg.errors.UndefinedTable('relation "outbox_relay_dead_letters" does not exist')
    )
    assert said.endswith("(run: outbox-relay init-db)")


def test_a_missing_database_or_role_does_not_send_the_user_to_init_db() -> None:
    for error in (
        psycopg.OperationalError('connection failed: FATAL:  database "shop" does not exist'),
        psycopg.OperationalError('connection failed: FATAL:  role "relay" does not exist'),
    ):
        said = database_error(error)
        assert "does not exist" in said
        assert "init-db" not in said
