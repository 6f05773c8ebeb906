"""The configuration of the `postgres-polling` source: the table, its column mapping, how rows
are settled after the broker acknowledged them, and how the source wakes up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from outbox_relay.connectors.sources.postgres_connect import ColumnNames, EventColumns
from outbox_relay.durations import Duration, off_or_at_least
from outbox_relay.identifiers import ColumnName, QualifiedName, TableName, parse_table_name
from outbox_relay.pgsession import Dsn, database_place
from outbox_relay.registry import Claim, ConnectorConfig


@dataclass(frozen=True, slots=True)
class PollingColumnNames(ColumnNames):
    position: str
    published_at: str | None


class ColumnMapping(EventColumns):
    """Column names of the outbox table, for schemas other than the default one. Polling also
    needs the `position` column, and `published_at` with `after_publish: mark` (it may be null
    with `after_publish: delete`)."""

    position: ColumnName = "position"
    published_at: ColumnName | None = "published_at"

    def names(self) -> PollingColumnNames:
        names: dict[str, Any] = self.server_names()
        return PollingColumnNames(**names)


class PostgresPollingConfig(ConnectorConfig):
    type: Literal["postgres-polling"]
    dsn: Dsn = Field(description="libpq connection string or postgresql:// URL.")
    table: TableName = Field(
        default="public.outbox",
        description="name or schema.name as in SQL: unquoted parts fold to lower case, double-quoted"
        " ones are kept as written; an unqualified name is looked up through the search_path.",
    )
    batch_size: int = Field(default=2000, ge=1, le=100_000, description="Rows per fetch at most.")
    poll_interval: Duration = Field(
        default=0.2,
        ge=0.01,
        description="Fallback when no NOTIFY arrives (at least 10ms: a query each time, an idle relay"
        " must not spin).",
    )
    after_publish: Literal["mark", "delete"] = "mark"
    columns: ColumnMapping = ColumnMapping()
    notify: bool = Field(default=True, description="LISTEN for the trigger that init-db installs.")
    notify_channel: str = Field(default="outbox_relay", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    query_timeout: Duration = Field(
        default=60.0,
        ge=0,
        description="A statement of the data path (read, sweep, mark or delete, backlog) the database"
        " does not answer within this long: the connection is severed and opened again (catches one"
        " a proxy or firewall holds open without forwarding). 0: off (else at least 1s).",
    )
    connect_timeout: Duration = Field(default=5.0, gt=0)

    @field_validator("query_timeout")
    @classmethod
    def _query_timeout_off_or_long(cls, value: float) -> float:
        return off_or_at_least(value, 1.0, "a shorter one would end statements that are only slow")

    def table_name(self) -> QualifiedName:
        return parse_table_name(self.table)

    def database(self) -> str:
        return self.dsn

    def lease_scope(self) -> str:
        return f"table {parse_table_name(self.table).display()}"

    def lease_resolves(self) -> str | None:
        return self.table

    def claims(self) -> list[Claim]:
        table = parse_table_name(self.table)
        return [Claim("table", database_place(self.dsn), table.schema, table.name, "table", table.display())]

    @property
    def maps_columns(self) -> bool:
        """The table has columns of its own names: the application's table, not init-db's."""
        return self.columns.names() != ColumnMapping().names()

    @property
    def marks(self) -> bool:
        """Rows are marked published (`after_publish: mark`), not deleted."""
        return self.after_publish == "mark"
