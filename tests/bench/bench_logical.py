"""Logical replication benchmark. Prints figures and ratios; asserts nothing about timing.

In one run, against one private PostgreSQL (wal_level=logical), each relay as its own process
draining a 200,000-event backlog (1,000 aggregates) with `run --drain`:
  polling -> file          the baseline, measured in the same run;
  logical table -> file    INSERTs streamed through pgoutput;
  logical message -> file  pg_logical_emit_message, no table;
  logical table, one 200,000-event transaction -> file (memory bound);
  logical table / message -> Kafka (tansu), unless --no-kafka.
For each: events/s between "outbox started" and "drained" in the relay's own log, peak RSS, and
the ratio to polling -> file.

    python -m tests.bench.bench_logical [--events 200000] [--no-kafka]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import yaml

from tests.bench.child_process import RELAY_MODULE, RelayCommand, run_relay_watching_memory
from tests.harness.postgres import start_postgres
from tests.support import create_outbox_database, insert_events

AGGREGATES = 1000


def _source(dsn: str, kind: str) -> dict[str, Any]:
    if kind == "polling":
        return {"type": "postgres-polling", "dsn": dsn}
    return {
        "type": "postgres-logical",
        "dsn": dsn,
        "mode": kind,
        "slot": f"bench_{kind}",
        "publication": "bench",
    }


def drain(
    directory: Path,
    source: dict[str, Any],
    sink: dict[str, Any],
    events: int,
    command: RelayCommand = RELAY_MODULE,
) -> dict[str, float]:
    """Run `outbox-relay run --drain` as its own process, started by `command`: events/s between
    "outbox started" and "drained" in its log, the relay's CPU seconds in that span, peak RSS."""
    config = {
        "outboxes": [{"name": "bench", "source": source, "sink": sink}],
        "http": {"port": 0},
        "log": {"format": "json", "level": "info"},
    }
    path = directory / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    log = directory / "relay.log"
    with log.open("w") as stderr:
        run = run_relay_watching_memory(path, stderr, command)
    if run.code != 0:
        raise SystemExit(f"relay failed:\n{log.read_text()[-2000:]}")
    stamps: dict[str, float] = {}
    published = 0
    for line in log.read_text().splitlines():
        if not line.startswith("{"):  # (`run --drain`'s progress lines, off a terminal)
            continue
        record = json.loads(line)
        if record.get("event") in ("outbox started", "drained: the outbox is empty"):
            stamps[record["event"]] = datetime.fromisoformat(record["timestamp"]).timestamp()
            published = int(record.get("published", published))
    started, drained = stamps["outbox started"], stamps["drained: the outbox is empty"]
    if published != events:
        raise SystemExit(f"published {published}, expected {events}")
    seconds = drained - started
    cpu_s = run.cpu_between(started, drained)
    return {
        "events_per_s": events / seconds,
        "seconds": seconds,
        "cpu_s": cpu_s,
        "events_per_cpu_s": events / cpu_s if cpu_s > 0 else float("nan"),
        "rss_mb": run.peak_mb,
    }


def _prepare(dsn: str, kind: str, events: int, transactions: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE outbox")
        if kind != "polling":
            slot = f"bench_{kind}"
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                (slot,),
            )
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        if kind == "message":
            per_tx = events // transactions
            for t in range(transactions):
                conn.execute(
                    "SELECT pg_logical_emit_message(true, 'outbox', json_build_object("
                    " 'event_id', gen_random_uuid(), 'aggregate_type', 'order',"
                    " 'aggregate_id', 'order-' || (i %% %s), 'event_type', 'OrderUpdated',"
                    " 'payload', json_build_object('seq', i, 'note', repeat('x', 64)),"
                    " 'headers', json_build_object('traceparent', '00-abc-01'))::text)"
                    " FROM generate_series(%s::int, %s::int) AS i",
                    (AGGREGATES, t * per_tx, (t + 1) * per_tx - 1),
                )
            return
    if transactions == 1:
        insert_events(dsn, events, AGGREGATES)
    else:
        for _ in range(transactions):
            insert_events(dsn, events // transactions, AGGREGATES)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE outbox")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--no-kafka", action="store_true")
    args = parser.parse_args(argv)
    n = args.events
    rows: list[tuple[str, dict[str, float]]] = []
    with start_postgres() as pg, tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        directory = Path(tmp)
        dsn = create_outbox_database(pg)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE PUBLICATION bench FOR TABLE outbox WITH (publish = 'insert')")
        file_sink = {"type": "file", "path": str(directory / "out.jsonl")}
        runs: list[tuple[str, str, dict[str, Any], int]] = [
            ("polling -> file", "polling", file_sink, 20),
            ("logical table -> file", "table", file_sink, 20),
            ("logical message -> file", "message", file_sink, 20),
            ("logical table, 1 transaction -> file", "table", file_sink, 1),
        ]
        broker = None
        if not args.no_kafka:
            from tests.harness.kafka import start_kafka

            broker = start_kafka()
            kafka_sink = {
                "type": "kafka",
                "bootstrap_servers": broker.bootstrap_servers,
                "topic": "bench.{aggregate_type}",
            }
            runs += [
                ("logical table -> kafka", "table", kafka_sink, 20),
                ("logical message -> kafka", "message", kafka_sink, 20),
            ]
        try:
            for label, kind, sink, transactions in runs:
                _prepare(dsn, kind, n, transactions)
                (directory / "out.jsonl").unlink(missing_ok=True)
                rows.append((label, drain(directory, _source(dsn, kind), sink, n)))
        finally:
            if broker is not None:
                broker.close()
    baseline = rows[0][1]["events_per_s"]
    title = f"run ({n} events)"
    print(f"{title:40} {'events/s':>10} {'seconds':>8} {'peak RSS MB':>12} {'vs polling':>11}")
    for label, figures in rows:
        print(
            f"{label:40} {figures['events_per_s']:10.0f} {figures['seconds']:8.2f} {figures['rss_mb']:12.1f}"
            f" {figures['events_per_s'] / baseline:11.2f}"
        )


if __name__ == "__main__":
    main()
