"""Opening connections for the PostgreSQL sources: one place for the settings they share and
for turning a connection failure into a one-line error without the password."""

from __future__ import annotations

from typing import Any

import psycopg

from relay.interfaces import ConnectorError
from relay.secrets import scrubber


async def connect(dsn: str, timeout: float, *, replication: bool = False) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection named `outbox-relay` in pg_stat_activity; with `replication`, a
    `replication=database` connection for the streaming protocol. Raises ConnectorError."""
    extra: dict[str, Any] = {"replication": "database"} if replication else {}
    try:
        return await psycopg.AsyncConnection.connect(
            dsn,
            autocommit=True,
            connect_timeout=max(1, int(timeout)),
            application_name="outbox-relay",
            **extra,
        )
    except psycopg.Error as exc:
        raise ConnectorError(scrubber.scrub(f"cannot connect to the database: {exc}")) from None
