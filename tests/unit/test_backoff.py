"""The one retry policy: full-jitter backoff under a cap, reset on success, a deadline with a
give-up hook."""

from __future__ import annotations

import random

import pytest

from outbox_relay.backoff import Backoff, GaveUp, Retrying


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ceilings_grow_by_the_multiplier_up_to_the_maximum() -> None:
    backoff = Backoff(initial=0.5, maximum=10.0, multiplier=2.0)
    assert [backoff.ceiling(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]


def test_a_very_late_attempt_is_capped_instead_of_overflowing() -> None:
    assert Backoff(initial=1.0, maximum=30.0, multiplier=10).ceiling(10**6) == 30.0


def test_delays_are_spread_over_the_whole_range_below_the_ceiling() -> None:
    rng = random.Random(7)
    delays = [Backoff(1.0, 8.0).delay(4, rng) for _ in range(2000)]
    assert min(delays) >= 0.0
    assert max(delays) <= 8.0
    assert min(delays) < 0.5, "full jitter reaches near zero"
    assert max(delays) > 7.5, "and near the ceiling"


def test_failures_in_a_row_grow_the_delay_and_a_success_starts_over() -> None:
    retrying = Retrying(Backoff(1.0, 100.0), rng=random.Random(1))
    for _ in range(5):
        retrying.failed(OSError("down"))
    assert retrying.failures == 5
    retrying.succeeded()
    assert retrying.failures == 0
    assert retrying.failed(OSError("down")) <= 1.0, "the first failure after a success waits at most initial"


def test_past_the_deadline_the_hook_is_told_and_the_loop_gives_up_with_the_last_error() -> None:
    clock = _Clock()
    told: list[BaseException] = []
    retrying = Retrying(Backoff(1.0, 5.0), give_up_after=30.0, on_give_up=told.append, clock=clock)
    first = OSError("first")
    retrying.failed(first)
    clock.now += 29.0
    retrying.failed(OSError("still"))
    assert told == []
    last = OSError("last")
    clock.now += 1.0
    with pytest.raises(GaveUp) as raised:
        retrying.failed(last)
    assert raised.value.__cause__ is last
    assert told == [last]


def test_a_success_restarts_the_deadline() -> None:
    clock = _Clock()
    retrying = Retrying(Backoff(1.0, 5.0), give_up_after=10.0, clock=clock)
    retrying.failed(OSError())
    clock.now += 9.0
    retrying.succeeded()
    clock.now += 5.0
    retrying.failed(OSError())
    clock.now += 9.0
    assert retrying.failed(OSError()) >= 0.0, "9 s into the new run of failures: not past 10 s"
