"""What `outbox-relay drill` is asked to do (DrillPlan), what its independent consumer saw
(Tally), and what it reports (DrillReport)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from outbox_relay.config import OutboxConfig
from outbox_relay.interfaces import Delivered


@dataclass(frozen=True)
class DrillPlan:
    events: int = 100_000
    aggregates: int = 1_000
    rate: float = 2_000.0
    kill_every: float | None = 2.0
    replicas: int = 1
    broker_outage: float | None = None
    broker_pid: int | None = None
    broker_stop_command: str | None = None
    broker_start_command: str | None = None
    db_restart_command: str | None = None
    drain_timeout: float = 300.0
    #: Freeze (SIGSTOP) the replica that holds the lease this often, for `freeze_for` (None:
    #: twice the outbox's lease time), then SIGCONT it.
    freeze_every: float | None = None
    freeze_for: float | None = None
    #: Cut the replica that holds the lease off from the database this often, for `cut_for`
    #: (None: twice the lease time): close, hold, or both in turn (relay.tools.drill_faults).
    cut_every: float | None = None
    cut_mode: str = "both"
    cut_for: float | None = None
    #: Where each replica's log is kept (None: a temporary directory, removed at the end).
    logs: Path | None = None

    def faults_on_the_active_replica(self) -> bool:
        return bool(self.freeze_every or self.cut_every)


@dataclass
class DrillReport:
    run_id: str
    outbox: str
    written: int = 0
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    order_violations: int = 0
    aggregates_with_violations: int = 0
    latency_p99_ms: float = 0.0
    latency_max_ms: float = 0.0
    write_seconds: float = 0.0
    drain_seconds: float = 0.0
    kills: int = 0
    replicas: int = 1
    broker_outages: int = 0
    db_restarts: int = 0
    #: Faults done to the active replica, by kind (freeze, cut-close, cut-hold).
    faults: dict[str, int] = field(default_factory=dict)
    #: By fault kind: faults, taken_over (takeovers seen), and the min/median/max seconds from a
    #: fault's start until the lease row showed another holder.
    takeover_seconds: dict[str, dict[str, float | int]] = field(default_factory=dict)
    #: The repeats the README promises at most: pipeline.max_in_flight (and, for logical
    #: replication, one transaction) per interruption (kill, fault, outage, restart).
    duplicates_bound: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.lost == 0 and self.order_violations == 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def as_text(self) -> str:
        lines = [
            f"drill {self.run_id} on outbox {self.outbox}: {'PASSED' if self.passed else 'FAILED'}",
            f"  written            {self.written} events in {self.write_seconds:.1f}s",
            f"  delivered          {self.delivered} distinct",
            f"  lost               {self.lost}",
            f"  duplicates         {self.duplicates} (at most {self.duplicates_bound} by the README's"
            " bound: max_in_flight per interruption)",
            f"  order violations   {self.order_violations} (in {self.aggregates_with_violations} aggregates)",
            f"  end-to-end latency p99 {self.latency_p99_ms:.1f} ms, max {self.latency_max_ms:.1f} ms",
            f"  time to drain      {self.drain_seconds:.1f}s after the last write",
            f"  chaos              {self.kills} SIGKILLs across {self.replicas} replica(s),"
            f" {self.broker_outages} broker outage(s), {self.db_restarts} database restart(s)",
        ]
        if self.faults:
            done = ", ".join(f"{count} {kind}" for kind, count in self.faults.items())
            lines.append(f"  faults             {done} (of the replica holding the lease)")
        for kind, seen in self.takeover_seconds.items():
            taken = f"{seen['taken_over']} of {seen['faults']} taken over"
            if seen["taken_over"]:
                taken += (
                    f" after min {seen['min']:.2f}s, median {seen['median']:.2f}s, max {seen['max']:.2f}s"
                )
            lines.append(f"  takeover {kind:<9} {taken}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


class Tally:
    """What the independent consumer saw, event by event."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.first_seen: dict[str, float] = {}
        self.latencies: list[float] = []
        self.duplicates = 0
        self.last_position: dict[str, int] = defaultdict(lambda: -1)
        self.violations: dict[str, int] = defaultdict(int)

    def add(self, messages: list[Delivered]) -> None:
        for message in messages:
            headers = message.headers
            if headers.get("drill_run") != self.run_id:
                continue  # someone else's events on the same topic or queue
            event_id = headers["event_id"]
            if event_id in self.first_seen:
                self.duplicates += 1
                continue
            self.first_seen[event_id] = message.received_at
            created = datetime.fromisoformat(headers["created_at"]).timestamp()
            self.latencies.append(message.received_at - created)
            aggregate, position = headers["aggregate_id"], int(headers["position"])
            if position < self.last_position[aggregate]:
                self.violations[aggregate] += 1
            self.last_position[aggregate] = max(position, self.last_position[aggregate])


def duplicates_bound(outbox: OutboxConfig, report: DrillReport, largest_transaction: int) -> int:
    """docs/concepts/guarantees.md, "At-least-once, with a bounded number of repeats": after a crash at most
    `max_in_flight` events are sent again (logical replication: plus one transaction). Every
    interruption of the drill counts as one."""
    per_interruption = outbox.pipeline.max_in_flight
    if outbox.source.type == "postgres-logical":
        per_interruption += largest_transaction
    interruptions = report.kills + sum(report.faults.values()) + report.broker_outages + report.db_restarts
    return interruptions * per_interruption
