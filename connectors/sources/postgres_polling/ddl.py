"""The DDL of `init-db` for the polling source: the default outbox table (`outbox_table`, shared
with the logical replication source), the partial index of unpublished rows, and the NOTIFY
trigger."""

from __future__ import annotations

from psycopg import sql

from outbox_relay.connectors.sources.outbox_table import application_table_sql, default_table_ddl, schema_sql
from outbox_relay.connectors.sources.postgres_polling.config import PostgresPollingConfig
from outbox_relay.identifiers import QualifiedName, derived_name

# Fixed text: the channel comes as the trigger's argument, the table name from the server.
_NOTIFY_FUNCTION = sql.Composed(
    [
        sql.SQL(
            "CREATE OR REPLACE FUNCTION outbox_relay_notify() RETURNS trigger LANGUAGE plpgsql AS $$\nBEGIN\n"
            "  PERFORM pg_notify(TG_ARGV[0], TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);\n"
            "  RETURN NULL;\nEND\n$$"
        )
    ]
)


def init_statements(
    config: PostgresPollingConfig, existing: QualifiedName | None = None, *, create_schema: bool = True
) -> list[sql.Composed]:
    """The DDL of `init-db`; on `existing`, the table the configured name finds, when given
    (it is then not created). Without it, the default table is created (in its schema, with
    `create_schema`), and for a table with a columns mapping the statements start with the
    application's table, as a suggestion (init-db refuses to go on without that table)."""
    cols = config.columns.names()
    configured = config.table_name()
    name = existing or configured
    table = name.identifier()
    statements: list[sql.Composed] = []
    if existing is None and config.maps_columns:
        statements.extend(application_table_sql(configured, {"position": cols.position, **cols.mapping()}))
    elif existing is None:
        statements.extend(schema_sql(configured) if create_schema else [])
        statements.append(default_table_ddl(configured))
    if cols.published_at and config.marks:
        statements.append(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({}) WHERE {} IS NULL").format(
                sql.Identifier(derived_name(name.name, "_unpublished")),
                table,
                sql.Identifier(cols.position),
                sql.Identifier(cols.published_at),
            )
        )
    if config.notify:
        statements.extend(
            [
                _NOTIFY_FUNCTION,
                sql.SQL("DROP TRIGGER IF EXISTS outbox_relay_notify ON {}").format(table),
                # One notification per inserting statement: cheap even for bulk inserts.
                sql.SQL(
                    "CREATE TRIGGER outbox_relay_notify AFTER INSERT ON {} FOR EACH STATEMENT"
                    " EXECUTE FUNCTION outbox_relay_notify({})"
                ).format(table, sql.Literal(config.notify_channel)),
            ]
        )
    return statements
