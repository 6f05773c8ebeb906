"""The configuration of the `postgres-logical` source: what the YAML file may say, checked
before anything connects, and which database objects (slot, publication, tables) it claims."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from outbox_relay.connectors.sources.postgres_connect import EventColumns
from outbox_relay.durations import Duration, off_or_at_least
from outbox_relay.identifiers import Identifier, TableName, parse_identifier, parse_table_name, quote_ident
from outbox_relay.pgsession import Dsn, database_place, server_place
from outbox_relay.registry import Claim, ConnectorConfig

_MESSAGE_MODE = (
    "{key} is read in mode: table only; mode: message takes events from"
    " pg_logical_emit_message (message_prefix), not from tables: remove {key} or use mode: table"
)
#: PostgreSQL's own rule for replication slot names.
_SLOT = r"^[a-z0-9_]{1,63}$"


class LogicalColumns(EventColumns):
    """Column names in `table` mode. A Debezium-style table maps as {event_id: id,
    aggregate_type: aggregatetype, aggregate_id: aggregateid, event_type: type, headers: null,
    created_at: null}."""


class PostgresLogicalConfig(ConnectorConfig):
    type: Literal["postgres-logical"]
    dsn: Dsn = Field(description="libpq connection string or URL; the user needs REPLICATION.")
    slot: str = Field(default="outbox_relay", pattern=_SLOT, description="Lower-case letters, digits and _.")
    publication: Identifier = Field(
        default="outbox_relay", description="A name as in SQL: double-quote a mixed-case one."
    )
    mode: Literal["table", "message"] = "table"
    tables: list[TableName] = Field(
        default=["public.outbox"],
        min_length=1,
        description="name or schema.name as in SQL: unquoted parts fold to lower case, double-quoted"
        " ones are kept as written; an unqualified name is looked up through the search_path.",
    )
    message_prefix: str = Field(default="outbox", min_length=1)
    columns: LogicalColumns = LogicalColumns()
    batch_size: int = Field(default=2000, ge=1, le=100_000, description="Events per fetch at most.")
    poll_interval: Duration = Field(
        default=0.5,
        ge=0.01,
        description="Longest wait for WAL data (at least 10ms: an idle relay must not spin).",
    )
    heartbeat_interval: Duration = Field(
        default=10.0,
        ge=0,
        description="Emit a WAL message this often so an idle slot advances; 0: off (else at least 100ms:"
        " each one writes WAL).",
    )
    status_interval: Duration = Field(
        default=5.0,
        ge=0.1,
        description="Standby status updates at least this often (< wal_sender_timeout; at least 100ms).",
    )
    receive_timeout: Duration = Field(
        default=60.0,
        ge=0,
        description="A stream the server sends nothing on for this long is dead and started again"
        " from the confirmed position; at half of it the relay asks the server for a reply (like"
        " PostgreSQL's wal_receiver_timeout). Catches a connection a proxy or firewall holds open"
        " without forwarding. 0: off (else at least 1s).",
    )
    connect_timeout: Duration = Field(default=5.0, gt=0)

    # (Field validators run only for keys the file sets: the defaults of `tables` and `columns`
    # stay valid in message mode.)
    @field_validator("tables")
    @classmethod
    def _tables_once_in_table_mode(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("mode") == "message":
            raise ValueError(_MESSAGE_MODE.format(key="tables"))
        seen: dict[tuple[str | None, str], int] = {}
        for index, text in enumerate(value):
            table = parse_table_name(text)
            first = seen.setdefault((table.schema, table.name), index)
            if first != index:
                raise ValueError(
                    f"table {table.display()} is listed twice (tables[{first}] and tables[{index}])"
                )
        return value

    @field_validator("columns")
    @classmethod
    def _columns_in_table_mode(cls, value: LogicalColumns, info: ValidationInfo) -> LogicalColumns:
        if info.data.get("mode") == "message":
            raise ValueError(_MESSAGE_MODE.format(key="columns"))
        return value

    @field_validator("heartbeat_interval")
    @classmethod
    def _heartbeat_off_or_sparse(cls, value: float) -> float:
        if 0 < value < 0.1:
            raise ValueError("must be 0 (off) or at least 0.1 (100ms): each heartbeat writes WAL")
        return value

    @field_validator("receive_timeout")
    @classmethod
    def _receive_timeout_off_or_long(cls, value: float) -> float:
        return off_or_at_least(value, 1.0, "a shorter one would end a stream that is only quiet")

    @property
    def maps_columns(self) -> bool:
        """The tables have columns of their own names: the application's tables, not init-db's."""
        return self.columns.names() != LogicalColumns().names()

    def database(self) -> str:
        return self.dsn

    def lease_scope(self) -> str:
        return f"slot {self.slot}"

    def claims(self) -> list[Claim]:
        database = database_place(self.dsn)
        found = [
            Claim("replication slot", server_place(self.dsn), None, self.slot, "slot", self.slot),
            Claim(
                "publication",
                database,
                None,
                parse_identifier(self.publication),
                "publication",
                quote_ident(parse_identifier(self.publication)),
            ),
        ]
        if self.mode == "table":
            for index, text in enumerate(self.tables):
                table = parse_table_name(text)
                key = f"tables[{index}]"
                found.append(Claim("table", database, table.schema, table.name, key, table.display()))
        return found
