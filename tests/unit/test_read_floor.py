from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from connectors.sources.read_floor import MAX_MARKS, MIN_POSITION, ReadFloor


def test_a_fresh_floor_reads_from_the_very_bottom() -> None:
    floor = ReadFloor()
    assert floor.begin_read() == MIN_POSITION


def test_without_open_writers_the_floor_reaches_a_read_one_read_later() -> None:
    floor = ReadFloor()
    floor.begin_read()
    floor.end_read(None, 10, set())
    # A transaction may have committed a row below 10 between the read's snapshot and the
    # listing: only the next read is sure to see it.
    assert floor.begin_read() == MIN_POSITION
    floor.end_read(None, 12, set())
    assert floor.begin_read() == 10


def test_an_open_writer_keeps_the_floor_below_what_was_read_until_it_is_seen_ended() -> None:
    floor = ReadFloor()
    floor.begin_read()
    floor.end_read(None, 10, {"3/7"})
    for highest in (11, 12):
        floor.begin_read()
        floor.end_read(None, highest, {"3/7", "4/1"})
        assert floor.floor == MIN_POSITION
    floor.begin_read()
    floor.end_read(None, 13, {"4/1"})  # 3/7 ended: everything up to 10 is settled for the next read
    assert floor.floor == MIN_POSITION
    floor.begin_read()
    floor.end_read(None, 13, set())
    assert floor.floor == 10


def test_a_read_cut_short_by_its_limit_raises_the_floor_only_to_what_it_covered() -> None:
    floor = ReadFloor()
    floor.begin_read()
    floor.end_read(None, 100, set())
    floor.begin_read()
    floor.end_read(covered=40, highest_read=100, writers=set())
    assert floor.floor == 40
    floor.begin_read()
    floor.end_read(None, 100, set())
    assert floor.floor == 100


def test_a_failed_read_teaches_nothing() -> None:
    floor = ReadFloor()
    floor.begin_read()
    floor.end_read(None, 10, {"1/1"})
    floor.begin_read()
    floor.abandon_read()
    floor.begin_read()
    floor.end_read(None, 10, {"1/1"})
    floor.begin_read()
    floor.end_read(None, 10, set())
    assert floor.floor == MIN_POSITION  # 1/1 was seen ended only by the last listing


def test_reads_do_not_overlap() -> None:
    floor = ReadFloor()
    floor.begin_read()
    with pytest.raises(AssertionError):
        floor.begin_read()


def test_marks_stay_bounded_while_a_writer_stays_open_and_merging_never_raises_the_floor_early() -> None:
    floor = ReadFloor()
    for position in range(1, 1000):
        floor.begin_read()
        floor.end_read(None, position, {"1/1", f"9/{position}"})
        assert floor.marks <= MAX_MARKS
        assert floor.floor == MIN_POSITION
    floor.begin_read()
    floor.end_read(None, 1000, set())
    floor.begin_read()
    floor.end_read(None, 1000, set())
    assert floor.floor == 1000


# --- a model of the database: the floor's promise under random interleavings -------------------


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


def _simulate(seed: int, listed_writers: bool = True) -> list[str]:
    """Reads against the model; returns every broken promise: a row that can still commit at or
    below the floor, or a committed row at or below it that no read returned."""
    rng = random.Random(seed)
    db = _Database(rng)
    floor = ReadFloor()
    held: set[int] = set()
    returned: set[int] = set()
    problems: list[str] = []
    for _ in range(150):
        db.steps(6)
        above = floor.begin_read()
        snapshot = set(db.committed)
        limit = rng.randrange(1, 6)
        rows = sorted(p for p in snapshot if p > above and p not in returned)[:limit]
        db.steps(2)  # transactions end between the snapshot and the listing
        writers = set(db.open) if listed_writers else set()
        covered = rows[-1] if len(rows) == limit else None
        floor.end_read(covered, max(rows, default=None), writers)
        held.update(rows)
        returned.update(rows)
        held.difference_update(rng.sample(sorted(held), k=len(held) // 2))  # some get acknowledged
        for name, positions in db.open.items():
            if any(p <= floor.floor for p in positions):
                problems.append(f"seed {seed}: {name} may still commit at or below floor {floor.floor}")
        missed = {p for p in db.committed if p <= floor.floor} - returned
        if missed:
            problems.append(
                f"seed {seed}: committed {sorted(missed)[:3]} at or below {floor.floor} never read"
            )
    return problems


def test_under_random_interleavings_no_row_can_commit_or_hide_below_the_floor() -> None:
    problems = [p for seed in range(300) for p in _simulate(seed)]
    assert problems == []


def test_the_model_catches_a_floor_that_ignores_open_writers() -> None:
    assert any(_simulate(seed, listed_writers=False) for seed in range(50))
