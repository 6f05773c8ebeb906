"""What the logical source handed out and what it may confirm to the server.

Events are counted in their transaction (`Unit`, the events' `ack_token`), units are kept in
commit order, and the flush position confirmed to PostgreSQL only ever moves to the end of a
transaction all of whose events (and of every transaction before it) the broker acknowledged: a
restart resumes from the slot without skipping anything unacknowledged."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from outbox_relay.connectors.sources import pgoutput
from outbox_relay.events import OutboxEvent

#: (dsn, slot) -> ((system identifier, timeline), position) this process last confirmed: a source
#: built anew in the same process (a new lease term) resumes from there (see `resume_position`).
_CONFIRMED: dict[tuple[str, str], tuple[tuple[str, str], int]] = {}


class Unit:
    """One transaction (or one non-transactional message) in commit order."""

    __slots__ = ("closed", "end_lsn", "events", "first_created_at", "outstanding")

    def __init__(self) -> None:
        self.outstanding = 0
        #: Events of it handed out (acknowledged or not).
        self.events = 0
        self.closed = False
        self.end_lsn: int | None = None
        #: `created_at` of its first event: the age of the unit in `backlog()`.
        self.first_created_at: float | None = None


class FetchMark:
    """What the ledger held before a fetch, so that a failed fetch can be undone."""

    __slots__ = ("current", "units")

    def __init__(self, units: Sequence[Unit], current: Unit | None) -> None:
        self.units = set(map(id, units))
        self.current = current


class Ledger:
    """The units read and not confirmed yet, and the positions of the stream: `received`, the
    highest WAL position seen; `confirmed`, the flush position that may be confirmed; `history`,
    the (system identifier, timeline) `confirmed` is a position of."""

    def __init__(self, key: tuple[str, str], log: Any) -> None:
        #: (dsn, slot): where this process remembers what it confirmed.
        self._key = key
        self._log = log
        self.units: deque[Unit] = deque()
        #: The transaction being read; None between transactions.
        self.current: Unit | None = None
        self.received = 0
        self.confirmed = 0
        self.sent_confirmed = -1
        self.history: tuple[str, str] | None = None
        #: Events of the units not confirmed yet (see `unconfirmed`).
        self._unconfirmed = 0

    # --- the stream ----------------------------------------------------------------------------

    def resume_position(self, history: tuple[str, str], wal_end: int) -> int:
        """Where to ask the server to start (0: at the slot's own position): what this relay
        confirmed, when the server is the one it confirmed it to. A server restarted cleanly
        before PostgreSQL 17 may have saved an older position for the slot and would resend
        everything since; the server takes the later of the two positions. After a failover or
        a restore (another system or timeline) the relay's position means nothing there: the
        slot's own serves, and confirming starts over from what this stream delivers."""
        if self.history is None and self._key in _CONFIRMED:
            # A new source in a process that relayed this slot before (a new lease term after a
            # database restart): what it confirmed still holds.
            self.history, self.confirmed = _CONFIRMED[self._key]
        start = 0
        if self.history == history and self.confirmed <= wal_end:
            start = self.confirmed
        elif self.history is not None:
            self._log.warning(
                "the database does not hold the position this relay confirmed (failover, restore"
                " or lost WAL?): resuming from the replication slot's own position",
                was=f"system {self.history[0]} timeline {self.history[1]}",
                now=f"system {history[0]} timeline {history[1]} wal_end {pgoutput.format_lsn(wal_end)}",
                confirmed=pgoutput.format_lsn(self.confirmed),
            )
            self.confirmed, self.sent_confirmed = 0, -1
            for unit in self.units:  # their positions belong to the other history: confirm none
                unit.end_lsn = None
        self.history = history
        return start

    def restarted(self) -> None:
        """A new stream began. A transaction cut off by the lost connection will be sent again
        in full; its events already held are published anyway (they did commit), but it must not
        confirm anything."""
        if self.current is not None:
            self.current.closed = True
            self.current = None

    def saw(self, wal_end: int, wal_start: int) -> None:
        """The stream reached these WAL positions (those of a frame: once per change, so
        compared here, not through max())."""
        if wal_end > self.received:
            self.received = wal_end
        if wal_start > self.received:
            self.received = wal_start

    def keepalive(self, wal_end: int) -> None:
        """The server is at `wal_end` and sent nothing more."""
        self.received = max(self.received, wal_end)
        if self.current is None and not self.units:
            # Everything sent so far is acknowledged or was never ours: let the slot advance.
            self.confirmed = max(self.confirmed, wal_end)

    # --- units ---------------------------------------------------------------------------------

    def begin(self) -> None:
        """A transaction begins: its events count in a new unit."""
        self.current = Unit()
        self.units.append(self.current)

    def commit(self, end_lsn: int) -> None:
        """The transaction being read ended at `end_lsn`: once acknowledged, it may be confirmed."""
        if self.current is not None:
            self.current.closed = True
            self.current.end_lsn = end_lsn
            self.current = None
            self.release_acknowledged()

    def lone_unit(self, end_lsn: int) -> Unit:
        """A unit of its own for a non-transactional message, confirmed at its own position."""
        unit = Unit()
        unit.closed = True
        unit.end_lsn = end_lsn
        self.units.append(unit)
        return unit

    def hand_out(self, events: list[OutboxEvent], event: OutboxEvent) -> None:
        """Add `event` to what a fetch returns, counted in its unit (its `ack_token`) until
        acknowledged, and among the unconfirmed events until confirmed."""
        unit: Unit = event.ack_token
        unit.outstanding += 1
        unit.events += 1
        self._unconfirmed += 1
        if unit.first_created_at is None:
            unit.first_created_at = event.created_at
        events.append(event)

    def acknowledged(self, events: Sequence[OutboxEvent]) -> None:
        """The broker acknowledged these events: what is all acknowledged may be confirmed."""
        for event in events:
            event.ack_token.outstanding -= 1
        self.release_acknowledged()

    def release_acknowledged(self) -> None:
        """Confirm the leading units that are read to their end and all acknowledged."""
        units = self.units
        while units and units[0].closed and units[0].outstanding <= 0:
            unit = units.popleft()
            self._unconfirmed -= unit.events
            if unit.end_lsn is not None:
                self.confirmed = max(self.confirmed, unit.end_lsn)

    def mark(self) -> FetchMark:
        """What is held now, for `forget` should the fetch that begins now fail."""
        return FetchMark(self.units, self.current)

    def forget(self, events: list[OutboxEvent], mark: FetchMark) -> None:
        """Undo what a failed fetch took from the stream: the server sends it all again after
        the confirmed position. The transactions it began are dropped; the one it continued
        keeps its earlier events (handed out already) but may no longer confirm anything."""
        for event in events:
            unit = event.ack_token
            unit.outstanding -= 1
            unit.events -= 1
            self._unconfirmed -= 1
        self._unconfirmed -= sum(unit.events for unit in self.units if id(unit) not in mark.units)
        self.units = deque(unit for unit in self.units if id(unit) in mark.units)
        assert self._unconfirmed >= 0
        if mark.current is not None:
            mark.current.closed = True
            mark.current.end_lsn = None
        self.current = None

    # --- what it tells ---------------------------------------------------------------------------

    @property
    def unconfirmed(self) -> int:
        """Events of transactions not confirmed yet, acknowledged or not: a crash now sends them
        again. While the oldest of them is still being read it cannot be confirmed before its
        end, so it does not count then: reading goes on to its end, however large it is."""
        if self.units and self.units[0] is self.current:
            return 0
        return self._unconfirmed

    @property
    def status_due(self) -> bool:
        """Whether the server has not been told the position that may be confirmed yet."""
        return self.confirmed != self.sent_confirmed

    def sent(self, flushed: int) -> None:
        """The server was told `flushed`; a new source of this process resumes there."""
        self.sent_confirmed = flushed
        if self.history is not None:
            _CONFIRMED[self._key] = (self.history, flushed)

    def oldest_outstanding(self) -> float | None:
        """`created_at` of the oldest event read and not yet acknowledged: units are in commit
        order. (Events the relay has not read yet are newer; their amount shows as slot lag.)"""
        return next(
            (u.first_created_at for u in self.units if u.outstanding > 0 and u.first_created_at is not None),
            None,
        )
