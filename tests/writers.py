"""Concurrent application writers for order tests: many connections writing outbox events the way
the README asks (each transaction locks its aggregate's row first, so one aggregate's writes are
serialized), with random commit delays, rollbacks and hot aggregates, so that transactions commit
rows below positions the relay has already passed."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from outbox_relay.outbox import emit_event, write_event

#: Writes one event inside the caller's open transaction and returns its event id.
EventWriter = Callable[[psycopg.Connection[Any], str, int], str]


def table_writer(conn: psycopg.Connection[Any], aggregate: str, seq: int) -> str:
    return write_event(conn, "order", aggregate, "Updated", {"seq": seq})


def message_writer(conn: psycopg.Connection[Any], aggregate: str, seq: int) -> str:
    return emit_event(conn, "order", aggregate, "Updated", {"seq": seq})


@dataclass
class WriterPlan:
    events: int = 2000
    writers: int = 8
    aggregates: int = 40
    #: Share of transactions that pick one of the few hot aggregates (they queue on its lock).
    hot_share: float = 0.5
    hot_aggregates: int = 4
    rollback_share: float = 0.05
    seed: int = 0


@dataclass
class Written:
    """What the writers committed: per aggregate, (seq, event id) of each event. The seq is read
    and increased under the aggregate's row lock, so seq order is the aggregate's commit order."""

    committed: dict[str, list[tuple[int, str]]] = field(default_factory=lambda: defaultdict(list))
    done: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)

    @property
    def by_aggregate(self) -> dict[str, list[str]]:
        """Per aggregate, its event ids in commit order."""
        return {aggregate: [e for _, e in sorted(events)] for aggregate, events in self.committed.items()}

    @property
    def ids(self) -> set[str]:
        return {event_id for events in self.committed.values() for _, event_id in events}


def _commit_delay(rng: random.Random) -> float:
    roll = rng.random()
    if roll < 0.70:
        return rng.uniform(0, 0.005)
    if roll < 0.95:
        return rng.uniform(0.005, 0.05)
    return rng.uniform(0.1, 0.3)


def start_writers(dsn: str, plan: WriterPlan, write: EventWriter = table_writer) -> Written:
    """Start the writer threads; `Written.done` is set once `plan.events` events committed."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS test_aggregates (id text PRIMARY KEY, seq int NOT NULL)")
        conn.execute(
            "INSERT INTO test_aggregates SELECT 'agg-' || i, 0 FROM generate_series(0, %s) AS i"
            " ON CONFLICT DO NOTHING",
            (plan.aggregates - 1,),
        )
    written = Written()
    lock = threading.Lock()
    remaining = [plan.events]

    def claim() -> bool:
        with lock:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True

    def unclaim() -> None:
        with lock:
            remaining[0] += 1

    def writer(number: int) -> None:
        rng = random.Random(plan.seed * 1000 + number)
        try:
            with psycopg.connect(dsn) as conn:
                while claim():
                    if rng.random() < plan.hot_share:
                        aggregate = f"agg-{rng.randrange(plan.hot_aggregates)}"
                    else:
                        aggregate = f"agg-{rng.randrange(plan.aggregates)}"
                    row = conn.execute(
                        "SELECT seq FROM test_aggregates WHERE id = %s FOR UPDATE", (aggregate,)
                    ).fetchone()
                    assert row is not None
                    seq = int(row[0]) + 1
                    event_id = write(conn, aggregate, seq)
                    conn.execute("UPDATE test_aggregates SET seq = %s WHERE id = %s", (seq, aggregate))
                    time.sleep(_commit_delay(rng))
                    if rng.random() < plan.rollback_share:
                        conn.rollback()
                        unclaim()
                        continue
                    conn.commit()
                    with lock:
                        written.committed[aggregate].append((seq, event_id))
        except BaseException as exc:
            written.errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(plan.writers)]
    for thread in threads:
        thread.start()

    def finish() -> None:
        for thread in threads:
            thread.join()
        written.done.set()

    threading.Thread(target=finish, daemon=True).start()
    return written


def order_violations(delivered: list[dict[str, Any]], written: Written) -> list[str]:
    """Per aggregate, the first deliveries must follow the commit order exactly; returns one
    line per aggregate that was reordered or lost events."""
    first_seen: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for message in delivered:
        event_id = message["event_id"]
        if event_id in seen:
            continue
        seen.add(event_id)
        first_seen[message["aggregate_id"]].append(event_id)
    problems = []
    for aggregate, expected in written.by_aggregate.items():
        got = [event_id for event_id in first_seen.get(aggregate, []) if event_id in set(expected)]
        if got != expected:
            index = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
            problems.append(
                f"{aggregate}: {len(got)} of {len(expected)} delivered, first difference at {index}"
            )
    return problems


class SteadyWriter(threading.Thread):
    """An application writing one event per transaction at a steady rate, round-robin over
    `aggregates` aggregates (`order-0`, ...), until `stop` is set."""

    def __init__(self, dsn: str, rate: float = 300, aggregates: int = 20) -> None:
        super().__init__(daemon=True)
        self.dsn, self.rate, self.aggregates = dsn, rate, aggregates
        self.stop = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            i = 0
            while not self.stop.is_set():
                conn.execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)"
                    " VALUES ('order', %s, 'OrderUpdated', %s)",
                    (f"order-{i % self.aggregates}", json.dumps({"seq": i})),
                )
                i += 1
                time.sleep(1 / self.rate)
