"""What happens to an event after a publish call, as pure logic: result in, decision out.

A call's results say, per event, whether the broker acknowledged it (None) or how it failed (a
`Failure`). Settling a call is two steps, kept apart so the rules are testable without a loop,
a sink or a clock:
- `split_call` reads the call: which events were acknowledged, which failed first in their
  aggregate (each gets a decision), and which were taken back because an earlier event of their
  aggregate failed in the same call (they must not be acknowledged ahead of it);
- `SettlementPolicy.decide` says what becomes of one failed event: retry at a time, park it as
  dead (its aggregate moves on), or hold its aggregate in the store in order (`on_poison:
  block`). `decide_held` says the same for the first held event of a held aggregate.
`sendable_events` and `batch_results` say what of a batch goes to the sink (a defect cannot become
a message) and what that means for the rest. `note_failure` is the one step that changes
anything: the event's own failure counters, which the decisions then read.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from outbox_relay.backoff import Backoff
from outbox_relay.events import Failure, OutboxEvent, PublishResult


@dataclass(frozen=True, slots=True)
class Retry:
    """Offer the event again, alone, at `at` (monotonic), `delay` seconds from the decision."""

    at: float
    delay: float


@dataclass(frozen=True, slots=True)
class Park:
    """Store the event as dead: a poison event; its aggregate moves on without it."""

    reason: str
    permanent: bool


@dataclass(frozen=True, slots=True)
class Hold:
    """Move the event's aggregate to the store as held, this event first, to be retried from
    there in order (`on_poison: block`)."""

    reason: str
    permanent: bool


Decision = Retry | Park | Hold


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """One publish call read per event, in call order within each aggregate."""

    #: Events the broker acknowledged with nothing failed before them in their aggregate.
    acknowledged: list[OutboxEvent]
    #: The first failed event of each aggregate that had one, with its failure.
    failed: list[tuple[OutboxEvent, Failure]]
    #: Events acknowledged behind a failed one of their aggregate: published again after it.
    overtaken: int
    #: Whether the broker took any event of the call (failures then fail on their own).
    any_taken: bool


def split_call(batch: Sequence[OutboxEvent], results: Sequence[PublishResult]) -> CallOutcome:
    """Read a call's results (one per event of `batch`, in order). Once an event of an
    aggregate failed, every later event of it in the call is taken back, whatever its result."""
    acknowledged: list[OutboxEvent] = []
    failed: list[tuple[OutboxEvent, Failure]] = []
    stopped: set[Hashable] = set()
    overtaken = 0
    for event, result in zip(batch, results, strict=True):
        # (`stopped and`: no lane key is built per event while nothing failed, the common case)
        if stopped and event.lane_key in stopped:
            overtaken += result is None
        elif result is None:
            acknowledged.append(event)
        else:
            stopped.add(event.lane_key)
            failed.append((event, result))
    return CallOutcome(acknowledged, failed, overtaken, None in results)


def note_failure(event: OutboxEvent, result: Failure, now_wall: float, last_taken: float, amid: bool) -> None:
    """Count a failed attempt of `event` at `now_wall` (wall clock). It fails on its own (not in
    an outage) when the broker took other events of the same call (`amid`), or took any since
    its first failure (`last_taken`, wall clock). Only the broker's refusals (not transient
    failures) count towards `after_attempts`."""
    event.attempts += 1
    if event.first_failed_at is None:
        event.first_failed_at = now_wall
    if amid or last_taken > event.first_failed_at:
        event.failed_amid_successes = True
    if not result.transient:
        event.rejections += 1


def refusals_after(refusals: int, result: Failure) -> int:
    """The broker's refusals of an event once `result` is counted (outages do not count)."""
    return refusals + (0 if result.transient else 1)


@dataclass(frozen=True, slots=True)
class SettlementPolicy:
    """The rules for failed events. `block`: a poison event holds its aggregate back in order
    (in the store) instead of being dead-lettered."""

    backoff: Backoff
    after_attempts: int
    block: bool
    rng: random.Random | None = None

    def is_poison(self, result: Failure, refusals: int) -> bool:
        """Refused for good, or refused by the broker `after_attempts` times."""
        return result.permanent or (not result.transient and refusals >= self.after_attempts)

    def decide(self, event: OutboxEvent, result: Failure, now: float) -> Decision:
        """What becomes of `event` (its counters already noted, see `note_failure`) that failed
        with `result`; `now` is monotonic."""
        if self.is_poison(result, event.rejections):
            if self.block:
                return Hold(result.reason, result.permanent)
            return Park(result.reason, result.permanent)
        return self.retry(event.attempts, now)

    def decide_held(self, result: Failure, refusals: int, failures: int, now: float) -> Retry | Park:
        """What becomes of the first held event of a held aggregate that failed with `result`:
        `refusals` counts this failure already, `failures` are the aggregate's failed release
        attempts in a row, this one included. Poison outside block mode: dead, its aggregate
        moves on to the next held event; else it stays first and is retried."""
        if self.is_poison(result, refusals) and not self.block:
            return Park(result.reason, result.permanent)
        return self.retry(failures, now)

    def hold_first_attempt_at(self, attempts: int, now: float) -> float:
        """When a newly held aggregate's first release attempt is due."""
        return now + self.backoff.delay(max(attempts, 1), self.rng)

    def retry(self, attempt: int, now: float) -> Retry:
        delay = self.backoff.delay(attempt, self.rng)
        return Retry(now + delay, delay)


#: The result of an event held back in a call behind an earlier one of its aggregate.
NOT_SENT = Failure("not sent: an earlier event of its aggregate cannot be published", transient=True)


def sendable_events(batch: Sequence[OutboxEvent]) -> list[OutboxEvent]:
    """The events of `batch` that go to the sink: a defect cannot become a message, and the
    events behind it of its aggregate in the batch are not sent either (they would reach the
    broker ahead of it)."""
    behind: set[Hashable] = set()
    sendable: list[OutboxEvent] = []
    for event in batch:
        # A lane key is built only for a defect, or once one was found (the common batch has none).
        if event.defect is not None:
            behind.add(event.lane_key)
        elif not behind or event.lane_key not in behind:
            sendable.append(event)
    return sendable


def batch_results(
    batch: Sequence[OutboxEvent], sendable: Sequence[OutboxEvent], results: Sequence[PublishResult]
) -> list[PublishResult]:
    """The results of the whole `batch`, from the `results` of the `sendable` events sent: a
    defect fails for good, an event not sent behind it is not sent (`NOT_SENT`)."""
    by_event = {id(event): result for event, result in zip(sendable, results, strict=True)}
    return [
        by_event[id(event)]
        if id(event) in by_event
        else (Failure(event.defect, permanent=True) if event.defect is not None else NOT_SENT)
        for event in batch
    ]
