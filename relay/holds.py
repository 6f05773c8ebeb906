"""Aggregates held back in the dead-letter store, as pure bookkeeping for the pipeline.

An aggregate is held when its first event is parked there with state `held` (see
`relay.deadletters`) instead of being retried in memory. From then on, until it is released,
every event of it goes to the store behind the first one, in source order, and nothing of it is
handed to the sink by the dispatcher; one release attempt at a time publishes the first held
event and, once the broker took it, the next. An aggregate is released only when the store has
no held event of it *and* no event of it is on its way there: `generation` changes with every
event sent there, so an empty answer from the store that raced with a new event is not trusted.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Hashable

Key = Hashable


class HeldAggregates:
    """Which aggregates are held, what of them is on its way to the store, and when each one's
    next release attempt is due."""

    def __init__(self) -> None:
        self._held: set[Key] = set()
        self._on_the_way: Counter[Key] = Counter()
        self._generation: Counter[Key] = Counter()
        self._due: list[tuple[float, int, Key]] = []  # (when, tiebreak, key) heap
        self._due_at: dict[Key, float] = {}
        #: Aggregates handed out by `due` and not rescheduled or released yet: attempts under way.
        self._attempting: set[Key] = set()
        self._tiebreak = 0
        #: Failed release attempts of each held aggregate's first event, for the backoff.
        self.failures: Counter[Key] = Counter()

    def __contains__(self, key: object) -> bool:
        return key in self._held

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, key: Key, attempt_at: float) -> None:
        """Start holding `key` (no-op when held); its first release attempt is due at `attempt_at`."""
        if key not in self._held:
            self._held.add(key)
            self.attempt_at(key, attempt_at)

    def sent_to_store(self, key: Key) -> None:
        """An event of held `key` was queued for the store."""
        assert key in self._held, "only events of held aggregates go to the store as held"
        self._on_the_way[key] += 1
        self._generation[key] += 1

    def stored(self, key: Key) -> None:
        """A queued event of `key` is in the store now."""
        assert self._on_the_way[key] > 0, "stored() follows sent_to_store()"
        self._on_the_way[key] -= 1
        if not self._on_the_way[key]:
            del self._on_the_way[key]

    def generation(self, key: Key) -> int:
        """Changes whenever an event of `key` is sent to the store: read it before asking the
        store whether anything of `key` is held, pass it to `release_if_empty` after."""
        return self._generation[key]

    def release_if_empty(self, key: Key, generation: int) -> bool:
        """The store had no held event of `key` when asked after `generation` was read: release
        it unless an event of it went to the store since, or still is on its way there."""
        if self._on_the_way[key] or self._generation[key] != generation:
            return False
        self._held.discard(key)
        self._attempting.discard(key)
        self._due_at.pop(key, None)
        self._generation.pop(key, None)
        self.failures.pop(key, None)
        return True

    def attempt_at(self, key: Key, when: float) -> None:
        """(Re)schedule the next release attempt of held `key`."""
        assert key in self._held
        self._attempting.discard(key)
        self._due_at[key] = when
        self._tiebreak += 1
        heapq.heappush(self._due, (when, self._tiebreak, key))

    def due(self, now: float) -> list[Key]:
        """Held aggregates whose release attempt is due, each once; call `attempt_at` again to
        schedule the next attempt."""
        due: list[Key] = []
        while self._due and self._due[0][0] <= now:
            when, _, key = heapq.heappop(self._due)
            if self._due_at.get(key) == when:  # (not rescheduled or released since)
                del self._due_at[key]
                self._attempting.add(key)
                due.append(key)
        return due

    def settled(self, now: float) -> bool:
        """No release attempt under way or due by `now`: what `--drain` waits for. An aggregate
        whose first held event the broker just took has its next ones due at once, so a drain
        releases it to the end; one whose last attempt failed waits out its backoff past the
        drain, for the next run."""
        next_due = self.next_due()
        return not self._attempting and (next_due is None or next_due > now)

    def next_due(self) -> float | None:
        while self._due and self._due_at.get(self._due[0][2]) != self._due[0][0]:
            heapq.heappop(self._due)  # stale
        return self._due[0][0] if self._due else None
