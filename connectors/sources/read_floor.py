"""The read floor of the polling source: the position below which every row that will ever commit
has already been read. Pure logic; the source feeds it what each read saw.

Why a floor is needed. Positions come from a sequence when a row is inserted, and transactions
commit in any order, so a row may become visible *below* positions already read (a late commit).
A reader that only asks for `position > last read` skips it forever; a reader that re-reads
everything from the start each time re-reads the whole in-flight window. The floor sits between:
each read asks for every unpublished row above the floor, skipping those it holds, in position
order. Rows between the floor and the highest position read are re-examined for late arrivals;
rows below the floor can no longer appear.

When the floor may rise. Every position up to the highest one read, `c`, was drawn before that
read's snapshot. A row at or below `c` that was not visible to the snapshot belongs to a
transaction that was still open then. Every transaction that inserts into the table holds a
RowExclusiveLock on it from before it draws its position (the INSERT takes the lock when it is
parsed, the identity default is evaluated later) until it ends. So right after the read, the
source lists the transactions holding that lock (`pg_locks`, virtual transaction ids, which exist
even before a transaction has a transaction id): every open transaction that may still commit a
row at or below `c` is in that list, or has ended between the snapshot and the listing. Once a
later listing shows none of them any more, all of them have ended before the *next* read's
snapshot, so that read sees every row at or below `c` that will ever exist, and once it has read
past `c`, the floor moves to `c`.

What this assumes, and what holds without it. Positions are drawn by the INSERT itself from a
sequence that hands out increasing values across sessions (an identity or serial column with the
default `CACHE 1`). A sequence with a larger cache, or positions chosen by the application, break
"every position up to c was drawn before the read"; the source then still never loses a row (a
periodic sweep from the very bottom finds anything below the floor) but may hand a late row out
after later rows of its aggregate.

Why per-aggregate order holds. With one aggregate's writes serialized (its row locked before its
event is written), event n of an aggregate commits before event n+1 draws its position. So any
snapshot that shows event n+1 also shows event n, with a lower position. A read returns, from one
snapshot, the lowest-positioned unpublished rows above the floor that the relay does not hold
already; so event n+1 is never handed out before event n: event n is below the floor (read
before), held (read before, in its aggregate's lane ahead of n+1), published, or in the same
read ahead of n+1.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass

MIN_POSITION = -(2**63)
#: Marks kept at most: beyond it the two oldest merge (their writers united), which can only
#: delay the floor, never raise it early.
MAX_MARKS = 64


@dataclass(slots=True)
class _Mark:
    #: The highest position read when the mark was made.
    position: int
    #: Transactions that held the table open right after that read and have not been seen ended.
    writers: set[str]


class ReadFloor:
    """Tracks the floor through a sequence of reads: `begin_read()`, the read itself (every
    unpublished row above `floor`, ascending, minus the ones held), then `end_read(...)` with what
    the read covered and the writers listed after it."""

    def __init__(self) -> None:
        self.floor = MIN_POSITION
        #: The highest position ever read.
        self.highest = MIN_POSITION
        self._marks: list[_Mark] = []
        #: A position at or below which every row that will ever commit was committed before
        #: the latest writer listing ended: reads that begin after that may raise the floor to it.
        self._settled = MIN_POSITION
        self._settled_for_read: int | None = None

    @property
    def marks(self) -> int:
        return len(self._marks)

    def begin_read(self) -> int:
        """Call right before a read's query; returns the floor to read above."""
        assert self._settled_for_read is None, "reads do not overlap"
        self._settled_for_read = self._settled
        return self.floor

    def end_read(self, covered: int | None, highest_read: int | None, writers: Set[str]) -> None:
        """After a read: `covered` is the position up to which the read saw every row (None when
        it was not cut short by its limit), `highest_read` the highest position it returned (None
        when it returned nothing), `writers` the transactions holding the table right after it."""
        settled = self._settled_for_read
        assert settled is not None, "end_read follows begin_read"
        self._settled_for_read = None
        reach = settled if covered is None else min(settled, covered)
        if reach > self.floor:
            self.floor = reach
        if highest_read is not None and highest_read > self.highest:
            self.highest = highest_read
        self._note_writers(writers)
        assert self.floor <= self.highest or self.highest == MIN_POSITION
        assert self._settled <= self.highest or self.highest == MIN_POSITION

    def abandon_read(self) -> None:
        """The read failed: nothing was learnt (its rows, if any, were not handed out)."""
        assert self._settled_for_read is not None, "abandon_read follows begin_read"
        self._settled_for_read = None

    def _note_writers(self, writers: Set[str]) -> None:
        for mark in self._marks:
            mark.writers.intersection_update(writers)
        if self.highest > self._settled and (not self._marks or self._marks[-1].position < self.highest):
            self._marks.append(_Mark(self.highest, set(writers)))
        elif self._marks and self._marks[-1].position == self.highest:
            pass  # an older mark at the same position settles no later than a new one would
        ended = [mark.position for mark in self._marks if not mark.writers]
        if ended:
            self._settled = max(self._settled, *ended)
            self._marks = [mark for mark in self._marks if mark.position > self._settled]
        while len(self._marks) > MAX_MARKS:
            first, second = self._marks[0], self._marks[1]
            self._marks[:2] = [_Mark(second.position, first.writers | second.writers)]
