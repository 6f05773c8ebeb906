"""The SQL of the polling source, built once the table was inspected: from its resolved name, the
column mapping, the payload's type and (under a lease) the fence. Nothing from the config is
ever SQL text: names are identifiers, values are parameters."""

from __future__ import annotations

from typing import Literal

from psycopg import sql

from outbox_relay.connectors.sources.outbox_table import ResolvedTable
from outbox_relay.connectors.sources.postgres_polling.config import PollingColumnNames
from outbox_relay.identifiers import parse_table_name
from outbox_relay.interfaces import Fence

QueryName = Literal["read", "read_gaps", "sweep", "ack", "backlog"]
Queries = dict[QueryName, sql.Composed]

# Transactions that may still insert rows: those holding the table's RowExclusiveLock (granted;
# a prepared transaction holds it with no pid), except the relay's own connections.
WRITERS = sql.SQL(
    "SELECT DISTINCT virtualtransaction FROM pg_locks WHERE locktype = 'relation'"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND relation = %s AND mode = 'RowExclusiveLock' AND granted"
    " AND (pid IS NULL OR pid <> ALL(%s::int4[]))"
)


def build_queries(
    table: ResolvedTable,
    cols: PollingColumnNames,
    *,
    marks: bool,
    payload_is_bytes: bool,
    fence: Fence | None,
) -> Queries:
    """Every query `PostgresPollingSource._run` runs by name. `marks`: rows are marked published
    (`after_publish: mark`), else deleted."""
    pos = sql.Identifier(cols.position)
    unpublished = _unpublished(cols, marks)
    base = sql.SQL("SELECT {select} FROM {table} WHERE {unpublished} AND {pos} ").format(
        select=_event_columns(cols, payload_is_bytes),
        table=table.identifier(),
        unpublished=unpublished,
        pos=pos,
    )
    return {
        **_read_queries(base, pos),
        "ack": _ack_query(table, cols, marks, fence),
        "backlog": _backlog_query(table, cols, unpublished),
    }


def _text_column(name: str) -> sql.Composable:
    return sql.SQL("{}::text").format(sql.Identifier(name))


def _event_columns(cols: PollingColumnNames, payload_is_bytes: bool) -> sql.Composable:
    """The select list, in the order `rows.to_events` unpacks it."""
    payload = sql.Identifier(cols.payload) if payload_is_bytes else _text_column(cols.payload)
    created = (
        sql.SQL("extract(epoch from {})::float8").format(sql.Identifier(cols.created_at))
        if cols.created_at
        else sql.SQL("extract(epoch from now())::float8")
    )
    return sql.SQL(", ").join(
        [
            sql.SQL("{}::int8").format(sql.Identifier(cols.position)),
            _text_column(cols.event_id),
            _text_column(cols.aggregate_type),
            _text_column(cols.aggregate_id),
            _text_column(cols.event_type),
            payload,
            _text_column(cols.headers) if cols.headers else sql.SQL("NULL::text"),
            created,
        ]
    )


def _unpublished(cols: PollingColumnNames, marks: bool) -> sql.Composable:
    if cols.published_at and marks:
        return sql.SQL("{} IS NULL").format(sql.Identifier(cols.published_at))
    return sql.SQL("true")


def _read_queries(base: sql.Composed, pos: sql.Identifier) -> dict[QueryName, sql.Composed]:
    """The read, the read with the gaps, and the sweep (see `read_cursor` and `in_flight`)."""
    # The table's own columns come first in the gaps' subquery: a column named like the gap's
    # fields cannot be mistaken for them. Each gap is an index probe (OFFSET 0 keeps the planner
    # from turning the probes into a scan of the whole table), merged in position order.
    in_gaps = sql.SQL(
        "SELECT r.* FROM unnest(%s::int8[], %s::int8[]) AS outbox_relay_gap(first, last),"
        " LATERAL ({base} BETWEEN outbox_relay_gap.first AND outbox_relay_gap.last OFFSET 0) AS r"
    ).format(base=base)
    return {
        # Above the highest position read, lowest first: the read while there is no gap.
        "read": base + sql.SQL("> %s ORDER BY {} LIMIT %s").format(pos),
        # The same, with the rows in the gaps (first, last).
        "read_gaps": sql.SQL(
            "SELECT * FROM (({in_gaps} ORDER BY 1 LIMIT %s) UNION ALL ({base} > %s ORDER BY {pos} LIMIT %s))"
            " AS rows ORDER BY 1 LIMIT %s"
        ).format(in_gaps=in_gaps, base=base, pos=pos),
        # Everything up to a position, unpublished and not held: the sweep. (`= ANY` of a
        # constant array is hashed by PostgreSQL 14 and later; the sweep is never prepared.)
        "sweep": base + sql.SQL("<= %s AND NOT ({} = ANY(%s::int8[])) ORDER BY {} LIMIT %s").format(pos, pos),
    }


def _ack_query(
    table: ResolvedTable, cols: PollingColumnNames, marks: bool, fence: Fence | None
) -> sql.Composed:
    """Mark or delete rows by position (parameter: the positions; under a fence, first the
    lease's key and token, and the query returns whether the token was still this relay's)."""
    pos = sql.Identifier(cols.position)
    if marks:
        assert cols.published_at is not None  # (checked when the source is made)
        ack = sql.SQL("UPDATE {} SET {} = now() WHERE {} = ANY(%s)").format(
            table.identifier(), sql.Identifier(cols.published_at), pos
        )
    else:
        ack = sql.SQL("DELETE FROM {} WHERE {} = ANY(%s)").format(table.identifier(), pos)
    if fence is None:
        return ack
    # Under a lease, rows are marked only while the lease's token is this relay's, in the same
    # statement: a holder that lost the lease marks nothing, and says so.
    return sql.SQL(
        "WITH fence AS (SELECT FROM {lease} WHERE lease = %s AND token = %s),"
        " acked AS ({ack} AND EXISTS (SELECT FROM fence) RETURNING NULL)"
        " SELECT EXISTS (SELECT FROM fence)"
    ).format(lease=parse_table_name(fence.table).identifier(), ack=ack)


def _backlog_query(
    table: ResolvedTable, cols: PollingColumnNames, unpublished: sql.Composable
) -> sql.Composed:
    # The age of the first pending row by position: one index probe, where min(created_at)
    # read every pending row's heap tuple each stats round (a million with a big backlog).
    oldest = (
        sql.SQL(
            "COALESCE((SELECT CASE WHEN isfinite({created})"
            " THEN extract(epoch from now() - {created})::float8 END"
            " FROM {table} WHERE {unpublished} ORDER BY {pos} LIMIT 1), 0)"
        ).format(
            created=sql.Identifier(cols.created_at),
            table=table.identifier(),
            unpublished=unpublished,
            pos=sql.Identifier(cols.position),
        )
        if cols.created_at
        else sql.SQL("0::float8")
    )
    return sql.SQL("SELECT count(*), {} FROM {} WHERE {}").format(oldest, table.identifier(), unpublished)


def unmark_query(table: ResolvedTable, cols: PollingColumnNames) -> sql.Composed:
    """Un-mark one row (parameters: its position, its event id), for `dlq replay`. Found by
    position, the key, then checked by event id: a text comparison of the event id alone would
    read the whole table."""
    assert cols.published_at is not None
    return sql.SQL("UPDATE {} SET {} = NULL WHERE {} = %s AND {}::text = %s").format(
        table.identifier(),
        sql.Identifier(cols.published_at),
        sql.Identifier(cols.position),
        sql.Identifier(cols.event_id),
    )


def published_last_minute_query(table: ResolvedTable, published_at: str) -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM {} WHERE {} > now() - interval '1 minute'").format(
        table.identifier(), sql.Identifier(published_at)
    )
