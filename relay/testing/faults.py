"""Fault injection for the in-memory connectors: what the broker does to an event or a call.

Faults of events are keyed by (event_id, attempt), so a schedule means the same thing however the
pipeline happens to batch its calls; faults of a whole call are keyed by the first event of the
call and its attempt, for the same reason. `ScriptedFaults` is such a schedule, written out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from outbox_relay.events import Failure, OutboxEvent


class EventFault(Enum):
    """What the broker does to one event on one attempt, instead of taking it."""

    #: No answer in time (or the connection dropped): not stored, a transient failure.
    TRANSIENT = "transient"
    #: Refused, for now: not stored, a failure that is neither transient nor permanent (it
    #: counts towards `dead_letter.after_attempts`).
    REFUSE = "refuse"
    #: Refused for good (too large, invalid): not stored, a permanent failure.
    PERMANENT = "permanent"
    #: Stored, but its acknowledgement was lost (a timeout after the broker took it): reported
    #: as a transient failure, so the event is sent again: a duplicate on the broker.
    LOSE_ACK = "lose-ack"

    @property
    def stores(self) -> bool:
        """Whether the broker keeps the event although the sink reports a failure."""
        return self is EventFault.LOSE_ACK

    def failure(self) -> Failure:
        """The result the sink reports for the event."""
        if self is EventFault.PERMANENT:
            return Failure("refused for good by the in-memory broker", permanent=True)
        if self is EventFault.REFUSE:
            return Failure("refused by the in-memory broker")
        if self is EventFault.LOSE_ACK:
            return Failure("no acknowledgement in time (the broker took it)", transient=True)
        return Failure("no acknowledgement in time", transient=True)


class CallFault(Enum):
    """What happens to a whole publish call."""

    #: The call raises ConnectorError before anything is sent (the broker is unreachable).
    RAISE = "raise"
    #: The broker accepts the call and never answers: the sink waits for its own timeout, then
    #: reports every event as a transient failure; nothing is stored.
    HANG = "hang"
    #: The broker completes the call's events in another order than given, aggregate by
    #: aggregate from the last to the first, each aggregate's own events still in order (what
    #: concurrent sends within a call look like).
    REORDER = "reorder"


class FaultPlan(Protocol):
    """Decides the faults of a sink's calls and events; None means no fault."""

    def for_call(self, events: Sequence[OutboxEvent], attempt: int) -> CallFault | None:
        """The fault of a call, given its events and the attempt number of its first event."""
        ...

    def for_event(self, event: OutboxEvent, attempt: int) -> EventFault | None:
        """The fault of `event` on its `attempt`-th send (1-based)."""
        ...


@dataclass(frozen=True)
class ScriptedFaults:
    """A fault schedule written out: `events[(event_id, attempt)]`, `calls[(event_id, attempt)]`
    for the call whose first event that is; `poison` event ids are refused for good on every
    attempt."""

    events: Mapping[tuple[str, int], EventFault] = field(default_factory=dict)
    calls: Mapping[tuple[str, int], CallFault] = field(default_factory=dict)
    poison: frozenset[str] = frozenset()

    def for_call(self, events: Sequence[OutboxEvent], attempt: int) -> CallFault | None:
        return self.calls.get((events[0].event_id, attempt)) if events else None

    def for_event(self, event: OutboxEvent, attempt: int) -> EventFault | None:
        if event.event_id in self.poison:
            return EventFault.PERMANENT
        return self.events.get((event.event_id, attempt))


NO_FAULTS = ScriptedFaults()
