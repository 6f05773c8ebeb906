"""The call tracker behind /healthz (relay.stalls): which call is the oldest, when it counts as
stalled, and that it is reported once; with a clock the test moves by hand."""

from __future__ import annotations

import asyncio
from contextlib import ExitStack

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from outbox_relay.config import parse_config
from outbox_relay.runner import Relay
from outbox_relay.stalls import CallTracker, Stall
from tests.support import relay_config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_nothing_out_means_no_oldest_call_and_no_stall(clock: Clock) -> None:
    tracker = CallTracker(clock)
    assert tracker.oldest() is None
    assert tracker.stalled(0) is None
    assert len(tracker) == 0


def test_oldest_is_the_call_out_the_longest_with_its_stage(clock: Clock) -> None:
    tracker = CallTracker(clock)
    with tracker.call("fetch"):
        clock.now += 3
        with tracker.call("publish"):
            clock.now += 2
            assert tracker.oldest() == ("fetch", 5.0)
            assert len(tracker) == 2
        assert tracker.oldest() == ("fetch", 5.0)
    assert tracker.oldest() is None


def test_a_call_that_returned_is_forgotten_and_the_next_oldest_takes_its_place(clock: Clock) -> None:
    tracker = CallTracker(clock)
    with ExitStack() as publish:
        with tracker.call("ack"):
            clock.now += 1
            publish.enter_context(tracker.call("publish"))
            clock.now += 4
        # The ack returned; the publish that began after it is now the oldest.
        assert tracker.oldest() == ("publish", 4.0)
    assert len(tracker) == 0


def test_a_call_that_raised_is_forgotten_too(clock: Clock) -> None:
    tracker = CallTracker(clock)
    with pytest.raises(ConnectionError), tracker.call("publish"):
        raise ConnectionError("broker gone")
    assert tracker.oldest() is None


async def test_a_cancelled_call_is_forgotten(clock: Clock) -> None:
    tracker = CallTracker(clock)
    never = asyncio.Event()

    async def hung_publish() -> None:
        with tracker.call("publish"):
            await never.wait()

    task = asyncio.create_task(hung_publish())
    await asyncio.sleep(0)
    assert tracker.oldest() == ("publish", 0.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tracker.oldest() is None


def test_a_call_is_stalled_only_once_out_for_longer_than_the_threshold(clock: Clock) -> None:
    tracker = CallTracker(clock)
    with tracker.call("publish"):
        clock.now += 120
        assert tracker.stalled(120) is None
        clock.now += 0.5
        assert tracker.stalled(120) == Stall("publish", 120.5, first=True)


def test_a_stall_is_first_only_once_per_call(clock: Clock) -> None:
    tracker = CallTracker(clock)
    with tracker.call("ack"):
        clock.now += 10
        assert tracker.stalled(5) == Stall("ack", 10.0, first=True)
        clock.now += 1
        assert tracker.stalled(5) == Stall("ack", 11.0, first=False)
    with tracker.call("ack"):
        clock.now += 10
        # Another call hanging is another stall, reported again.
        assert tracker.stalled(5) == Stall("ack", 10.0, first=True)


def test_waiting_between_calls_is_not_a_stall(clock: Clock) -> None:
    """Backoff sleeps, waits for NOTIFY or for room in the window happen outside any call."""
    tracker = CallTracker(clock)
    for _ in range(3):
        with tracker.call("fetch"):
            clock.now += 0.01
        clock.now += 300  # an idle relay waiting for events
        assert tracker.stalled(120) is None
        assert tracker.oldest() is None


def test_the_stall_reported_is_the_oldest_call_not_the_latest(clock: Clock) -> None:
    tracker = CallTracker(clock)
    with tracker.call("dead-letter"):
        clock.now += 200
        with tracker.call("publish"):
            clock.now += 1
            stall = tracker.stalled(120)
    assert stall is not None
    assert stall.stage == "dead-letter"
    assert stall.seconds == 201.0


def test_the_default_clock_is_monotonic_time() -> None:
    tracker = CallTracker()
    with tracker.call("fetch"):
        oldest = tracker.oldest()
    assert oldest is not None
    assert oldest[0] == "fetch"
    assert 0 <= oldest[1] < 60


# Each step: begin a call of a stage, end the call at an index of those out, or let time pass.
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("begin"), st.sampled_from(["fetch", "publish", "ack", "dead-letter", "release"])),
        st.tuples(st.just("end"), st.integers(min_value=0, max_value=20)),
        st.tuples(st.just("wait"), st.floats(min_value=0, max_value=100)),
    ),
    max_size=60,
)


@given(_steps)
def test_oldest_always_matches_a_model_of_the_calls_out(steps: list[tuple[str, object]]) -> None:
    """Whatever order calls begin and end in, `oldest` is the earliest-begun call still out."""
    clock = Clock()
    tracker = CallTracker(clock)
    out: list[tuple[str, float, ExitStack]] = []  # the model: (stage, began, its open block)
    for action, arg in steps:
        if action == "begin":
            assert isinstance(arg, str)
            block = ExitStack()
            block.enter_context(tracker.call(arg))
            out.append((arg, clock.now, block))
        elif action == "end" and out:
            assert isinstance(arg, int)
            _, _, block = out.pop(arg % len(out))
            block.close()
        elif action == "wait":
            assert isinstance(arg, float)
            clock.now += arg
        assert len(tracker) == len(out)
        if out:
            # (The model keeps calls in the order they began: among calls begun at the same
            # instant, the first one begun is the oldest, as in the tracker.)
            stage, began, _ = min(out, key=lambda c: c[1])
            oldest = tracker.oldest()
            assert oldest is not None
            assert oldest[0] == stage
            assert oldest[1] == pytest.approx(clock.now - began)
        else:
            assert tracker.oldest() is None


# --- the relay's liveness, made of its pipelines' trackers -----------------------------------------


def _relay(clock: Clock) -> Relay:
    config = relay_config("postgresql://relay@db.invalid/app", {"type": "stdout"})
    config["http"] = {"stuck_after": "2m"}
    relay = Relay(parse_config(config, "relay.yaml", {}))
    for pipeline in relay.pipelines:
        pipeline.calls = CallTracker(clock)
    return relay


def test_liveness_fails_naming_the_outbox_stage_and_duration_once_past_stuck_after(clock: Clock) -> None:
    with capture_logs() as logs:
        relay = _relay(clock)
        (pipeline,) = relay.pipelines
        assert relay.liveness() == (True, {})
        with pipeline.calls.call("ack"):
            clock.now += 120
            assert relay.liveness() == (True, {})
            clock.now += 1.04
            expected = {"outboxes": {"orders": {"stage": "ack", "seconds": 121.0}}}
            assert relay.liveness() == (False, expected)
            assert relay.liveness() == (False, expected)
        assert relay.liveness() == (True, {})
    stalls = [log for log in logs if log["event"].startswith("stalled")]
    assert stalls == [
        {
            "event": "stalled: a call has not returned; /healthz fails until it does",
            "log_level": "error",
            "outbox": "orders",
            "stage": "ack",
            "seconds": 121.0,
            "stuck_after": 120.0,
        }
    ]
