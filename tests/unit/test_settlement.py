"""The settlement policy: what becomes of each event of a publish call, without a loop, a sink
or a clock."""

from __future__ import annotations

import random

import pytest

from outbox_relay.backoff import Backoff
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.settlement import (
    NOT_SENT,
    Hold,
    Park,
    Retry,
    SettlementPolicy,
    batch_results,
    note_failure,
    refusals_after,
    sendable_events,
    split_call,
)

BACKOFF = Backoff(initial=1.0, maximum=8.0)
REFUSED = Failure("refused by the broker")
TRANSIENT = Failure("connection reset", transient=True)
PERMANENT = Failure("too large", permanent=True)


def _event(position: int, aggregate: str = "a", defect: str | None = None) -> OutboxEvent:
    return OutboxEvent(position, f"e{position}", "order", aggregate, "T", b"{}", {}, 0.0, defect=defect)


def _policy(*, block: bool = False, after_attempts: int = 3) -> SettlementPolicy:
    return SettlementPolicy(BACKOFF, after_attempts, block, random.Random(7))


def _failed(event: OutboxEvent, result: Failure, times: int) -> OutboxEvent:
    for _ in range(times):
        note_failure(event, result, now_wall=100.0, last_taken=0.0, amid=False)
    return event


# --- reading a call ---------------------------------------------------------------------------


def test_acknowledged_events_are_those_with_no_failure_before_them_in_their_aggregate() -> None:
    a1, a2, b1, a3 = _event(1, "a"), _event(2, "a"), _event(3, "b"), _event(4, "a")
    outcome = split_call([a1, a2, b1, a3], [None, REFUSED, None, None])
    assert outcome.acknowledged == [a1, b1]
    assert outcome.failed == [(a2, REFUSED)]
    assert outcome.overtaken == 1, "a3 was taken by the broker ahead of a2: it goes again after it"
    assert outcome.any_taken


def test_only_the_first_failure_of_an_aggregate_is_settled() -> None:
    a1, a2, b1 = _event(1, "a"), _event(2, "a"), _event(3, "b")
    outcome = split_call([a1, a2, b1], [TRANSIENT, TRANSIENT, TRANSIENT])
    assert outcome.failed == [(a1, TRANSIENT), (b1, TRANSIENT)]
    assert (outcome.acknowledged, outcome.overtaken, outcome.any_taken) == ([], 0, False)


def test_a_call_must_have_one_result_per_event() -> None:
    with pytest.raises(ValueError, match="shorter"):
        split_call([_event(1), _event(2)], [None])


# --- an event's own counters ------------------------------------------------------------------


def test_a_refusal_counts_towards_after_attempts_an_outage_does_not() -> None:
    event = _event(1)
    note_failure(event, TRANSIENT, now_wall=10.0, last_taken=0.0, amid=False)
    note_failure(event, REFUSED, now_wall=11.0, last_taken=0.0, amid=False)
    assert (event.attempts, event.rejections, event.first_failed_at) == (2, 1, 10.0)
    assert not event.failed_amid_successes


@pytest.mark.parametrize(
    ("last_taken", "amid", "on_its_own"),
    [(0.0, True, True), (10.5, False, True), (9.0, False, False), (10.0, False, False)],
)
def test_an_event_fails_on_its_own_when_the_broker_took_others_meanwhile(
    last_taken: float, amid: bool, on_its_own: bool
) -> None:
    event = _event(1)
    note_failure(event, TRANSIENT, now_wall=10.0, last_taken=0.0, amid=False)
    note_failure(event, TRANSIENT, now_wall=12.0, last_taken=last_taken, amid=amid)
    assert event.failed_amid_successes is on_its_own


def test_refusals_after_counts_only_the_brokers_refusals() -> None:
    assert refusals_after(2, REFUSED) == 3
    assert refusals_after(2, PERMANENT) == 3
    assert refusals_after(2, TRANSIENT) == 2


# --- deciding ---------------------------------------------------------------------------------


def test_a_failure_is_retried_after_a_backoff_within_its_ceiling() -> None:
    event = _failed(_event(1), REFUSED, 3)
    decision = _policy(after_attempts=10).decide(event, REFUSED, now=50.0)
    assert isinstance(decision, Retry)
    assert 0.0 <= decision.delay <= BACKOFF.ceiling(3)
    assert decision.at == 50.0 + decision.delay


def test_a_poison_event_is_parked_once_refused_after_attempts_times() -> None:
    policy = _policy(after_attempts=3)
    event = _failed(_event(1), REFUSED, 2)
    assert isinstance(policy.decide(event, REFUSED, now=0.0), Retry)
    _failed(event, REFUSED, 1)
    assert policy.decide(event, REFUSED, now=0.0) == Park("refused by the broker", permanent=False)


def test_outages_never_make_an_event_poison() -> None:
    event = _failed(_event(1), TRANSIENT, 50)
    assert isinstance(_policy(after_attempts=1).decide(event, TRANSIENT, now=0.0), Retry)


def test_a_permanent_failure_is_parked_at_once() -> None:
    event = _failed(_event(1), PERMANENT, 1)
    assert _policy().decide(event, PERMANENT, now=0.0) == Park("too large", permanent=True)


def test_with_on_poison_block_a_poison_event_holds_its_aggregate_instead() -> None:
    event = _failed(_event(1), PERMANENT, 1)
    assert _policy(block=True).decide(event, PERMANENT, now=0.0) == Hold("too large", permanent=True)


def test_a_held_event_that_is_poison_is_dead_lettered_and_its_aggregate_moves_on() -> None:
    policy = _policy(after_attempts=3)
    dead = Park("refused by the broker", permanent=False)
    assert policy.decide_held(REFUSED, refusals=3, failures=1, now=0.0) == dead
    assert isinstance(policy.decide_held(REFUSED, refusals=2, failures=1, now=0.0), Retry)
    assert isinstance(policy.decide_held(TRANSIENT, refusals=9, failures=1, now=0.0), Retry)


def test_with_on_poison_block_a_held_event_is_retried_for_ever() -> None:
    decision = _policy(block=True).decide_held(PERMANENT, refusals=100, failures=4, now=5.0)
    assert isinstance(decision, Retry)
    assert 0.0 <= decision.delay <= BACKOFF.ceiling(4)


def test_a_newly_held_aggregate_is_first_retried_within_the_backoff_of_its_attempts() -> None:
    policy = _policy()
    assert 20.0 <= policy.hold_first_attempt_at(attempts=0, now=20.0) <= 20.0 + BACKOFF.ceiling(1)
    assert 20.0 <= policy.hold_first_attempt_at(attempts=9, now=20.0) <= 20.0 + BACKOFF.maximum


# --- defects ----------------------------------------------------------------------------------


def test_a_defect_and_the_events_behind_it_of_its_aggregate_are_not_sent() -> None:
    a1, a2, b1 = _event(1, "a", defect="NULL aggregate id"), _event(2, "a"), _event(3, "b")
    assert sendable_events([a1, a2, b1]) == [b1]
    results: list[PublishResult] = [None]
    assert batch_results([a1, a2, b1], [b1], results) == [
        Failure("NULL aggregate id", permanent=True),
        NOT_SENT,
        None,
    ]


def test_events_ahead_of_a_defect_of_their_aggregate_are_sent() -> None:
    a1, a2 = _event(1, "a"), _event(2, "a", defect="bad headers")
    assert sendable_events([a1, a2]) == [a1]


def test_a_batch_without_defects_is_sent_whole() -> None:
    batch = [_event(1, "a"), _event(2, "b")]
    assert sendable_events(batch) == batch
