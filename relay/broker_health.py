"""What publish calls say about the broker as a whole: readiness, `outbox_relay_up{component=
"sink"}`, a refusal of the relay itself (a setup problem), and the pause of dispatching after a
call that raised.

Up when the broker took an event or answered about one (a refusal of an event, permanent or not,
is an answer). Down when the call raised, or when every result is a transient failure: whatever
the sink, that is a broker not accepting work, and an outage must not look ready because
`publish` returned. The state follows each call, with no hysteresis of its own (probes'
failureThreshold and alerts' `for:` smooth it where it is read), except where a call's silence
says nothing new about the broker as a whole:
- the call began before another one heard from the broker (concurrent calls straddling a
  recovery must not turn it back down);
- every event of it already failed while the broker took others (an aggregate failing on its
  own, retried alone, must not flap readiness at each retry).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from outbox_relay.backoff import Backoff, Retrying
from outbox_relay.events import OutboxEvent, PublishResult
from outbox_relay.observer import PipelineObserver
from outbox_relay.problems import SetupProblems

#: Reconnect pacing for the database and the broker as a whole (per-event retries use `retry:`).
CONNECT_BACKOFF = Backoff(initial=0.2, maximum=10.0)


class BrokerHealth:
    """The broker's state as the pipeline's publish calls tell it. `quiet_after`: once the
    broker has taken nothing for that long (the longest per-event backoff), the retries of an
    aggregate failing on its own are all there is to hear from it, and count again."""

    def __init__(
        self, log: Any, problems: SetupProblems, observer: PipelineObserver, quiet_after: float
    ) -> None:
        self._log = log
        self._problems = problems
        self._observer = observer
        self._quiet_after = quiet_after
        #: Calls in a row that raised: dispatching as a whole pauses after each, never longer
        #: than `retry.max` (`quiet_after`): the Sink contract promises retries that far apart
        #: at most.
        self._reconnect = Retrying(
            Backoff(CONNECT_BACKOFF.initial, min(CONNECT_BACKOFF.maximum, quiet_after))
        )
        #: When a publish call last heard from the broker (monotonic).
        self._last_heard = 0.0
        #: When the broker last took an event (wall clock, as `first_failed_at`).
        self.last_taken = 0.0
        #: Dispatching waits until then (monotonic) after a call that raised.
        self.paused_until = 0.0

    def paused(self) -> bool:
        return self.paused_until > time.monotonic()

    def took(self, now_wall: float) -> None:
        """The broker acknowledged events at `now_wall` (wall clock)."""
        self.last_taken = now_wall

    def answered(
        self, called_at: float, events: Sequence[OutboxEvent], results: Sequence[PublishResult]
    ) -> None:
        """A publish call begun at `called_at` (monotonic) returned `results` for `events`."""
        refused = next((r for r in results if r is not None and r.setup), None)
        if refused is not None:  # (the broker answered, refusing the relay: never "up")
            self._problems.report_refusal("sink", refused.reason)
        elif any(result is None or not result.transient for result in results):
            self._heard()
            return
        if called_at < self._last_heard:
            return
        # ...as long as the broker took something lately: once it has not for as long as the
        # longest backoff, these retries are all there is to hear from it.
        recently_heard = time.monotonic() - self._last_heard <= self._quiet_after
        if refused is None and recently_heard and all(event.failed_amid_successes for event in events):
            return
        if self._observer.sink_ok:
            reason = next((r.reason for r in results if r is not None), "no result")
            self._log.error("the broker answers no event: not ready", error=reason, events=len(results))
        self._observer.sink(False)

    def raised(self, called_at: float, error: BaseException, reason: str, events: int) -> None:
        """A publish call begun at `called_at` (monotonic) for `events` events raised `error`:
        log it once (not once per event) and pause dispatching as a whole, backing off."""
        self._problems.report("sink", error)  # (a login refused on reconnect is a setup problem)
        pause = self._reconnect.failed(error)
        self.paused_until = max(self.paused_until, time.monotonic() + pause)
        self._log.error(
            "publish failed",
            error=reason,
            events=events,
            attempt=self._reconnect.failures,
            retry_in=round(pause, 2),
        )
        if called_at >= self._last_heard:
            self._observer.sink(False)

    def _heard(self) -> None:
        self._last_heard = time.monotonic()
        self._reconnect.succeeded()
        self._observer.sink(True)
        self._problems.clear("sink")
