"""The one retry policy of the relay: exponential backoff with full jitter (the AWS architecture
blog's recommendation), a cap, an optional deadline and a give-up hook.

Every loop that retries or reconnects (a publish, a fetch, an ack, a LISTEN connection, a
replication stream, a lease renewal) keeps a `Retrying` and asks it how long to wait after each
failure. Full jitter: the delay is uniform in [0, min(maximum, initial * multiplier**(n-1))], so
many retries spread out instead of hitting a recovering server in waves.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float
    maximum: float
    multiplier: float = 2.0

    def ceiling(self, attempt: int) -> float:
        """Upper bound of the delay before retry number `attempt` (1-based)."""
        exponent = max(attempt - 1, 0)
        try:
            # (A float power: an int multiplier would build a huge integer for a late attempt.)
            grown = self.initial * float(self.multiplier) ** exponent
        except OverflowError:  # past any float, so past the maximum
            return self.maximum
        return min(self.maximum, grown)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        return (rng or random).uniform(0.0, self.ceiling(attempt))


class GaveUp(Exception):
    """A retrying loop failed for longer than its policy's deadline; the last error is the cause."""


@dataclass(slots=True)
class Retrying:
    """One retrying loop's state under a `Backoff`: failures in a row since the last success.

    Contract: call `failed(error)` after each failure and wait the delay it returns before trying
    again; call `succeeded()` after a success, which starts the next failure over at the first
    delay. With `give_up_after`, a failure that comes that many seconds after the first of the
    current run calls `on_give_up(error)` (when given) and raises `GaveUp` from the error instead
    of returning a delay, the way psycopg_pool's `reconnect_timeout` and `reconnect_failed` do.
    """

    backoff: Backoff
    give_up_after: float | None = None
    on_give_up: Callable[[BaseException], None] | None = None
    clock: Callable[[], float] = time.monotonic
    rng: random.Random | None = None
    failures: int = field(default=0, init=False)
    _failing_since: float | None = field(default=None, init=False)

    def failed(self, error: BaseException) -> float:
        """Note a failure; the seconds to wait before the next attempt. Raises GaveUp past the
        deadline."""
        now = self.clock()
        if self._failing_since is None:
            self._failing_since = now
        self.failures += 1
        if self.give_up_after is not None and now - self._failing_since >= self.give_up_after:
            if self.on_give_up is not None:
                self.on_give_up(error)
            raise GaveUp(f"still failing after {now - self._failing_since:.1f}s") from error
        return self.backoff.delay(self.failures, self.rng)

    def succeeded(self) -> None:
        """Note a success: the next failure waits the first, shortest delay again."""
        self.failures = 0
        self._failing_since = None
