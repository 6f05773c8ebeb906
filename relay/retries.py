"""Calls the pipeline repeats until they succeed (start, fetch, ack, dead-letter writes), paced by
the relay's one retry policy (`relay.backoff.Retrying`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from outbox_relay.backoff import Retrying
from outbox_relay.broker_health import CONNECT_BACKOFF
from outbox_relay.fencing import FenceGuard
from outbox_relay.flow import wait_either
from outbox_relay.interfaces import Fenced, Unsupported
from outbox_relay.observer import PipelineObserver, describe_error
from outbox_relay.problems import SetupProblems
from outbox_relay.stalls import CallTracker

T = TypeVar("T")


class UntilDone:
    """Runs calls until they succeed, for one pipeline: each failure is logged (or reported as
    a setup problem), said to the observer when it is the database's, and waited out."""

    def __init__(
        self,
        log: Any,
        problems: SetupProblems,
        observer: PipelineObserver,
        calls: CallTracker,
        guard: FenceGuard,
    ) -> None:
        self._log = log
        self._problems = problems
        self._observer = observer
        self._calls = calls
        self._guard = guard

    async def __call__(
        self,
        action: Callable[[], Awaitable[T]],
        failing: str,
        *,
        stop: asyncio.Event | None = None,
        database: bool = True,
        component: str = "database",
        stage: str | None = None,
        **fields: object,
    ) -> T | None:
        """Run `action` until it succeeds and return its result, backing off between attempts
        and logging each failure as `failing`; None once `stop` is set. Database writes pass no
        `stop`: the database may be restarting, and giving up would lose an acknowledgement (or
        a dead letter). With `database`, the outcome also says whether the database is up. A
        setup problem of `component` (see relay.problems) is reported as one, not as a retry.
        With `stage`, each attempt is tracked as a call of that stage (relay.stalls); the waits
        between attempts are not. Raises Fenced once the lease is over, and Unsupported (with a
        `stop`: a start) which no retry can heal."""
        retrying = Retrying(CONNECT_BACKOFF)
        while stop is None or not stop.is_set():
            try:
                result = await self._attempt(action, stage)
            except Exception as exc:
                self._raise_hopeless(exc, stop)
                delay = retrying.failed(exc)
                if database:
                    self._observer.database(False)
                if not self._problems.report(component, exc, operation=failing):
                    self._log.error(
                        failing,
                        error=describe_error(exc),
                        attempt=retrying.failures,
                        retry_in=round(delay, 2),
                        **fields,
                    )
                await self._wait(delay, stop)
                continue
            if database:
                self._observer.database(True)
            self._problems.clear(component, operation=failing)
            return result
        return None

    async def _attempt(self, action: Callable[[], Awaitable[T]], stage: str | None) -> T:
        if stage is None:
            return await action()
        with self._calls.call(stage):
            return await action()

    def _raise_hopeless(self, exc: Exception, stop: asyncio.Event | None) -> None:
        if isinstance(exc, Unsupported) and stop is not None:
            raise exc  # retrying cannot help: the relay stops and says why
        if isinstance(exc, Fenced):
            self._guard.lost.set()
            raise exc  # the lease is over: this run ends

    @staticmethod
    async def _wait(delay: float, stop: asyncio.Event | None) -> None:
        if stop is None:
            await asyncio.sleep(delay)
        else:
            await wait_either(stop, None, delay)
