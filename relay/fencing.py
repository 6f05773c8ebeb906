"""The lease term a pipeline acts under: nothing is handed to the sink and nothing is recorded
unless the term is valid right before (docs/concepts/replicas.md, "Fencing")."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from outbox_relay.interfaces import Fence, Fenced

T = TypeVar("T")


class FenceGuard:
    """Whether this pipeline may still act. Without a fence (no lease) it always may; once the
    fence's term is over, never again, and `lost` is set so the run winds down."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self.fence: Fence | None = None
        self.lost = asyncio.Event()

    def may_act(self) -> bool:
        """Asked right before handing events to the sink or recording anything, with nothing
        awaited in between."""
        if self.fence is None or self.fence.valid():
            return True
        if not self.lost.is_set():
            self._log.error("the lease ended: publishing and marking nothing more")
            self.lost.set()
        return False

    def fenced(self, action: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
        """`action` (a write that records something), refused with Fenced once the term is over."""

        async def guarded() -> T:
            if not self.may_act():
                raise Fenced("the lease ended: nothing recorded")
            return await action()

        return guarded

    async def run_until_lost(self, work: Coroutine[Any, Any, None], abandon: asyncio.Event | None) -> bool:
        """Run `work` to its end (True), unless the term ends or `abandon` is set first (False):
        then `lost` is set (the sink discards instead of flushing) and `work` is cancelled."""
        task = asyncio.create_task(work)
        waiters = [asyncio.create_task(self.lost.wait())]
        if abandon is not None:
            waiters.append(asyncio.create_task(abandon.wait()))
        await asyncio.wait((task, *waiters), return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        if task.done() and not self.lost.is_set():
            task.result()
            return True
        self.lost.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False
