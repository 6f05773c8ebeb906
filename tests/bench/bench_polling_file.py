"""Polling -> file benchmark. Prints figures and ratios; asserts nothing about timing.

In one run, against one private PostgreSQL:
  (a) a bare loop: SELECT ... ORDER BY position LIMIT 1000, then UPDATE ... SET published_at = now()
      WHERE position = ANY(...), over a backlog of N events: the cost of the database work alone;
  (b) the relay draining the same backlog to the file sink, and the ratio b/a;
  (c) peak RSS of the relay process draining a 1,000,000-event backlog;
  (d) end-to-end latency p50/p99 (created_at -> line in the file) at a steady 1,000 events/s,
      each event its own transaction, NOTIFY wake-ups on.

    python -m tests.bench.bench_polling_file [--events 200000] [--rss-events 1000000] [--rate 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import yaml

from relay.config import parse_config
from relay.runner import Relay, tune_garbage_collector
from tests.bench.child_process import run_relay_watching_memory
from tests.harness.postgres import start_postgres
from tests.support import create_outbox_database, insert_events, relay_config

AGGREGATES = 1000


def _reset(dsn: str, events: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE outbox")
    insert_events(dsn, events, AGGREGATES)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE outbox")


def bare_loop(dsn: str) -> tuple[int, float]:
    moved = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        while True:
            rows = conn.execute(
                "SELECT position, event_id, aggregate_type, aggregate_id, event_type, payload, headers,"
                " created_at FROM outbox WHERE published_at IS NULL ORDER BY position LIMIT 1000"
            ).fetchall()
            if not rows:
                break
            conn.execute(
                "UPDATE outbox SET published_at = now() WHERE position = ANY(%s)", ([r[0] for r in rows],)
            )
            moved += len(rows)
        return moved, time.perf_counter() - started


def drain_in_process(dsn: str, sink: dict[str, Any]) -> tuple[int, float]:
    """(events published, seconds) of the relay draining the outbox to `sink` in this process,
    set up as `outbox-relay run --drain` sets itself up."""
    config = relay_config(dsn, sink)
    config["log"] = {"format": "json", "level": "warning"}

    async def main() -> tuple[int, float]:
        relay = Relay(parse_config(config, "bench.yaml", {}))
        started = time.perf_counter()
        code = await relay.run(drain=True)
        assert code == 0
        return relay.pipelines[0].published, time.perf_counter() - started

    tune_garbage_collector()
    return asyncio.run(main())


def relay_drain(dsn: str, out: Path) -> tuple[int, float]:
    return drain_in_process(dsn, {"type": "file", "path": str(out)})


def _config_file(directory: Path, dsn: str, sink_path: str) -> Path:
    config = relay_config(dsn, {"type": "file", "path": sink_path})
    config["log"] = {"format": "json", "level": "warning"}
    path = directory / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def peak_rss(dsn: str, directory: Path, events: int) -> tuple[float, float, float]:
    """(peak RSS MB, seconds, events/s) of `outbox-relay run --drain` as its own process."""
    config = _config_file(directory, dsn, "/dev/null")
    code, peak_mb, elapsed = run_relay_watching_memory(config)
    assert code == 0, f"relay exited {code}"
    return peak_mb, elapsed, events / elapsed


def steady_latency(dsn: str, directory: Path, rate: int, seconds: float) -> list[float]:
    out = directory / "latency.jsonl"
    out.touch()
    config = _config_file(directory, dsn, str(out))
    proc = subprocess.Popen([sys.executable, "-m", "relay", "run", "-c", str(config)])
    latencies: list[float] = []
    total = int(rate * seconds)
    stop = threading.Event()

    def tail() -> None:
        with out.open() as handle:
            buffer = ""
            while not stop.is_set() or len(latencies) < total:
                chunk = handle.readline()
                if not chunk:
                    if stop.is_set() and time.time() > deadline:
                        return
                    time.sleep(0.0005)
                    continue
                buffer += chunk
                if buffer.endswith("\n"):
                    now = time.time()
                    created = json.loads(buffer)["headers"]["created_at"]
                    latencies.append(now - _epoch(created))
                    buffer = ""

    deadline = time.time() + seconds + 30
    reader = threading.Thread(target=tail, daemon=True)
    try:
        time.sleep(1.0)  # relay up and listening
        reader.start()
        with psycopg.connect(dsn, autocommit=True) as conn:
            next_at = time.perf_counter()
            for i in range(total):
                conn.execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)"
                    " VALUES ('order', %s, 'OrderUpdated', %s)",
                    (f"order-{i % AGGREGATES}", json.dumps({"seq": i})),
                )
                next_at += 1.0 / rate
                pause = next_at - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
        stop.set()
        reader.join(timeout=40)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return latencies


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rss-events", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)

    report: dict[str, Any] = {}
    with start_postgres() as pg, tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        directory = Path(tmp)
        dsn = create_outbox_database(pg)

        _reset(dsn, args.events)
        moved, seconds = bare_loop(dsn)
        report["a_bare_loop_rows_per_s"] = round(moved / seconds)

        _reset(dsn, args.events)
        published, seconds = relay_drain(dsn, directory / "drain.jsonl")
        assert published == args.events, f"relay published {published} of {args.events}"
        report["b_relay_events_per_s"] = round(published / seconds)
        report["ratio_b_over_a"] = round(report["b_relay_events_per_s"] / report["a_bare_loop_rows_per_s"], 3)

        _reset(dsn, args.rss_events)
        rss, seconds, rate = peak_rss(dsn, directory, args.rss_events)
        report["rss_backlog_events"] = args.rss_events
        report["rss_peak_mb"] = round(rss, 1)
        report["rss_run_events_per_s"] = round(rate)

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE outbox")
        latencies = steady_latency(dsn, directory, args.rate, args.seconds)
        report["latency_events"] = len(latencies)
        report["latency_rate_per_s"] = args.rate
        if latencies:
            report["latency_p50_ms"] = round(_pct(latencies, 0.50) * 1000, 2)
            report["latency_p99_ms"] = round(_pct(latencies, 0.99) * 1000, 2)
            report["latency_max_ms"] = round(max(latencies) * 1000, 2)
    for key, value in report.items():
        print(f"{key:28} {value}")


if __name__ == "__main__":
    main()
