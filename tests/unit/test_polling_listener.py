"""The polling source's LISTEN loop: reconnects through the one retry policy (full jitter, the
first delay again after a connection that got as far as LISTEN), wakes the source. No database."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any, cast

from outbox_relay.backoff import Backoff, Retrying
from outbox_relay.connectors.sources.postgres_polling.listener import Connect, WakeUps, listen


class _Ceilings(random.Random):
    """Records the ceiling of every full-jitter draw and draws zero (no real wait)."""

    def __init__(self) -> None:
        super().__init__(0)
        self.ceilings: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        self.ceilings.append(b)
        return a


class _Connection:
    """A LISTEN connection that delivers `notifications`, then is lost (or, with None, stays)."""

    def __init__(self, notifications: int | None) -> None:
        self.notifications = notifications
        self.statements: list[str] = []

    async def __aenter__(self) -> _Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def execute(self, statement: Any) -> None:
        self.statements.append(repr(statement))

    async def notifies(self) -> AsyncIterator[object]:
        if self.notifications is None:
            await asyncio.Event().wait()
        for _ in range(self.notifications or 0):
            yield object()
        raise OSError("server closed the connection")


class _Server:
    """Refuses the first two connections, then serves one that is lost, then one that stays."""

    def __init__(self) -> None:
        self.attempts = 0
        self.last: _Connection | None = None
        self.steady = asyncio.Event()

    async def connect(self) -> _Connection:
        self.attempts += 1
        if self.attempts <= 2:
            raise OSError("connection refused")
        self.last = _Connection(2 if self.attempts == 3 else None)
        if self.attempts > 3:
            self.steady.set()
        return self.last


class _Log:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str, **_: object) -> None:
        self.warnings.append(message)


async def test_reconnects_with_growing_jittered_waits_that_start_over_after_a_listen() -> None:
    server, log, rng, wake = _Server(), _Log(), _Ceilings(), asyncio.Event()
    retrying = Retrying(Backoff(initial=0.5, maximum=10.0), rng=rng)
    task = asyncio.create_task(listen(cast(Connect, server.connect), "outbox_relay", wake, log, retrying))
    try:
        await asyncio.wait_for(server.steady.wait(), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # Two refusals (0.5, then 1.0), a LISTEN that succeeded and was lost (0.5 again).
    assert rng.ceilings == [0.5, 1.0, 0.5]
    assert log.warnings == ["LISTEN connection lost; polling meanwhile"] * 3
    assert wake.is_set()
    assert server.last is not None
    assert "outbox_relay" in server.last.statements[0]


async def test_wake_ups_come_from_notifications_or_the_poll_interval() -> None:
    server = _Server()
    server.attempts = 2  # (the next connection delivers two notifications)
    wake_ups = WakeUps(cast(Connect, server.connect), "outbox_relay", _Log())
    await asyncio.wait_for(wake_ups.wait(0.01), 1)  # nothing listens: the poll interval ends it
    wake_ups.listen_in_background()
    wake_ups.listen_in_background()  # (once only)
    try:
        await asyncio.wait_for(wake_ups.wait(30), 5)  # woken long before the poll interval
    finally:
        await wake_ups.stop()
    assert server.attempts >= 3
