"""Source `postgres-logical`: streams the WAL through a logical replication slot (pgoutput).

Two modes:
- `table`: INSERTs into the configured outbox table(s) become events (UPDATE/DELETE are not
  published: the publication is `publish = 'insert'`), so the insert-then-delete-in-one-transaction
  pattern works and a Debezium-style table works through `columns:`.
- `message`: `pg_logical_emit_message(true, '<prefix>', '<json>')` becomes an event; nothing is
  written to any table at all. The JSON: {"event_id", "aggregate_type", "aggregate_id",
  "event_type", "payload", "headers"} (see `relay.outbox.emit_event`).

Order is commit order; events of one transaction keep their order. `position` is the WAL
location of the change, which increases along one aggregate's events when its writers are
serialized. Acknowledgement: the flush position confirmed to PostgreSQL only ever moves to the end
of a transaction all of whose events (and of every transaction before it) the broker
acknowledged, so a restart resumes from the slot without skipping anything unacknowledged.
Memory: events are decoded as they are fetched, never a whole transaction at once; the pipeline's
window bounds what is held, the socket holds the rest (a 200,000-event transaction is streamed).

The parts: `config` (what the YAML file says), `publication` (the publication must publish
exactly the configured tables), `setup` (check and init-db), `transport` (the replication
protocol), `decoding` (changes to events), `ledger` (what is handed out, what may be
confirmed), `errors` (what failures mean), `silence` (when a stream the server says nothing
on is dead), `database` and `upkeep` (the ordinary connection and the background tasks),
`source` (the source that ties them together).
"""

from __future__ import annotations

from outbox_relay.connectors.sources.postgres_logical.config import LogicalColumns, PostgresLogicalConfig
from outbox_relay.connectors.sources.postgres_logical.database import HEARTBEAT_PREFIX
from outbox_relay.connectors.sources.postgres_logical.publication import PublicationState as _Publication
from outbox_relay.connectors.sources.postgres_logical.publication import (
    create_publication_sql,
    publication_mismatch,
    resolve_tables,
)
from outbox_relay.connectors.sources.postgres_logical.publication import describe_mismatch as _mismatch
from outbox_relay.connectors.sources.postgres_logical.source import PostgresLogicalSource
from outbox_relay.connectors.sources.postgres_logical.transport import start_replication_command
from outbox_relay.registry import SourcePlugin

__all__ = [
    "HEARTBEAT_PREFIX",
    "LogicalColumns",
    "PostgresLogicalConfig",
    "PostgresLogicalSource",
    "_Publication",
    "_mismatch",
    "create_publication_sql",
    "plugin",
    "publication_mismatch",
    "resolve_tables",
    "start_replication_command",
]

plugin = SourcePlugin(type="postgres-logical", config=PostgresLogicalConfig, factory=PostgresLogicalSource)
