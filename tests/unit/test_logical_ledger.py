"""The logical source's ledger: the confirmed position moves only to the end of a transaction
whose events, and every earlier transaction's, were all acknowledged; a failed fetch is undone."""

from __future__ import annotations

import logging

from outbox_relay.connectors.sources.postgres_logical.ledger import Ledger
from outbox_relay.events import OutboxEvent


def _ledger() -> Ledger:
    return Ledger(("postgresql://unused", "ledger_test"), logging.getLogger("test"))


def _hand_out(ledger: Ledger, fetched: list[OutboxEvent], position: int) -> OutboxEvent:
    """An event of the transaction being read, handed out into `fetched`."""
    event = OutboxEvent(position, f"e{position}", "order", "1", "Created", b"{}", {}, 1.0)
    event.ack_token = ledger.current
    ledger.hand_out(fetched, event)
    return event


def _transaction(ledger: Ledger, count: int, end_lsn: int) -> list[OutboxEvent]:
    """Read a whole transaction of `count` events ending at `end_lsn`; its events."""
    fetched: list[OutboxEvent] = []
    ledger.begin()
    for offset in range(count):
        _hand_out(ledger, fetched, end_lsn - count + offset)
    ledger.commit(end_lsn)
    return fetched


def test_the_confirmed_position_waits_for_every_earlier_transaction() -> None:
    ledger = _ledger()
    first = _transaction(ledger, 2, end_lsn=100)
    second = _transaction(ledger, 1, end_lsn=200)
    assert ledger.unconfirmed == 3
    ledger.acknowledged(second)
    assert ledger.confirmed == 0, "an earlier transaction is not acknowledged yet"
    ledger.acknowledged(first[:1])
    assert ledger.confirmed == 0, "part of a transaction confirms nothing"
    ledger.acknowledged(first[1:])
    assert ledger.confirmed == 200
    assert ledger.unconfirmed == 0
    assert ledger.status_due


def test_a_transaction_still_being_read_does_not_count_as_unconfirmed() -> None:
    ledger = _ledger()
    ledger.begin()
    _hand_out(ledger, [], 1)
    assert ledger.unconfirmed == 0, "reading goes on to the end of the transaction"
    ledger.commit(50)
    assert ledger.unconfirmed == 1


def test_a_failed_fetch_is_undone_and_the_transaction_it_continued_confirms_nothing() -> None:
    ledger = _ledger()
    ledger.begin()
    earlier = [_hand_out(ledger, [], 1)]
    mark = ledger.mark()
    failed: list[OutboxEvent] = []
    _hand_out(ledger, failed, 2)
    ledger.commit(300)
    failed += _transaction(ledger, 1, end_lsn=400)
    ledger.forget(failed, mark)
    assert ledger.current is None
    assert ledger.unconfirmed == 1, "only the event handed out before the failed fetch is held"
    ledger.acknowledged(earlier)
    assert ledger.confirmed == 0, "the continued transaction is sent again in full: it confirms nothing"
    assert ledger.unconfirmed == 0


def test_keepalives_advance_the_confirmed_position_only_with_nothing_outstanding() -> None:
    ledger = _ledger()
    fetched = _transaction(ledger, 1, end_lsn=100)
    ledger.keepalive(500)
    assert (ledger.received, ledger.confirmed) == (500, 0)
    ledger.acknowledged(fetched)
    ledger.keepalive(600)
    assert ledger.confirmed == 600
