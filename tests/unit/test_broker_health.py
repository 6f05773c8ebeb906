"""What publish calls say about the broker as a whole (readiness, the pause after a call that
raised, a refusal of the relay itself), and the in-flight window, without a running pipeline."""

from __future__ import annotations

import time

import pytest

from outbox_relay.broker_health import CONNECT_BACKOFF, BrokerHealth
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.flow import InFlight
from outbox_relay.observer import PipelineObserver
from outbox_relay.problems import SetupProblems
from outbox_relay.stalls import CallTracker

TRANSIENT = Failure("connection refused", transient=True)


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, object]]] = []

    def info(self, message: str, **fields: object) -> None:
        self.lines.append((message, fields))

    warning = error = info

    def attempts(self) -> list[object]:
        return [fields["attempt"] for message, fields in self.lines if message == "publish failed"]


def _health(
    name: str, log: _Log | None = None, retry_max: float = 30.0
) -> tuple[BrokerHealth, PipelineObserver, SetupProblems]:
    log = log or _Log()
    observer = PipelineObserver(name, "test", log, CallTracker())
    observer.connected()
    problems = SetupProblems(name, log)
    return BrokerHealth(log, problems, observer, quiet_after=retry_max), observer, problems


def _events(count: int, amid: bool = False) -> list[OutboxEvent]:
    events = [OutboxEvent(i, f"e{i}", "order", str(i), "T", b"{}", {}, 0.0) for i in range(count)]
    for event in events:
        event.failed_amid_successes = amid
    return events


def test_a_call_whose_events_all_fail_transiently_means_the_broker_is_down() -> None:
    health, observer, _ = _health("bh-down")
    results: list[PublishResult] = [TRANSIENT, TRANSIENT]
    health.answered(time.monotonic(), _events(2), results)
    assert not observer.sink_ok
    health.answered(time.monotonic(), _events(2), [TRANSIENT, None])
    assert observer.sink_ok, "one event taken: the broker is back"


def test_a_refusal_of_an_event_is_an_answer_from_the_broker() -> None:
    health, observer, _ = _health("bh-refusal")
    health.answered(time.monotonic(), _events(1), [Failure("too large", permanent=True)])
    assert observer.sink_ok


def test_an_aggregate_failing_on_its_own_does_not_turn_the_broker_down() -> None:
    health, observer, _ = _health("bh-amid")
    health.answered(time.monotonic(), _events(1), [None])
    health.answered(time.monotonic(), _events(1, amid=True), [TRANSIENT])
    assert observer.sink_ok


def test_a_call_begun_before_the_broker_was_last_heard_says_nothing_new() -> None:
    health, observer, _ = _health("bh-straddle")
    called_at = time.monotonic()
    health.answered(time.monotonic(), _events(1), [None])
    health.answered(called_at, _events(1), [TRANSIENT])
    health.raised(called_at, ConnectionError("reset"), "ConnectionError: reset", events=1)
    assert observer.sink_ok


def test_a_call_that_raised_pauses_dispatching_backing_off_until_the_broker_answers() -> None:
    log = _Log()
    health, observer, _ = _health("bh-pause", log)
    assert not health.paused()
    for _ in range(3):
        health.raised(time.monotonic(), ConnectionError("down"), "ConnectionError: down", events=5)
    assert not observer.sink_ok
    assert health.paused_until <= time.monotonic() + CONNECT_BACKOFF.ceiling(3)
    health.answered(time.monotonic(), _events(1), [None])
    assert observer.sink_ok
    health.raised(time.monotonic(), ConnectionError("down"), "ConnectionError: down", events=5)
    assert log.attempts() == [1, 2, 3, 1], "the backoff starts over once the broker answered"


def test_the_pause_after_calls_that_raised_is_never_longer_than_retry_max() -> None:
    health, _, _ = _health("bh-short", retry_max=0.5)
    for _ in range(20):
        health.raised(time.monotonic(), ConnectionError("down"), "ConnectionError: down", events=1)
        assert health.paused_until <= time.monotonic() + 0.5


def test_a_refusal_of_the_relay_itself_is_a_setup_problem_never_up() -> None:
    health, observer, problems = _health("bh-setup")
    refused = Failure("403 forbidden", transient=True, setup=True)
    health.answered(time.monotonic(), _events(2), [refused, None])
    assert [p["problem"] for p in problems.describe()] == ["broker refused the relay"]
    health.answered(time.monotonic(), _events(1), [None])
    assert problems.describe() == []
    assert observer.sink_ok


@pytest.mark.parametrize(("count", "unconfirmed", "room"), [(0, 0, 10), (4, 0, 6), (4, 7, 3), (10, 2, 0)])
def test_the_window_has_room_for_what_neither_the_pipeline_nor_the_source_holds(
    count: int, unconfirmed: int, room: int
) -> None:
    window = InFlight(10)
    window.fetched(count)
    assert window.room(unconfirmed) == room


def test_acknowledging_frees_room_and_says_so() -> None:
    window = InFlight(2)
    window.fetched(2)
    assert window.room(0) == 0
    assert not window.space_freed.is_set()
    window.acknowledged(1)
    assert (window.count, window.room(0)) == (1, 1)
    assert window.space_freed.is_set()
