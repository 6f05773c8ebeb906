"""The logical source's background tasks besides streaming: watching that the publication still
matches the config, and heartbeats. A failed round (the database away) is logged and the next
waits longer, under the relay's one retry policy; a success returns to the regular period."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from outbox_relay.backoff import Backoff, Retrying
from outbox_relay.connectors.sources.postgres_logical.database import SqlConnection
from outbox_relay.connectors.sources.postgres_logical.publication import publication_mismatch
from outbox_relay.interfaces import ConnectorError
from outbox_relay.secrets import scrubber

#: The extra wait after a failed round, on top of the task's period.
_AFTER_FAILURE = Backoff(initial=0.5, maximum=5.0)
#: How often the publication is compared with the config.
_WATCH_PERIOD_S = 1.0


async def every(
    period: float, round_: Callable[[], Awaitable[None]], failed: Callable[[Exception], None]
) -> None:
    """Run `round_` every `period` seconds, forever. After a round that raised (`failed` is told),
    the next one comes later by a delay of the retry policy, which a successful round resets."""
    retrying = Retrying(_AFTER_FAILURE)
    delay = period
    while True:
        await asyncio.sleep(delay)
        try:
            await round_()
        except Exception as exc:
            failed(exc)
            delay = period + retrying.failed(exc)
        else:
            retrying.succeeded()
            delay = period


class PublicationWatch:
    """Every second, checks that the publication still publishes exactly the configured tables
    (ALTER PUBLICATION, a table dropped and created again, a migration). PostgreSQL decodes an
    insert with the publication as it was then: inserts into a table while it is not published
    never reach the relay, whatever it confirms later, and nothing in the stream tells. So the
    relay stops, not ready (`mismatch` is raised by every fetch), and says so in the log until
    the publication matches again (the events written meanwhile must be written again)."""

    def __init__(
        self,
        sql: SqlConnection,
        publication: str,
        tables: Callable[[], Collection[tuple[str, str]]],
        log: Any,
    ) -> None:
        self._sql = sql
        self._publication = publication
        self._tables = tables
        self._log = log
        #: Why the publication no longer matches the config, while it does not.
        self.mismatch: ConnectorError | None = None

    async def run(self) -> None:
        await every(_WATCH_PERIOD_S, self._check, self._check_failed)

    async def _check(self) -> None:
        problem = await publication_mismatch(await self._sql.get(), self._publication, sorted(self._tables()))
        if problem is not None:
            if self.mismatch is None:
                self._log.error(
                    "the publication no longer matches the config: inserts it does not publish"
                    " never reach the relay (write them again once it matches); stopped",
                    problem=problem,
                )
            self.mismatch = ConnectorError(problem)
        elif self.mismatch is not None:
            self._log.info("the publication matches the config again")
            self.mismatch = None

    def _check_failed(self, exc: Exception) -> None:
        # The database is away: the stream notices that too.
        self._log.debug("publication check failed", error=scrubber.scrub(str(exc)))


async def heartbeats(sql: SqlConnection, interval: float, log: Any) -> None:
    """A heartbeat message every `interval` seconds (see `SqlConnection.heartbeat`)."""

    async def beat() -> None:
        await sql.heartbeat()

    def failed(exc: Exception) -> None:
        log.warning("heartbeat failed", error=scrubber.scrub(str(exc)))

    await every(interval, beat, failed)
