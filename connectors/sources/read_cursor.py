"""The read cursor of the polling source: the highest position read, and the *gaps* below it:
positions never read that a transaction may still commit. Pure logic; the source feeds it what
each read returned and which transactions were writing.

Why gaps. Positions come from a sequence when a row is inserted, and transactions commit in any
order, so a row may become visible *below* positions already read (a late commit). A reader that
only asks for `position > highest read` skips it forever; one that re-reads everything from an
older point re-reads every row published since. So each read asks, from one snapshot, for the
unpublished rows in the gaps and above the highest position read, lowest positions first. With a
sequence that counts up by its increment, a gap appears only where a position was not visible
to a read: a transaction still open then, or one that rolled back.

When a gap can be forgotten. Every position up to the highest one read was drawn before that
read's snapshot. A position in a gap that was not visible to the snapshot belongs to a
transaction that was still open then, or to none that will ever commit. Every transaction that
inserts into the table holds a RowExclusiveLock on it from before it draws its position (the
INSERT takes the lock when it is parsed, the identity default is evaluated later) until it ends.
So right after a read that made gaps, the source lists the transactions holding that lock
(`pg_locks`, virtual transaction ids, which exist even before a transaction has a transaction
id): every open transaction that may still commit a row in those gaps is in that list, or ended
between the snapshot and the listing. Once a later listing shows none of them, all of them have
ended before the *next* read's snapshot, so that read sees every row the gaps will ever hold;
once it has covered them, they are forgotten. While the gaps are there, only they are read again
(an index probe each), never the rows published around them, however long a transaction stays
open. With no gaps (a backlog, one writer) nothing is listed and a read is a plain
`position > highest` read.

What this assumes, and what holds without it. Positions are drawn by the INSERT itself from a
sequence that hands out increasing values across sessions (an identity or serial column with the
default `CACHE 1`). A sequence with a larger cache, or positions chosen by the application, break
"every position up to the highest read was drawn before the read"; the source then still never
loses a row (a periodic sweep from the very bottom finds anything below the cursor that is not
in a gap) but may hand a late row out after later rows of its aggregate.

Why per-aggregate order holds. With one aggregate's writes serialized (its row locked before its
event is written), event n of an aggregate commits before event n+1 draws its position. So any
snapshot that shows event n+1 also shows event n, with a lower position. A read returns, from one
snapshot, the lowest-positioned unpublished rows in the gaps and above the highest position
read; event n is then in a gap or above the highest position (so in the same read, ahead of
n+1), or it was read before (held in its aggregate's lane ahead of n+1, or published).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass, field

MIN_POSITION = -(2**63)


@dataclass(eq=False, slots=True)
class _Mark:
    """The gaps one read made, and the transactions that were writing right after it."""

    writers: set[str] = field(default_factory=set)
    listed: bool = False
    settled: bool = False


@dataclass(slots=True)
class _Gap:
    first: int
    last: int
    mark: _Mark


class ReadCursor:
    """The highest position read and the gaps below it, through a sequence of reads:
    `begin_read()` (the gaps and the position to read above), the read, `end_read(...)` with the
    positions it returned; then, when `wants_writers`, `note_writers(...)` with the transactions
    holding the table right after it."""

    def __init__(self, step: int = 1) -> None:
        assert step >= 1
        #: The sequence's increment: consecutive positions further apart than it leave a gap.
        self.step = step
        self.highest = MIN_POSITION
        self._gaps: list[_Gap] = []
        #: The marks settled when the current read began (the objects, not their ids: an id
        #: can be reused by a new mark once an old one is gone).
        self._settled_before_read: set[_Mark] | None = None

    @property
    def gaps(self) -> list[tuple[int, int]]:
        """The gaps, as (first, last) positions, ascending."""
        return [(gap.first, gap.last) for gap in self._gaps]

    @property
    def wants_writers(self) -> bool:
        """Whether some gap waits for the transactions that may fill it to end."""
        return any(not gap.mark.settled for gap in self._gaps)

    def begin_read(self) -> tuple[int, list[tuple[int, int]]]:
        """Call right before a read's query; returns the position to read above, and the gaps
        to read too."""
        assert self._settled_before_read is None, "reads do not overlap"
        self._settled_before_read = {gap.mark for gap in self._gaps if gap.mark.settled}
        return self.highest, self.gaps

    def abandon_read(self) -> None:
        """The read failed: nothing was learnt (its rows, if any, were not handed out)."""
        assert self._settled_before_read is not None, "abandon_read follows begin_read"
        self._settled_before_read = None

    def end_read(self, returned: Sequence[int], cut_short: bool) -> None:
        """After a read: `returned`, the positions it returned in ascending order; `cut_short`
        when its limit stopped it (it then saw every row up to its last one only)."""
        settled = self._settled_before_read
        assert settled is not None, "end_read follows begin_read"
        self._settled_before_read = None
        assert not returned or returned[0] <= returned[-1], "ascending"
        split = bisect.bisect_right(returned, self.highest)
        if split:
            self.took(returned[:split])
        new = returned[split:]
        # (A run of consecutive positions, the common case, leaves no gap: no need to walk it.)
        if new and new[-1] - self.highest != len(new) * self.step:
            mark = _Mark()
            previous = self.highest
            for position in new:
                if position - previous > self.step:
                    self._gaps.append(_Gap(previous + 1, position - 1, mark))
                previous = position
        if new:
            self.highest = new[-1]
        # Gaps whose writers had all ended before this read began, and that it covered, hold
        # nothing more: whatever they will ever hold, it returned.
        covered = (returned[-1] if returned else MIN_POSITION) if cut_short else None
        self._gaps = [
            gap
            for gap in self._gaps
            if not (gap.mark in settled and (covered is None or gap.last <= covered))
        ]
        assert all(a.last < b.first for a, b in itertools.pairwise(self._gaps))
        assert not self._gaps or self._gaps[-1].last < self.highest

    def took(self, positions: Iterable[int]) -> None:
        """These positions were handed out (by a read, or a sweep from the bottom): they are no
        gap any more."""
        for position in positions:
            index = bisect.bisect_right(self._gaps, position, key=lambda gap: gap.first) - 1
            if index < 0 or self._gaps[index].last < position:
                continue
            gap = self._gaps[index]
            pieces = [
                _Gap(first, last, gap.mark)
                for first, last in ((gap.first, position - 1), (position + 1, gap.last))
                if first <= last
            ]
            self._gaps[index : index + 1] = pieces

    def note_writers(self, writers: Set[str]) -> None:
        """The transactions holding the table's RowExclusiveLock, listed right after a read (see
        the module docstring): a gap's writers are those of the first listing after the read that
        made it, less every one a later listing no longer shows."""
        for mark in {gap.mark for gap in self._gaps}:
            if mark.settled:
                continue
            if mark.listed:
                mark.writers.intersection_update(writers)
            else:
                mark.writers, mark.listed = set(writers), True
            mark.settled = not mark.writers
