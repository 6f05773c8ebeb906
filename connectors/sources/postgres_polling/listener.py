"""The polling source's wake-up call: a LISTEN connection on the channel the NOTIFY trigger of
`init-db` signals, kept open for as long as the source runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import sql

from outbox_relay.backoff import Backoff, Retrying

#: Waits between attempts to (re)open the LISTEN connection: polling covers the gap meanwhile.
LISTEN_BACKOFF = Backoff(initial=0.5, maximum=10.0)

Connect = Callable[[], Awaitable[psycopg.AsyncConnection[Any]]]


async def listen(
    connect: Connect, channel: str, wake: asyncio.Event, log: Any, retrying: Retrying | None = None
) -> None:
    """Keep a LISTEN connection on `channel` until cancelled: set `wake` right after LISTEN
    (rows may have arrived while nobody listened) and on every notification. When the
    connection cannot be opened or is lost, wait as `retrying` says (full jitter; a connection
    that got as far as LISTEN starts the next failure over at the first delay) and open another."""
    retrying = retrying or Retrying(LISTEN_BACKOFF)
    while True:
        try:
            await _listen_once(connect, channel, wake, retrying)
            error: BaseException = ConnectionError("the LISTEN connection ended")
        except Exception as exc:
            log.warning("LISTEN connection lost; polling meanwhile", error=str(exc))
            error = exc
        await asyncio.sleep(retrying.failed(error))


async def _listen_once(connect: Connect, channel: str, wake: asyncio.Event, retrying: Retrying) -> None:
    conn = await connect()
    async with conn:
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        retrying.succeeded()
        wake.set()
        async for _ in conn.notifies():
            wake.set()


class WakeUps:
    """When the source should read again: on a notification (once `listen_in_background` runs)
    or after the poll interval, whichever comes first."""

    def __init__(self, connect: Connect, channel: str, log: Any) -> None:
        self._connect, self._channel, self._log = connect, channel, log
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def listen_in_background(self) -> None:
        """Start the LISTEN task, unless it runs already."""
        if self._task is None:
            self._task = asyncio.create_task(
                listen(self._connect, self._channel, self._wake, self._log), name="outbox-relay:listen"
            )

    async def wait(self, poll_interval: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), poll_interval)
        self._wake.clear()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
