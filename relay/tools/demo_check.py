"""The demo's proof: read back what the sink received and hold it against what was written.

Lost: written (committed) and never received. Order violations: per order, the lifecycle
sequence numbers received (first copies) are not 1, 2, 3, ... with nothing skipped or
repeated out of turn. Duplicates: a copy of an event already received, which at-least-once
delivery allows (consumers drop them by event_id); they do not fail the demo.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from outbox_relay.tools.demo_orders import LIFECYCLE, Written


@dataclass
class SinkTally:
    """What the sink received of one demo run, line by line, in the order it received them."""

    run_id: str
    #: event_id -> (order id, sequence) of each event received, first copy only
    received: dict[str, tuple[str, int]] = field(default_factory=dict)
    duplicates: int = 0
    violations: int = 0
    _last: dict[str, int] = field(default_factory=dict)

    def add(self, lines: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Count `lines` (the sink's JSON lines); returns those of this run received first."""
        new = []
        for line in lines:
            if line.get("headers", {}).get("demo_run") != self.run_id:
                continue  # an earlier run's leftovers in the same outbox
            event_id = line["event_id"]
            if event_id in self.received:
                self.duplicates += 1
                continue
            order_id, sequence = line["aggregate_id"], int(line["payload"]["sequence"])
            self.received[event_id] = (order_id, sequence)
            if sequence != self._last.get(order_id, 0) + 1:
                self.violations += 1
            self._last[order_id] = max(sequence, self._last.get(order_id, 0))
            new.append(line)
        return new


@dataclass(frozen=True)
class DemoSummary:
    written: int
    orders: int
    published: int
    lost: int
    violations: int
    duplicates: int
    seconds: float
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.lost == 0 and self.violations == 0

    def as_text(self) -> str:
        verdict = (
            "PASSED: every event written was published, each order's events in lifecycle order"
            if self.passed
            else "FAILED: events were lost or out of order"
        )
        lines = [
            f"demo summary, after {self.seconds:.1f}s:",
            f"  written            {self.written} events, {self.orders} orders complete"
            f" ({' -> '.join(LIFECYCLE)})",
            f"  published          {self.published} distinct events read back from the sink",
            f"  lost               {self.lost}",
            f"  order violations   {self.violations} (per order: sequence increasing, no gaps)",
            f"  duplicates         {self.duplicates} (at-least-once allows repeats; consumers drop"
            " them by event_id)",
            *(f"  note: {note}" for note in self.notes),
            f"  {verdict}",
        ]
        return "\n".join(lines)


def summarize(written: Written, tally: SinkTally, seconds: float, notes: Iterable[str] = ()) -> DemoSummary:
    received = tally.received.keys()
    return DemoSummary(
        written=len(written.events),
        orders=written.orders,
        published=len(received & written.events.keys()),
        lost=len(written.events.keys() - received),
        violations=tally.violations,
        duplicates=tally.duplicates,
        seconds=seconds,
        notes=tuple(notes),
    )
