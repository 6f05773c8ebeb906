"""Source `postgres-polling`: reads the outbox table in `position` order, marks or deletes rows
after the broker acknowledged them, and wakes on NOTIFY so latency is not bound to the poll interval.

Reading order and late commits. Positions come from a sequence, so a transaction can commit a
row whose position is *lower* than rows already read (it drew its position first and committed
later). Each read asks, in one snapshot, for the lowest-positioned unpublished rows above the
highest position read and in the *gaps* below it: positions not seen yet that an open
transaction may still commit, forgotten once no such transaction is left (see `read_cursor`,
which argues why). So a late row is handed out no later than any row of its aggregate written
after it: with one aggregate's writes serialized (its row locked first, as the README asks),
per-aggregate order holds whatever the interleaving and however late a commit is. A sweep from
the very bottom, whenever the relay has caught up (at most every `poll_interval`), finds rows
that reappear elsewhere below the cursor (`dlq replay` un-marks a row; a sequence with a cache
hands out positions out of order): nothing committed is ever skipped. The rows handed out and not
yet marked are skipped by that sweep (`in_flight` says why and how exactly).

The parts: `config` (the YAML), `source` (the Source), `queries`, `inspection`, `rows`,
`in_flight`, `listener`, `ddl`.
"""

from __future__ import annotations

# (default_table_ddl: its import path from before it served both sources.)
from outbox_relay.connectors.sources.outbox_table import default_table_ddl
from outbox_relay.connectors.sources.postgres_polling.config import (
    ColumnMapping,
    PollingColumnNames,
    PostgresPollingConfig,
)
from outbox_relay.connectors.sources.postgres_polling.source import PostgresPollingSource
from outbox_relay.registry import SourcePlugin

__all__ = [
    "ColumnMapping",
    "PollingColumnNames",
    "PostgresPollingConfig",
    "PostgresPollingSource",
    "default_table_ddl",
    "plugin",
]

plugin = SourcePlugin(type="postgres-polling", config=PostgresPollingConfig, factory=PostgresPollingSource)
