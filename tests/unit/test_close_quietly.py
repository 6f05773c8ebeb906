"""close_quietly must never swallow the cancellation of the task that calls it: a pipeline
being abandoned cancels its tasks, and one that went on (its cancellation lost as a close
completed in the same step) kept the whole abandonment waiting."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from outbox_relay.pgsession import close_quietly


class _ClosingConnection:
    def __init__(self, closed: asyncio.Future[None]) -> None:
        self._closed = closed

    async def close(self) -> None:
        await self._closed


def test_a_cancellation_that_comes_as_the_close_completes_still_cancels_the_caller() -> None:
    async def scenario() -> None:
        closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        caller = asyncio.create_task(close_quietly(cast(Any, _ClosingConnection(closed))))
        await asyncio.sleep(0)  # the caller now waits on the close
        await asyncio.sleep(0)
        closed.set_result(None)  # the close completes ...
        caller.cancel()  # ... in the same step as the caller is cancelled
        with pytest.raises(asyncio.CancelledError):
            await caller

    asyncio.run(scenario())
