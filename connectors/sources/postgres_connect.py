"""Opening connections for the PostgreSQL sources: one place for the settings they share and
for turning a connection failure into a one-line error without the password; and the column
mapping both sources read from their config. (What they do with the table itself is in
`outbox_table`, how its rows become events in `row_events`.)"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from pydantic import BaseModel, ConfigDict

from outbox_relay.identifiers import ColumnName, parse_identifier
from outbox_relay.interfaces import ConnectorError, Unsupported
from outbox_relay.pgsession import session_conninfo, start_session
from outbox_relay.secrets import scrubber


@dataclass(frozen=True, slots=True)
class ColumnNames:
    """The mapped columns by the server's names (the config's text parsed as PostgreSQL reads
    it): what statements put in `sql.Identifier` and what is compared with the table's columns."""

    event_id: str
    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload: str
    headers: str | None
    created_at: str | None

    def mapping(self) -> dict[str, str | None]:
        return asdict(self)


class EventColumns(BaseModel):
    """Where an outbox table keeps each field of an event. `headers` and `created_at` may be
    null when the table has no such column. Names follow PostgreSQL's syntax: unquoted ones are
    folded to lower case, write a mixed-case name with its double quotes (`'"EventId"'`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    event_id: ColumnName = "event_id"
    aggregate_type: ColumnName = "aggregate_type"
    aggregate_id: ColumnName = "aggregate_id"
    event_type: ColumnName = "event_type"
    payload: ColumnName = "payload"
    headers: ColumnName | None = "headers"
    created_at: ColumnName | None = "created_at"

    def server_names(self) -> dict[str, str | None]:
        """Each key's column as the server names it (None where the config says null)."""
        return {
            key: None if text is None else parse_identifier(text) for key, text in self.model_dump().items()
        }

    def names(self) -> ColumnNames:
        names: dict[str, Any] = self.server_names()
        return ColumnNames(**names)


async def connect(dsn: str, timeout: float, *, replication: bool = False) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection named `outbox-relay` in pg_stat_activity, with the relay's
    session settings (relay.pgsession: UTF-8, ISO dates in UTC, hex bytea); with `replication`,
    a `replication=database` connection for the streaming protocol. Raises ConnectorError, and
    Unsupported for a database the relay cannot serve."""
    extra: dict[str, Any] = {"replication": "database"} if replication else {}
    try:
        conn = await psycopg.AsyncConnection.connect(
            session_conninfo(dsn),
            autocommit=True,
            connect_timeout=max(1, int(timeout)),
            **extra,
        )
    except psycopg.Error as exc:
        raise ConnectorError(scrubber.scrub(f"cannot connect to the database: {exc}")) from None
    try:
        await start_session(conn)
    except Unsupported:
        await conn.close()
        raise
    return conn
