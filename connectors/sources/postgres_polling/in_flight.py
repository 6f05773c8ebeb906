"""The rows the polling source handed out and has not settled yet, and the one race that makes
the source keep them: the sweep against the acknowledgements. Pure logic, no database.

The Source contract says a fetched event is acknowledged later; it does not say that a fetch
must not hand out again an event that is already out. The reads cannot: they ask only above the
highest position read and in the gaps below it (`read_cursor`), positions no read returned yet.
The *sweep* can: it reads every unpublished row up to the highest position read, from the very
bottom (to find rows un-marked by `dlq replay`, or drawn out of order), and a row that is out
with the broker is still unpublished in the table until its acknowledgement marks it. Were it
handed out again, the broker would get it twice and its aggregate's lane would hold it twice.
So the sweep skips the positions that are out, and acknowledgements run concurrently with
fetches (on their own connection): what makes the skip exact is the order of three steps.

1. `hand_out` right after the read that returned the rows, before the source awaits anything
   else: no sweep can start in between.
2. `settled` only once the statement that marked or deleted the rows has returned (committed:
   the connections autocommit). Until then the rows are unpublished and must be skipped.
3. `skip_list` before the sweep's query is sent: the query's snapshot is then taken after the
   list. A position missing from the list was either never handed out, or settled before the
   list was made, so committed before the snapshot, which sees the row published.

An acknowledgement that fails (an error, `Fenced`) settles nothing: the rows were not marked and
the pipeline still has the events (it retries the acknowledgement), so they stay out.
"""

from __future__ import annotations

from collections.abc import Iterable


class HeldPositions:
    """Positions handed out by a fetch and not settled yet (see the module's docstring for the
    order in which the source calls these)."""

    __slots__ = ("_positions",)

    def __init__(self) -> None:
        self._positions: set[int] = set()

    def hand_out(self, positions: Iterable[int]) -> None:
        """Rows a read or a sweep returned, about to be handed to the pipeline."""
        self._positions.update(positions)

    def settled(self, positions: Iterable[int]) -> None:
        """Rows whose mark or delete has committed: a sweep may see them again only as
        published (or gone), so it no longer needs to skip them."""
        self._positions.difference_update(positions)

    def skip_list(self) -> list[int]:
        """The positions a sweep must skip; take it before sending the sweep's query."""
        return list(self._positions)

    def __contains__(self, position: object) -> bool:
        return position in self._positions

    def __len__(self) -> int:
        return len(self._positions)
