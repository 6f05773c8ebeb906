"""Prometheus metrics, named as docs/operations/metrics.md lists them; the chart's alerts use them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_PUBLISHED = Counter(
    "outbox_relay_events_published", "Events acknowledged by the broker.", ["outbox", "sink"]
)
PUBLISH_FAILURES = Counter(
    "outbox_relay_publish_failures",
    "Events the broker did not acknowledge (each failed attempt counts).",
    ["outbox", "sink"],
)
RETRIES = Counter("outbox_relay_retries", "Events scheduled for another attempt.", ["outbox"])
PENDING = Gauge("outbox_relay_pending_events", "Events in the outbox not yet published.", ["outbox"])
LAG = Gauge("outbox_relay_lag_seconds", "Age of the oldest unpublished event; 0 when empty.", ["outbox"])
IN_FLIGHT = Gauge(
    "outbox_relay_in_flight_events",
    "Events fetched and not yet acknowledged to the source.",
    ["outbox"],
)
BLOCKED_AGGREGATES = Gauge(
    "outbox_relay_blocked_aggregates",
    "Aggregates whose next event failed and waits for a retry.",
    ["outbox"],
)
END_TO_END = Histogram(
    "outbox_relay_end_to_end_seconds",
    "From the event's created_at to the broker's acknowledgement.",
    ["outbox"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
BATCH_SECONDS = Histogram(
    "outbox_relay_batch_seconds",
    "Time per batch and stage (fetch, publish, ack).",
    ["outbox", "stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
UP = Gauge(
    "outbox_relay_up",
    "1 when the outbox's database answered, and its broker took or refused an event, on the last "
    "attempt; 0 when every event of the last publish got no answer from the broker.",
    ["outbox", "component"],
)
SETUP_PROBLEM = Gauge(
    "outbox_relay_setup_problem",
    "1 while the outbox cannot go on until its setup is fixed (a missing table, a refused login,"
    " a missing privilege); the log and /readyz say what.",
    ["outbox", "component"],
)
SLOT_LAG = Gauge(
    "outbox_relay_replication_slot_lag_bytes",
    "WAL the replication slot retains: pg_current_wal_lsn() - confirmed_flush_lsn.",
    ["outbox"],
)
DEAD_LETTERED = Counter("outbox_relay_dead_lettered", "Events moved to the dead-letter table.", ["outbox"])
DEAD_LETTERS = Gauge(
    "outbox_relay_dead_letters", "Dead-lettered events not replayed yet (held ones not counted).", ["outbox"]
)
HELD_EVENTS = Gauge(
    "outbox_relay_held_events",
    "Events held in the dead-letter table behind the first event of their aggregate, in order.",
    ["outbox"],
)
HELD_AGGREGATES = Gauge(
    "outbox_relay_held_aggregates", "Aggregates whose events wait in the dead-letter table.", ["outbox"]
)
LEADER = Gauge(
    "outbox_relay_leader", "1 while this replica is the active relay of the outbox, else 0.", ["outbox"]
)
STALLED = Gauge(
    "outbox_relay_stalled_seconds",
    "How long the oldest call of the outbox still out (a fetch, publish, ack, dead-letter store"
    " call or release) has waited for an answer; 0 when none is out. /healthz fails past"
    " http.stuck_after.",
    ["outbox"],
)

#: What only the active relay of an outbox knows: its backlog, its calls out, its slot's lag.
_ACTIVE_ONLY = (
    PENDING,
    LAG,
    IN_FLIGHT,
    BLOCKED_AGGREGATES,
    SLOT_LAG,
    DEAD_LETTERS,
    HELD_EVENTS,
    HELD_AGGREGATES,
)


def forget_active_state(outbox: str) -> None:
    """Drop the outbox's series that only its active relay keeps current: a replica back to
    standby would otherwise export its last backlog for good (and alerts on it would fire on
    a standby while the new holder has drained everything)."""
    for gauge in _ACTIVE_ONLY:
        try:
            gauge.remove(outbox)
        except KeyError:  # (never set by this process)
            pass
