from __future__ import annotations

from outbox_relay.backoff import Backoff
from outbox_relay.events import OutboxEvent
from outbox_relay.lanes import Lanes


def _event(position: int, aggregate: str) -> OutboxEvent:
    return OutboxEvent(position, f"e{position}", "order", aggregate, "T", b"{}", {}, 0.0)


def test_only_the_head_of_each_aggregate_is_handed_out() -> None:
    lanes = Lanes()
    a1, a2, b1 = _event(1, "a"), _event(2, "a"), _event(3, "b")
    lanes.add([a1, a2, b1])
    assert lanes.take(10, now=0) == [a1, b1]
    assert lanes.take(10, now=0) == []
    lanes.succeeded(a1)
    assert lanes.take(10, now=0) == [a2]
    assert len(lanes) == 2


def test_a_failed_event_holds_back_only_its_own_aggregate_until_its_retry_time() -> None:
    lanes = Lanes()
    a1, a2, b1, b2 = _event(1, "a"), _event(2, "a"), _event(3, "b"), _event(4, "b")
    lanes.add([a1, a2, b1, b2])
    lanes.take(10, now=0)
    lanes.failed(a1, retry_at=5)
    lanes.succeeded(b1)
    assert lanes.take(10, now=1) == [b2]
    assert lanes.blocked_lanes == 1
    assert lanes.next_retry_at() == 5
    assert lanes.take(10, now=5) == [a1]  # the same event again, never a2 before it
    lanes.succeeded(a1)
    assert lanes.take(10, now=5) == [a2]


def test_take_respects_the_limit_and_keeps_arrival_order_of_lanes() -> None:
    lanes = Lanes()
    events = [_event(i, f"agg{i}") for i in range(5)]
    lanes.add(events)
    assert lanes.take(3, now=0) == events[:3]
    assert lanes.take(3, now=0) == events[3:]


def test_backoff_grows_exponentially_to_its_cap_with_full_jitter() -> None:
    backoff = Backoff(initial=0.1, maximum=2.0, multiplier=2.0)
    assert [backoff.ceiling(n) for n in (1, 2, 3, 4, 5, 6)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    assert backoff.ceiling(10_000) == 2.0
    delays = [backoff.delay(3) for _ in range(200)]
    assert all(0 <= d <= 0.4 for d in delays)
    assert max(delays) - min(delays) > 0.1  # jittered, not a constant


def test_a_backoff_ceiling_that_would_overflow_a_float_is_the_maximum_not_an_overflow_error() -> None:
    huge = Backoff(initial=0.1, maximum=30.0, multiplier=1e200)
    assert [huge.ceiling(n) for n in (1, 2, 3, 100)] == [0.1, 30.0, 30.0, 30.0]
    doubling = Backoff(initial=0.1, maximum=30.0, multiplier=2)  # (an int: no big-integer power)
    assert doubling.ceiling(10**9) == 30.0
    assert 0.0 <= huge.delay(5) <= 30.0


def test_with_depth_a_lane_hands_out_its_next_events_in_order_and_only_once_all_are_settled() -> None:
    lanes = Lanes()
    a = [_event(i, "a") for i in range(1, 6)]
    b1 = _event(6, "b")
    lanes.add([*a, b1])
    assert lanes.take(10, now=0, depth=3) == [a[0], a[1], a[2], b1]
    lanes.succeeded(a[0])
    lanes.succeeded(a[1])
    assert lanes.take(10, now=0, depth=3) == [], "a[3] waits until a[2] is settled too"
    lanes.succeeded(a[2])
    assert lanes.take(10, now=0, depth=3) == [a[3], a[4]]


def test_a_failure_takes_back_the_later_events_of_its_lane_and_retries_from_the_failed_one() -> None:
    lanes = Lanes()
    a = [_event(i, "a") for i in range(1, 5)]
    lanes.add(a)
    assert lanes.take(10, now=0, depth=4) == a
    lanes.succeeded(a[0])
    lanes.failed(a[1], retry_at=5)  # a[2] and a[3] go back behind it, whatever they returned
    assert lanes.take(10, now=1, depth=4) == []
    assert lanes.take(10, now=5, depth=4) == [a[1]], "a retry goes out alone: no copies behind it"
    lanes.failed(a[1], retry_at=6)
    assert lanes.take(10, now=6, depth=4) == [a[1]]
    lanes.succeeded(a[1])
    assert lanes.take(10, now=6, depth=4) == [a[2], a[3]]
    assert len(lanes) == 2


def test_a_held_event_keeps_its_lane_out_until_it_is_settled_alone() -> None:
    lanes = Lanes()
    a = [_event(i, "a") for i in range(1, 4)]
    lanes.add(a)
    lanes.take(10, now=0, depth=3)
    lanes.hold(a[0])  # being dead-lettered
    assert lanes.take(10, now=0, depth=3) == []
    lanes.succeeded(a[0])
    assert lanes.take(10, now=0, depth=3) == [a[1], a[2]]


def test_depth_never_exceeds_the_batch_limit() -> None:
    lanes = Lanes()
    a = [_event(i, "a") for i in range(1, 6)]
    lanes.add(a)
    assert lanes.take(2, now=0, depth=10) == a[:2]


def test_an_evicted_lane_gives_back_its_events_in_order_and_is_never_handed_out_again() -> None:
    lanes = Lanes()
    a1, a2, a3, b1 = _event(1, "a"), _event(2, "a"), _event(3, "a"), _event(4, "b")
    lanes.add([a1, a2, a3, b1])
    assert lanes.take(10, now=0) == [a1, b1]
    lanes.failed(a1, retry_at=5)
    assert lanes.evict(a1.lane_key) == [a1, a2, a3]
    assert len(lanes) == 1
    assert lanes.take(10, now=10) == []  # the retry that was scheduled for it is gone
    assert lanes.evict(a1.lane_key) == []


def test_a_lane_added_again_after_eviction_is_not_woken_by_the_old_lanes_retry() -> None:
    lanes = Lanes()
    a1, a2 = _event(1, "a"), _event(2, "a")
    lanes.add([a1])
    lanes.take(10, now=0)
    lanes.failed(a1, retry_at=5)
    lanes.evict(a1.lane_key)
    lanes.add([a2])
    assert lanes.take(10, now=1) == [a2]
    lanes.failed(a2, retry_at=20)
    assert lanes.take(10, now=6) == [], "the evicted lane's retry at 5 must not wake the new lane"
    assert lanes.take(10, now=20) == [a2]


def test_acknowledging_a_calls_events_at_once_frees_their_lanes_as_one_at_a_time_does() -> None:
    a1, a2, a3, b1, c1 = _event(1, "a"), _event(2, "a"), _event(3, "a"), _event(4, "b"), _event(5, "c")
    one_by_one, at_once = Lanes(), Lanes()
    for lanes in (one_by_one, at_once):
        lanes.add([a1, a2, a3, b1, c1])
        assert lanes.take(10, now=0, depth=2) == [a1, a2, b1, c1]
    for event in (a1, b1):
        one_by_one.succeeded(event)
    at_once.all_succeeded([a1, b1])
    for lanes in (one_by_one, at_once):
        assert len(lanes) == 3
        assert lanes.take(10, now=0, depth=2) == []  # a2 of lane a is still out
    for event in (a2, c1):
        one_by_one.succeeded(event)
    at_once.all_succeeded([a2, c1])
    assert one_by_one.take(10, now=0) == at_once.take(10, now=0) == [a3]
