from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from outbox_relay.connectors.sources.read_cursor import MIN_POSITION, ReadCursor


def _read(cursor: ReadCursor, returned: list[int], writers: set[str], cut_short: bool = False) -> None:
    cursor.begin_read()
    cursor.end_read(returned, cut_short)
    if cursor.wants_writers:
        cursor.note_writers(writers)


def test_a_fresh_cursor_reads_from_the_very_bottom_with_no_gaps() -> None:
    assert ReadCursor().begin_read() == (MIN_POSITION, [])


def test_consecutive_positions_leave_no_gap_and_need_no_listing_of_writers() -> None:
    cursor = ReadCursor()
    _read(cursor, [1, 2, 3], set())
    _read(cursor, [], set())  # the gap below 1 is settled and covered now
    _read(cursor, [4, 5], set())
    assert cursor.begin_read() == (5, [])
    assert not cursor.wants_writers


def test_a_position_not_seen_is_a_gap_until_its_writers_ended_and_a_read_covered_it() -> None:
    cursor = ReadCursor()
    _read(cursor, [1, 2], set())
    _read(cursor, [], set())
    _read(cursor, [3, 5, 6], {"4/9"})  # 4 is open in 4/9
    assert cursor.gaps == [(4, 4)]
    _read(cursor, [7], {"4/9", "5/1"})
    assert cursor.gaps == [(4, 4)]
    _read(cursor, [], {"5/1"})  # 4/9 ended (committed 4 or not): the next read sees 4 if it exists
    assert cursor.gaps == [(4, 4)]
    _read(cursor, [4], {"5/1"})
    assert cursor.gaps == []
    assert cursor.begin_read() == (7, [])


def test_a_late_row_read_from_a_gap_splits_it() -> None:
    cursor = ReadCursor()
    _read(cursor, [1], set())
    _read(cursor, [], set())
    _read(cursor, [2, 9], {"1/1"})
    assert cursor.gaps == [(3, 8)]
    _read(cursor, [5], {"1/1"})
    assert cursor.gaps == [(3, 4), (6, 8)]


def test_a_read_cut_short_forgets_only_the_gaps_it_covered() -> None:
    cursor = ReadCursor()
    _read(cursor, [1], set())
    _read(cursor, [], set())
    _read(cursor, [3, 6, 9], {"1/1"})  # gaps 2, 4-5, 7-8
    _read(cursor, [], set())
    cursor.begin_read()
    cursor.end_read([10, 11], cut_short=True)  # (saw up to 11: every gap below it)
    assert cursor.gaps == []
    cursor = ReadCursor()
    _read(cursor, [1], set())
    _read(cursor, [], set())
    _read(cursor, [3, 6, 9], {"1/1"})
    _read(cursor, [], set())
    cursor.begin_read()
    cursor.end_read([2, 4], cut_short=True)  # stopped at 4: the gaps above it stay
    assert cursor.gaps == [(5, 5), (7, 8)]


def test_a_new_gap_is_kept_when_the_read_that_makes_it_fills_the_last_gap_of_a_settled_read() -> None:
    """The settled mark of the gap it fills may be freed before the new gap's mark is made: the
    new mark must not pass for the settled one (an object id reused)."""
    for _ in range(50):
        cursor = ReadCursor()
        _read(cursor, [1], set())
        _read(cursor, [], set())
        _read(cursor, [3], {"1/1"})  # gap 2
        _read(cursor, [], set())  # 1/1 ended: settled
        _read(cursor, [2, 5], {"2/2"})  # fills 2, makes gap 4 (2/2 may commit it)
        assert cursor.gaps == [(4, 4)]


def test_the_sequence_increment_is_no_gap() -> None:
    cursor = ReadCursor(step=10)
    _read(cursor, [10, 20, 30, 50], {"1/1"})
    assert cursor.gaps[-1] == (31, 49)


def test_a_failed_read_teaches_nothing() -> None:
    cursor = ReadCursor()
    _read(cursor, [1, 3], {"1/1"})
    cursor.begin_read()
    cursor.abandon_read()
    assert (2, 2) in cursor.gaps


def test_reads_do_not_overlap() -> None:
    cursor = ReadCursor()
    cursor.begin_read()
    with pytest.raises(AssertionError):
        cursor.begin_read()


def test_a_long_open_writer_keeps_only_its_own_gaps_however_much_is_read_meanwhile() -> None:
    cursor = ReadCursor()
    _read(cursor, [1], set())
    _read(cursor, [], set())
    _read(cursor, [3], {"long/1"})  # 2 belongs to a transaction that stays open
    for start in range(4, 10_000, 100):
        _read(cursor, list(range(start, start + 100)), {"long/1"})
    assert cursor.gaps == [(2, 2)]


# --- a model of the database: the cursor's promise under random interleavings -------------------


@dataclass
class _Database:
    """Transactions take the table lock when they begin (before drawing any position), draw
    increasing positions, then commit or roll back, in any order."""

    rng: random.Random
    next_position: int = 1
    next_xact: int = 1
    open: dict[str, list[int]] = field(default_factory=dict)
    committed: set[int] = field(default_factory=set)

    def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.35 or not self.open:
            name = f"{self.rng.randrange(8)}/{self.next_xact}"
            self.next_xact += 1
            self.open[name] = []
        elif roll < 0.75:
            name = self.rng.choice(list(self.open))
            self.open[name].append(self.next_position)
            self.next_position += 1
        else:
            name = self.rng.choice(list(self.open))
            positions = self.open.pop(name)
            if self.rng.random() < 0.8:
                self.committed.update(positions)

    def steps(self, most: int) -> None:
        for _ in range(self.rng.randrange(most + 1)):
            self.step()


def _in_gaps(position: int, gaps: list[tuple[int, int]]) -> bool:
    return any(first <= position <= last for first, last in gaps)


def _simulate(seed: int, listed_writers: bool = True) -> list[str]:
    """Reads against the model; returns every broken promise: a row that can still commit at or
    below the highest position read outside every gap, or a committed one there never read."""
    rng = random.Random(seed)
    db = _Database(rng)
    cursor = ReadCursor()
    returned: set[int] = set()
    problems: list[str] = []
    for _ in range(150):
        db.steps(6)
        above, gaps = cursor.begin_read()
        snapshot = set(db.committed)
        limit = rng.randrange(1, 6)
        wanted = (p for p in snapshot if p not in returned and (p > above or _in_gaps(p, gaps)))
        rows = sorted(wanted)[:limit]
        db.steps(2)  # transactions end between the snapshot and the listing
        writers = set(db.open) if listed_writers else set()
        cursor.end_read(rows, cut_short=len(rows) == limit)
        if cursor.wants_writers:
            cursor.note_writers(writers)
        returned.update(rows)
        gaps = cursor.gaps
        for name, positions in db.open.items():
            if any(p <= cursor.highest and not _in_gaps(p, gaps) for p in positions):
                problems.append(f"seed {seed}: {name} may still commit outside the gaps")
        missed = {p for p in db.committed if p <= cursor.highest and not _in_gaps(p, gaps)} - returned
        if missed:
            problems.append(f"seed {seed}: committed {sorted(missed)[:3]} outside the gaps never read")
    return problems


def test_under_random_interleavings_no_row_can_commit_or_hide_outside_the_gaps() -> None:
    problems = [p for seed in range(300) for p in _simulate(seed)]
    assert problems == []


def test_the_model_catches_a_cursor_that_ignores_open_writers() -> None:
    assert any(_simulate(seed, listed_writers=False) for seed in range(50))
