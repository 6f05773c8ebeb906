"""The lease guard (nothing is done once the term is over) and the calls repeated until they
succeed, without a running pipeline."""

from __future__ import annotations

import asyncio

import pytest

from outbox_relay.fencing import FenceGuard
from outbox_relay.interfaces import Fenced, Unsupported
from outbox_relay.observer import PipelineObserver
from outbox_relay.problems import SetupProblems
from outbox_relay.retries import UntilDone
from outbox_relay.stalls import CallTracker


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, **_: object) -> None:
        self.lines.append(message)

    warning = error = info


class _Term:
    table, key, token = "lease", "outbox", 1

    def __init__(self) -> None:
        self.ok = True

    def valid(self) -> bool:
        return self.ok


def _guard() -> tuple[FenceGuard, _Term]:
    guard, term = FenceGuard(_Log()), _Term()
    guard.fence = term
    return guard, term


def test_without_a_fence_the_pipeline_may_always_act() -> None:
    assert FenceGuard(_Log()).may_act()


def test_once_the_term_is_over_the_pipeline_never_acts_again() -> None:
    guard, term = _guard()
    assert guard.may_act()
    term.ok = False
    assert not guard.may_act()
    assert guard.lost.is_set()
    term.ok = True  # (a term that ended stays ended for this run, whatever the fence says later)
    assert guard.lost.is_set()


async def test_a_fenced_write_is_refused_once_the_term_is_over() -> None:
    guard, term = _guard()
    writes: list[int] = []

    async def write() -> int:
        writes.append(1)
        return len(writes)

    assert await guard.fenced(write)() == 1
    term.ok = False
    with pytest.raises(Fenced):
        await guard.fenced(write)()
    assert writes == [1]


async def test_work_cut_short_by_abandon_is_cancelled_and_counts_as_lost() -> None:
    guard, _ = _guard()
    abandon = asyncio.Event()
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    running = asyncio.create_task(guard.run_until_lost(work(), abandon))
    await asyncio.sleep(0.01)
    abandon.set()
    assert await asyncio.wait_for(running, 5) is False
    assert cancelled.is_set()
    assert guard.lost.is_set(), "the sink discards instead of flushing"


async def test_work_that_ends_by_itself_finishes_the_run() -> None:
    guard, _ = _guard()

    async def work() -> None:
        await asyncio.sleep(0)

    assert await guard.run_until_lost(work(), asyncio.Event()) is True


def _until_done(name: str) -> tuple[UntilDone, PipelineObserver, FenceGuard]:
    log = _Log()
    calls = CallTracker()
    observer = PipelineObserver(name, "test", log, calls)
    guard = FenceGuard(log)
    return UntilDone(log, SetupProblems(name, log), observer, calls, guard), observer, guard


async def test_a_call_is_repeated_until_it_succeeds_and_the_database_is_up_again() -> None:
    until_done, observer, _ = _until_done("retries-ok")
    failures = [ConnectionError("reset"), ConnectionError("reset")]

    async def flaky() -> str:
        if failures:
            raise failures.pop()
        return "done"

    assert await asyncio.wait_for(until_done(flaky, "failing"), 10) == "done"
    assert observer.db_ok


async def test_a_stop_ends_the_retries_with_no_result() -> None:
    until_done, _, _ = _until_done("retries-stop")
    stop = asyncio.Event()

    async def down() -> str:
        stop.set()
        raise ConnectionError("refused")

    assert await asyncio.wait_for(until_done(down, "failing", stop=stop), 10) is None


async def test_the_end_of_the_term_ends_the_retries_at_once() -> None:
    until_done, _, guard = _until_done("retries-fenced")

    async def fenced() -> None:
        raise Fenced("another relay holds the lease")

    with pytest.raises(Fenced):
        await until_done(fenced, "failing")
    assert guard.lost.is_set()


async def test_what_no_retry_can_heal_stops_a_start() -> None:
    until_done, _, _ = _until_done("retries-unsupported")

    async def unsupported() -> None:
        raise Unsupported("server too old")

    with pytest.raises(Unsupported):
        await until_done(unsupported, "failing", stop=asyncio.Event())
