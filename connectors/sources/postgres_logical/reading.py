"""Reading the replication stream: each frame through the decoder (what the change is) into the
ledger (which transaction its event counts in), and never past a change that cannot be read."""

from __future__ import annotations

from outbox_relay.connectors.sources import pgoutput
from outbox_relay.connectors.sources.postgres_logical.decoding import ChangeDecoder
from outbox_relay.connectors.sources.postgres_logical.errors import undecodable
from outbox_relay.connectors.sources.postgres_logical.ledger import FetchMark, Ledger
from outbox_relay.events import OutboxEvent
from outbox_relay.interfaces import ConnectorError


class ChangeReader:
    """Frames in, events out. Contract: `read` each frame in stream order; when reading fails,
    `failed` undoes what the fetch took (the stream must then be started again from the
    confirmed position); `stuck` holds the error until the stream is read past where it failed."""

    def __init__(self, decoder: ChangeDecoder, ledger: Ledger) -> None:
        self._decoder = decoder
        self._ledger = ledger
        #: Commit position of the transaction being read.
        self._commit_lsn = 0
        #: The error a change could not get past, and the commit position of its transaction:
        #: a fetch that returns nothing raises it again until a commit at or past it is read.
        self._stuck: tuple[ConnectorError, int] | None = None

    @property
    def stuck(self) -> ConnectorError | None:
        """The error of a change not read past yet (the stream sends it again), else None."""
        return None if self._stuck is None else self._stuck[0]

    def read(self, frame: bytes, events: list[OutboxEvent]) -> bool:
        """Take in one CopyData frame, adding its event (if any) to `events`. True when the
        server asks for a standby status update at once. Raises on a change it cannot read."""
        parsed = pgoutput.parse_frame(frame)
        if isinstance(parsed, pgoutput.Keepalive):
            self._ledger.keepalive(parsed.wal_end)
            return parsed.reply_requested
        if parsed is not None:
            ledger, lsn = self._ledger, parsed.wal_start
            ledger.saw(parsed.wal_end, lsn)
            message = pgoutput.decode(parsed.payload)
            # An insert, the change of almost every frame, goes to the decoder at once.
            if type(message) is pgoutput.Insert:
                event = self._decoder.insert_event(message, lsn, ledger.current)
            else:
                event = self._on_change(message, lsn)
            if event is not None:
                ledger.hand_out(events, event)
        return False

    def failed(self, exc: Exception, events: list[OutboxEvent], mark: FetchMark) -> ConnectorError:
        """A change this source cannot turn into an event: never read past it. The stream is
        started again, so the server sends everything after the confirmed position again and
        nothing is skipped; the pipeline retries, and the error stays until it is fixed. (Events
        already taken from the stream this time are handed out on the next fetch again, as they
        are sent again.) Until the transaction it failed in is read through, the source is stuck
        there, also while the stream is quiet after reconnecting. Returns the error to raise."""
        error = undecodable(exc)
        ledger = self._ledger
        self._stuck = (error, self._commit_lsn if ledger.current is not None else ledger.received)
        ledger.forget(events, mark)
        return error

    def _on_change(self, message: pgoutput.Decoded, lsn: int) -> OutboxEvent | None:
        """Take in one decoded change at `lsn` other than an insert; the event it makes, if any."""
        ledger = self._ledger
        if isinstance(message, pgoutput.Begin):
            ledger.begin()
            self._decoder.begin(message)
            self._commit_lsn = message.final_lsn
        elif isinstance(message, pgoutput.Commit):
            if self._stuck is not None and message.commit_lsn >= self._stuck[1]:
                self._stuck = None  # read through where it failed: it is fixed
            ledger.commit(message.end_lsn)
        elif isinstance(message, pgoutput.Relation):
            self._decoder.describe(message)
        elif isinstance(message, pgoutput.Message) and self._decoder.wants(message):
            unit = ledger.current
            if unit is None or not message.transactional:
                unit = ledger.lone_unit(message.lsn)
            return self._decoder.message_event(message, lsn, unit)
        return None
