"""The polling source's held positions and the race they guard: a sweep running while the
acknowledgement of rows it would find is committing. Pure, no database."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

from outbox_relay.connectors.sources.postgres_polling.in_flight import HeldPositions


def test_handed_out_positions_are_skipped_until_settled() -> None:
    held = HeldPositions()
    held.hand_out([3, 5, 8])
    assert sorted(held.skip_list()) == [3, 5, 8]
    held.settled([5])
    assert sorted(held.skip_list()) == [3, 8]
    assert 5 not in held
    assert 3 in held
    assert len(held) == 2


def test_settling_what_was_never_handed_out_changes_nothing() -> None:
    held = HeldPositions()
    held.hand_out([1])
    held.settled([2, 3])
    assert held.skip_list() == [1]


def test_an_acknowledgement_that_failed_leaves_its_positions_held() -> None:
    held = HeldPositions()
    held.hand_out([1, 2])
    # (The source calls `settled` only after the marking statement returned: a failed or fenced
    # acknowledgement never gets there.)
    assert sorted(held.skip_list()) == [1, 2]


class _Table:
    """One row, position 7, handed out and not yet marked."""

    def __init__(self) -> None:
        self.published = False


def _interleavings(first: list[str], second: list[str]) -> Iterator[list[str]]:
    """Every merge of two step sequences that keeps each one's own order."""
    steps = len(first) + len(second)
    for slots in itertools.combinations(range(steps), len(first)):
        a, b = iter(first), iter(second)
        yield [next(a) if i in slots else next(b) for i in range(steps)]


def _sweep_finds(order: list[str], ack_steps: dict[str, Callable[[HeldPositions, _Table], None]]) -> bool:
    """Whether the sweep hands out position 7 again under one interleaving of its two steps (take
    the skip list, then read from a snapshot) with the acknowledgement's steps."""
    held, table = HeldPositions(), _Table()
    held.hand_out([7])
    skip: list[int] = []
    found = False
    for step in order:
        if step == "skip_list":
            skip = held.skip_list()
        elif step == "snapshot":
            found = not table.published and 7 not in skip
        else:
            ack_steps[step](held, table)
    return found


def _commit(_held: HeldPositions, table: _Table) -> None:
    table.published = True


def _settle(held: HeldPositions, _table: _Table) -> None:
    held.settled([7])


_ACK = {"commit": _commit, "settled": _settle}


def test_no_interleaving_of_a_sweep_with_an_acknowledgement_hands_a_row_out_twice() -> None:
    orders = list(_interleavings(["skip_list", "snapshot"], ["commit", "settled"]))
    assert len(orders) == 6
    assert not any(_sweep_finds(order, _ACK) for order in orders)


def test_settling_before_the_mark_committed_would_hand_the_row_out_twice() -> None:
    # Why `settled` comes only after the statement returned: the other way round, a sweep whose
    # snapshot precedes the commit finds the row, though it is still out with the broker.
    assert _sweep_finds(["settled", "skip_list", "snapshot", "commit"], _ACK)
