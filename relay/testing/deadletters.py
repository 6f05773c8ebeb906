"""A dead-letter store in memory: the pipeline's side of relay.deadletters.DeadLetterStore
(park, count, held aggregates, release, failures of held events), so that dead-lettering and
`on_poison: block` run without a database. The operator's side (`dlq` listing, replay, purge)
is not served."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

from outbox_relay.deadletters import DEAD, HELD, DeadLetter
from outbox_relay.events import OutboxEvent
from outbox_relay.secrets import scrubber


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _letter(outbox: str, event: OutboxEvent, error: str, permanent: bool, state: str) -> DeadLetter:
    now = datetime.now(UTC)
    return DeadLetter(
        outbox,
        event.event_id,
        event.position,
        event.aggregate_type,
        event.aggregate_id,
        event.event_type,
        bytes(event.payload),
        event.content_type,
        dict(event.headers),
        _ts(event.created_at),
        scrubber.scrub(error),
        permanent,
        event.attempts,
        _ts(event.first_failed_at or event.created_at),
        now,
        now,
        None,
        state,
        event.defect is None,
        event.rejections,
    )


class MemoryDeadLetters:
    """The pipeline's dead-letter store (`relay.parking.DeadLetterParking`) in memory: rows by
    (outbox, event_id), with the table's rules: parking is idempotent per event, a held row stays
    as it is when its event is parked again, a dead one is updated. (The operator's `dlq`
    commands work on the PostgreSQL table only.)"""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], DeadLetter] = {}
        #: Every event id ever parked, held or dead (the source may acknowledge those).
        self.ever_parked: set[str] = set()
        #: Whether the pipeline closed it (it does when its run ends).
        self.closed = False

    async def park(self, outbox: str, events: Sequence[tuple[OutboxEvent, str, bool, str]]) -> None:
        for event, error, permanent, state in events:
            self.ever_parked.add(event.event_id)
            key = (outbox, event.event_id)
            existing = self.rows.get(key)
            if existing is None or existing.state == DEAD:
                self.rows[key] = _letter(outbox, event, error, permanent, state)

    def in_state(self, outbox: str, state: str) -> list[DeadLetter]:
        """This outbox's rows in `state`, in position order."""
        rows = (row for row in self.rows.values() if row.outbox == outbox and row.state == state)
        return sorted(rows, key=lambda row: row.position)

    async def count(self, outbox: str, state: str = DEAD) -> int:
        return sum(1 for row in self.in_state(outbox, state) if row.replayed_at is None)

    async def held_aggregates(self, outbox: str) -> list[tuple[str, str | None]]:
        return list(
            dict.fromkeys((row.aggregate_type, row.aggregate_id) for row in self.in_state(outbox, HELD))
        )

    async def first_held(
        self, outbox: str, aggregate: tuple[str, str | None], limit: int = 1
    ) -> list[DeadLetter]:
        held = self.in_state(outbox, HELD)
        return [row for row in held if (row.aggregate_type, row.aggregate_id) == aggregate][:limit]

    async def release(self, outbox: str, event_ids: Sequence[str]) -> None:
        for event_id in event_ids:
            row = self.rows.get((outbox, event_id))
            if row is not None and row.state == HELD:
                del self.rows[(outbox, event_id)]

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
        row = self.rows.get((outbox, event_id))
        if row is None or row.state != HELD:
            return
        self.rows[(outbox, event_id)] = replace(
            row,
            error=scrubber.scrub(error),
            attempts=attempts,
            refusals=refusals,
            last_failed_at=datetime.now(UTC),
            state=state,
            permanent=permanent,
        )

    async def close(self) -> None:
        self.closed = True
