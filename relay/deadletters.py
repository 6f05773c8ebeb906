"""The dead-letter store: events the broker would not take, parked in the outbox's own database
where an operator can see (`dlq list/show`), replay (`dlq replay`) or purge them.

A row's `state` says what it is:
- `dead`: a poison event, dead-lettered; its aggregate moved on without it.
- `held`: an event of an aggregate that is held back in order (`dead_letter.on_poison: block`,
  or an aggregate whose first event kept failing while it held back the source's progress). The
  relay keeps retrying the first held event of each held aggregate and publishes the ones behind
  it, in position order, once it goes through; an operator may purge the first one to skip it.
  Keeping them here rather than in memory lets the source acknowledge them: the replication slot
  advances and the in-flight window stays free for the other aggregates.

An event is parked, then acknowledged to the source, so its aggregate moves on; parking is
idempotent per (outbox, event_id), so a crash between the two parks it again, not twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg import sql

from outbox_relay.events import OutboxEvent
from outbox_relay.identifiers import derived_name, parse_table_name
from outbox_relay.interfaces import ConnectorError, Unsupported
from outbox_relay.pgsession import session_conninfo, start_session
from outbox_relay.secrets import scrubber

DEFAULT_TABLE = "outbox_relay_dead_letters"
# What the relay does to dead-letter rows: park (INSERT, UPDATE), read and replay (SELECT,
# UPDATE), release held events and purge (DELETE).
_PRIVILEGES = ("INSERT", "SELECT", "UPDATE", "DELETE")


def create_table_sql(table: str = DEFAULT_TABLE) -> sql.Composed:
    """The dead-letter table's DDL; `table` is the config's name (see relay.identifiers)."""
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (\n"
        "  id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n"
        "  outbox           text        NOT NULL,\n"
        "  event_id         text        NOT NULL,\n"
        "  position         numeric     NOT NULL,\n"  # a WAL position can exceed bigint
        "  aggregate_type   text        NOT NULL,\n"
        "  aggregate_id     text,\n"
        "  event_type       text        NOT NULL,\n"
        "  payload          bytea       NOT NULL,\n"
        "  content_type     text        NOT NULL,\n"
        "  headers          jsonb       NOT NULL,\n"
        "  created_at       timestamptz NOT NULL,\n"
        "  error            text        NOT NULL,\n"
        "  permanent        boolean     NOT NULL,\n"
        "  attempts         integer     NOT NULL,\n"
        "  first_failed_at  timestamptz NOT NULL,\n"
        "  last_failed_at   timestamptz NOT NULL,\n"
        "  dead_lettered_at timestamptz NOT NULL DEFAULT now(),\n"
        "  replayed_at      timestamptz,\n"
        "  state            text        NOT NULL DEFAULT 'dead',\n"
        "  sendable         boolean     NOT NULL DEFAULT true,\n"
        "  refusals         integer     NOT NULL DEFAULT 0,\n"
        "  UNIQUE (outbox, event_id)\n"
        ")"
    ).format(parse_table_name(table).identifier())


def upgrade_table_sql(table: str = DEFAULT_TABLE) -> list[sql.Composed]:
    """What `init-db` adds to a dead-letter table made by an earlier version (idempotent)."""
    name = parse_table_name(table)
    return [
        sql.SQL(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS state text NOT NULL DEFAULT 'dead',"
            " ADD COLUMN IF NOT EXISTS sendable boolean NOT NULL DEFAULT true,"
            " ADD COLUMN IF NOT EXISTS refusals integer NOT NULL DEFAULT 0"
        ).format(name.identifier()),
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {} ON {} (outbox, aggregate_type, aggregate_id, position)"
            " WHERE state = 'held'"
        ).format(sql.Identifier(derived_name(name.name, "_held")), name.identifier()),
    ]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One parked event as stored."""

    outbox: str
    event_id: str
    position: int
    aggregate_type: str
    aggregate_id: str | None
    event_type: str
    payload: bytes
    content_type: str
    headers: dict[str, str]
    created_at: datetime
    error: str
    permanent: bool
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    dead_lettered_at: datetime
    replayed_at: datetime | None
    state: str = "dead"
    #: False for a row the relay could not turn into a message (a NULL aggregate id, invalid
    #: headers...): a held one is never published, only purged.
    sendable: bool = True
    #: Of the `attempts` (every try, outages included), those the broker refused: what
    #: `dead_letter.after_attempts` counts.
    refusals: int = 0


_COLUMNS = (
    "outbox, event_id, position, aggregate_type, aggregate_id, event_type, payload, content_type,"
    " headers, created_at, error, permanent, attempts, first_failed_at, last_failed_at,"
    " dead_lettered_at, replayed_at, state, sendable, refusals"
)
HELD = "held"
DEAD = "dead"


def _where(
    outbox: str | None, event_ids: Sequence[str], condition: str | None
) -> tuple[sql.Composed, list[Any]]:
    """The WHERE clause selecting dead letters of an outbox, some events, and one more condition."""
    conditions: list[sql.Composable] = [sql.SQL("true")]
    params: list[Any] = []
    if outbox is not None:
        conditions.append(sql.SQL("outbox = %s"))
        params.append(outbox)
    if event_ids:
        conditions.append(sql.SQL("event_id = ANY(%s)"))
        params.append(list(event_ids))
    if condition is not None:
        conditions.append(sql.SQL(condition))  # one of two constants of this module
    return sql.SQL(" AND ").join(conditions), params


def _letter(values: list[Any]) -> DeadLetter:
    values[2] = int(values[2])  # position: numeric
    values[6] = bytes(values[6])  # payload: bytea
    values[8] = dict(values[8])  # headers: jsonb
    return DeadLetter(*values)


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class _DeadLetterTable:
    """The dead-letter table over its own connection (reconnecting lazily): connecting,
    checking the setup, closing. `DeadLetterStore` adds what is read and written."""

    def __init__(self, dsn: str, table: str = DEFAULT_TABLE) -> None:
        self._dsn = dsn
        self._table = parse_table_name(table).identifier()
        self._table_name = parse_table_name(table)
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    session_conninfo(self._dsn),
                    autocommit=True,
                    connect_timeout=10,
                )
            except psycopg.Error as exc:
                raise psycopg.OperationalError(scrubber.scrub(str(exc))) from None
            try:
                await start_session(conn)
            except Unsupported:
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def check(self) -> list[str]:
        """Connect, and check that the table exists and that the session may INSERT, SELECT,
        UPDATE and DELETE its rows (what parking, holding, replay and purge do). Raises
        ConnectorError saying what is wrong; secrets masked."""
        try:
            conn = await self._connection()
            regclass, name = self._table_name.regclass_text(), self._table_name.display()
            cur = await conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL, current_setting('transaction_read_only') = 'on',"
                " current_user",
                (regclass,),
            )
            row = await cur.fetchone()
            assert row is not None
            exists, read_only, role = row
            if not exists:
                raise ConnectorError(f"table {name} does not exist (run: outbox-relay init-db)")
            if read_only:
                raise ConnectorError(
                    "the session is read-only (a standby, or default_transaction_read_only): "
                    "point dead_letter.dsn at the primary"
                )
            cur = await conn.execute(
                "SELECT privilege FROM unnest(%s::text[]) AS privilege"
                " WHERE NOT has_table_privilege(to_regclass(%s), privilege)",
                (list(_PRIVILEGES), regclass),
            )
            missing = [privilege for (privilege,) in await cur.fetchall()]
        except psycopg.Error as exc:
            raise ConnectorError(scrubber.scrub(" ".join(str(exc).split()))) from None
        finally:
            await self.close()
        if missing:
            raise ConnectorError(
                f"role {role} may not {', '.join(missing)} on table {name}: "
                f"GRANT {', '.join(_PRIVILEGES)} ON {name} TO {role}"
            )
        return [f"table {name}: {', '.join(_PRIVILEGES)} granted"]

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


class DeadLetterStore(_DeadLetterTable):
    """Reads and writes the dead-letter table over its own connection (reconnecting lazily).
    The pipeline's parking in PostgreSQL (it implements `relay.parking.DeadLetterParking`), and
    what `dlq` lists, replays and purges."""

    async def park(self, outbox: str, events: Sequence[tuple[OutboxEvent, str, bool, str]]) -> None:
        """Store (event, error, permanent, state) rows, secrets masked in the error. A row
        already `held` stays as it is (the event came again after a crash); a `dead` row is
        updated, not duplicated (a replayed event that failed again, or was held back behind its
        aggregate this time)."""
        conn = await self._connection()
        query = sql.SQL(
            "INSERT INTO {table} ("
            + _COLUMNS.rsplit(", dead_lettered_at", 1)[0]
            + ", state, sendable, refusals)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (outbox, event_id) DO UPDATE SET error = excluded.error,"
            " permanent = excluded.permanent, attempts = excluded.attempts,"
            " refusals = excluded.refusals,"
            " last_failed_at = excluded.last_failed_at, dead_lettered_at = now(), replayed_at = NULL,"
            " state = excluded.state, sendable = excluded.sendable WHERE {table}.state = 'dead'"
        ).format(table=self._table)
        rows = [
            (
                outbox,
                e.event_id,
                e.position,
                e.aggregate_type,
                e.aggregate_id,
                e.event_type,
                e.payload,
                e.content_type,
                orjson.dumps(e.headers).decode(),
                _ts(e.created_at),
                scrubber.scrub(error),
                permanent,
                e.attempts,
                _ts(e.first_failed_at or e.created_at),
                datetime.now(UTC),
                state,
                e.defect is None,
                e.rejections,
            )
            for e, error, permanent, state in events
        ]
        async with conn.transaction(), conn.cursor() as cur:
            await cur.executemany(query, rows)

    async def count(self, outbox: str, state: str = DEAD) -> int:
        """Parked events of this outbox in this state (dead ones: not replayed yet)."""
        conn = await self._connection()
        cur = await conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {} WHERE outbox = %s AND state = %s AND replayed_at IS NULL"
            ).format(self._table),
            (outbox, state),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def held_aggregates(self, outbox: str) -> list[tuple[str, str | None]]:
        """The aggregates with held events, as (aggregate_type, aggregate_id). None are held in
        a table that does not exist yet, or has no `state` column yet (init-db adds it): the
        relay runs meanwhile, and parking waits for init-db."""
        conn = await self._connection()
        try:
            cur = await conn.execute(
                sql.SQL(
                    "SELECT DISTINCT aggregate_type, aggregate_id FROM {}"
                    " WHERE outbox = %s AND state = 'held'"
                ).format(self._table),
                (outbox,),
            )
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
            return []
        return [(row[0], row[1]) for row in await cur.fetchall()]

    async def first_held(
        self, outbox: str, aggregate: tuple[str, str | None], limit: int = 1
    ) -> list[DeadLetter]:
        """The held events of this aggregate with the lowest positions, at most `limit`, in
        position order (from the index on held rows: no scan of the aggregate's held events)."""
        aggregate_type, aggregate_id = aggregate
        same_id = sql.SQL("aggregate_id IS NULL" if aggregate_id is None else "aggregate_id = %s")
        cur = await (await self._connection()).execute(
            sql.SQL(
                "SELECT " + _COLUMNS + " FROM {} WHERE outbox = %s AND state = 'held' AND aggregate_type = %s"
                " AND {} ORDER BY position LIMIT %s"
            ).format(self._table, same_id),
            (outbox, aggregate_type, *([] if aggregate_id is None else [aggregate_id]), limit),
        )
        return [_letter(list(row)) for row in await cur.fetchall()]

    async def release(self, outbox: str, event_ids: Sequence[str]) -> None:
        """These held events reached the broker: they are not parked any more."""
        conn = await self._connection()
        await conn.execute(
            sql.SQL("DELETE FROM {} WHERE outbox = %s AND event_id = ANY(%s) AND state = 'held'").format(
                self._table
            ),
            (outbox, list(event_ids)),
        )

    async def note_failure(
        self,
        outbox: str,
        event_id: str,
        error: str,
        attempts: int,
        refusals: int,
        state: str = HELD,
        permanent: bool = False,
    ) -> None:
        """A held event failed again: record why and how often (tries, and refusals among them);
        with `state` dead it is dead-lettered (its aggregate moves on to the next held event)."""
        conn = await self._connection()
        await conn.execute(
            sql.SQL(
                "UPDATE {} SET error = %s, attempts = %s, refusals = %s, last_failed_at = now(),"
                " state = %s, permanent = %s WHERE outbox = %s AND event_id = %s AND state = 'held'"
            ).format(self._table),
            (scrubber.scrub(error), attempts, refusals, state, permanent, outbox, event_id),
        )

    async def entries(
        self, outbox: str | None = None, event_ids: Sequence[str] = (), include_replayed: bool = True
    ) -> list[DeadLetter]:
        conn = await self._connection()
        where, params = _where(outbox, event_ids, None if include_replayed else "replayed_at IS NULL")
        query = sql.SQL("SELECT " + _COLUMNS + " FROM {} WHERE {} ORDER BY outbox, position").format(
            self._table, where
        )
        cur = await conn.execute(query, params)
        return [_letter(list(row)) for row in await cur.fetchall()]

    async def mark_replayed(self, outbox: str, event_id: str) -> None:
        conn = await self._connection()
        await conn.execute(
            sql.SQL("UPDATE {} SET replayed_at = now() WHERE outbox = %s AND event_id = %s").format(
                self._table
            ),
            (outbox, event_id),
        )

    async def purge(self, outbox: str | None, event_ids: Sequence[str], replayed_only: bool) -> list[str]:
        """Delete these dead letters for good; returns the ids of the events deleted."""
        conn = await self._connection()
        where, params = _where(outbox, event_ids, "replayed_at IS NOT NULL" if replayed_only else None)
        cur = await conn.execute(
            sql.SQL("DELETE FROM {} WHERE {} RETURNING event_id").format(self._table, where), params
        )
        return [row[0] for row in await cur.fetchall()]


def as_event(letter: DeadLetter) -> OutboxEvent:
    """The parked event again, as a source would have produced it (for replay)."""
    return OutboxEvent(
        letter.position,
        letter.event_id,
        letter.aggregate_type,
        letter.aggregate_id,
        letter.event_type,
        letter.payload,
        letter.headers,
        letter.created_at.timestamp(),
        content_type=letter.content_type,
    )
